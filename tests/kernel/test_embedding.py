"""A host embeds the kernel in its own trio program: plugin objects handed over, port 0.

These tests run their own ``trio.run``, as a host application would, rather than pytest-trio's.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

from kernel import (
    READ,
    EventSpec,
    MethodSpec,
    Params,
    hookimpl,
    open_client,
    open_gateway,
    serve_gateway,
)

TOKEN = "embedded-token"


class GreetParams(Params):
    name: str


class Greeter:
    """The host's own plugin: no distribution, no entry point."""

    def __init__(self) -> None:
        self.greeted: list[str] = []

    @hookimpl
    def anima_methods(self):
        return [MethodSpec("greet", self.greet, READ, GreetParams)]

    @hookimpl
    def anima_events(self):
        return [EventSpec("greeted", READ)]

    async def greet(self, call, params: GreetParams):
        self.greeted.append(params.name)
        call.emit("greeted", {"name": params.name})
        return {"text": f"hello {params.name}"}


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv("ANIMA_GATEWAY_TOKEN", TOKEN)


def test_host_starts_the_gateway_with_nursery_start(tmp_path):
    greeter = Greeter()

    async def host_program():
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(
                partial(
                    serve_gateway,
                    state_dir=tmp_path,
                    plugins={"greeter": greeter},
                    use_entry_points=False,
                    host="127.0.0.1",
                    port=0,
                )
            )
            assert gateway.port not in (None, 0)
            async with open_client(f"ws://127.0.0.1:{gateway.port}", token=TOKEN) as client:
                answer = await client.call("greet", {"name": "host"})
                event = await client.next_event("greeted")
            gateway.request_shutdown()
        return answer, event

    answer, event = trio.run(host_program)
    assert answer == {"text": "hello host"}
    assert event["payload"] == {"name": "host"}
    assert greeter.greeted == ["host"]


def test_host_uses_open_gateway_and_two_gateways_share_a_process(tmp_path):
    async def host_program():
        first, second = Greeter(), Greeter()
        async with (
            open_gateway(
                state_dir=tmp_path / "a", plugins={"greeter": first}, use_entry_points=False
            ) as a,
            open_gateway(
                state_dir=tmp_path / "b", plugins={"greeter": second}, use_entry_points=False
            ) as b,
        ):
            assert a.port != b.port
            for gateway, name in ((a, "first"), (b, "second")):
                async with open_client(f"ws://127.0.0.1:{gateway.port}", token=TOKEN) as client:
                    await client.call("greet", {"name": name})
        return first.greeted, second.greeted

    assert trio.run(host_program) == (["first"], ["second"])


def test_cancelling_the_host_scope_stops_the_gateway_and_frees_the_store(tmp_path):
    async def host_program():
        with trio.move_on_after(0.2):
            await serve_gateway(state_dir=tmp_path, use_entry_points=False, port=0)
        # The store was closed: a new gateway opens the same state at once.
        async with open_gateway(state_dir=tmp_path, use_entry_points=False) as again:
            return again.port

    assert trio.run(host_program)
