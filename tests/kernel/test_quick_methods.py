"""Quick methods run on the connection's reader; everything else on workers.

Both must answer the same way, and a slow method on a worker must not hold up a quick one
sent after it on the same connection.
"""

from __future__ import annotations

import pytest
import trio

from kernel import READ, MethodSpec, hookimpl

pytestmark = pytest.mark.usefixtures("gateway_token")


class QuickPlugin:
    def __init__(self) -> None:
        self.release = trio.Event()

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [
            MethodSpec("quick.echo", self.echo, READ, quick=True),
            MethodSpec("quick.fail", self.fail, READ, quick=True),
            MethodSpec("slow.wait", self.wait, READ),
        ]

    async def echo(self, call, params) -> dict:
        return {"conn": call.connection.conn_id}

    async def fail(self, call, params) -> dict:
        raise RuntimeError("boom")

    async def wait(self, call, params) -> str:
        await self.release.wait()
        return "released"


async def test_quick_method_answers_like_any_other(start_gateway, connect):
    async with (
        start_gateway(plugins={"quick": QuickPlugin()}, use_entry_points=False) as gateway,
        connect(gateway, scopes=[READ]) as client,
    ):
        answer = await client.call("quick.echo")
        assert answer == {"conn": client.hello["server"]["connId"]}


async def test_quick_method_that_raises_is_a_500_and_the_connection_lives(start_gateway, connect):
    async with (
        start_gateway(plugins={"quick": QuickPlugin()}, use_entry_points=False) as gateway,
        connect(gateway, scopes=[READ]) as client,
    ):
        (frame,) = await client.request("quick.fail")
        assert frame["ok"] is False
        assert frame["error"]["code"] == 500
        assert "boom" not in frame["error"]["message"]
        assert await client.call("quick.echo")


async def test_slow_request_does_not_hold_up_a_quick_one_behind_it(start_gateway, connect):
    plugin = QuickPlugin()
    async with (
        start_gateway(plugins={"quick": plugin}, use_entry_points=False) as gateway,
        connect(gateway, scopes=[READ]) as client,
    ):
        order: list[str] = []

        async def slow() -> None:
            order.append(await client.call("slow.wait"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(0.05)
            with trio.fail_after(5):
                await client.call("quick.echo")
            order.append("quick")
            plugin.release.set()

        assert order == ["quick", "released"]
