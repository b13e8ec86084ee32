"""Graceful shutdown: a ``shutdown`` event, a grace period for in-flight requests, close 1012."""

from __future__ import annotations

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket

from kernel import READ, MethodSpec, Params, hookimpl

pytestmark = pytest.mark.usefixtures("gateway_token")


class SleepParams(Params):
    ms: int | None = None


class SlowPlugin:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.background_cancelled = trio.Event()

    @hookimpl
    def anima_methods(self):
        return [MethodSpec("slow.work", self.work, READ, SleepParams)]

    @hookimpl
    def anima_startup(self, nursery):
        nursery.start_soon(self._background)

    @hookimpl
    def anima_shutdown(self):
        self.log.append("anima_shutdown")

    async def _background(self):
        try:
            await trio.sleep_forever()
        finally:
            self.background_cancelled.set()

    async def work(self, call, params: SleepParams):
        try:
            if params.ms is None:
                await trio.sleep_forever()
            await trio.sleep(params.ms / 1000)
        except trio.Cancelled:
            self.log.append(f"cancelled {call.request_id}")
            raise
        self.log.append(f"finished {call.request_id}")
        return {"slept": params.ms}


@pytest.fixture
def plugin() -> SlowPlugin:
    return SlowPlugin()


async def _wait_until(predicate, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


async def test_shutdown_event_grace_for_in_flight_then_close_1012(
    start_gateway, raw_connect, connect, plugin
):
    config = {"gateway": {"limits": {"shutdownGraceMs": 5_000}}}
    async with (
        start_gateway(plugins={"slow": plugin}, config=config) as gateway,
        raw_connect(gateway, scopes=[READ]) as busy,
        connect(gateway) as idle,
    ):
        await busy.request("slow", "slow.work", {"ms": 200})
        conn_id = busy.hello["server"]["connId"]
        await _wait_until(lambda: gateway.connections[conn_id].in_flight == 1)

        gateway.request_shutdown()
        with trio.fail_after(10):
            shutdown = await busy.event("shutdown")
            closed = await busy.closed()
            idle_shutdown = await idle.next_event("shutdown")

        assert shutdown["payload"]["reason"]
        assert idle_shutdown["payload"] == shutdown["payload"]
        # The request finished within its grace, and its answer went out before the close.
        (response,) = busy.responses["slow"]
        assert response["ok"] is True
        assert response["payload"] == {"slept": 200}
        kinds = [(f["type"], f.get("event") or f.get("id")) for f in busy.frames]
        assert kinds.index(("evt", "shutdown")) < kinds.index(("res", "slow"))
        assert closed.code == 1012
        assert closed.reason == "service restart"
        assert idle.ws.closed is not None and idle.ws.closed.code == 1012
    assert plugin.log == ["finished slow", "anima_shutdown"]
    assert plugin.background_cancelled.is_set()


async def test_request_outlasting_the_grace_is_cancelled(start_gateway, raw_connect, plugin):
    config = {"gateway": {"limits": {"shutdownGraceMs": 100}}}
    async with (
        start_gateway(plugins={"slow": plugin}, config=config) as gateway,
        raw_connect(gateway, scopes=[READ]) as raw,
    ):
        await raw.request("forever", "slow.work", {})
        conn_id = raw.hello["server"]["connId"]
        await _wait_until(lambda: gateway.connections[conn_id].in_flight == 1)
        gateway.request_shutdown("maintenance", restart_expected_ms=1500)
        with trio.fail_after(10):
            closed = await raw.closed()
    assert closed.code == 1012
    assert "forever" not in raw.responses
    (shutdown,) = [e for e in raw.events if e["event"] == "shutdown"]
    assert shutdown["payload"] == {"reason": "maintenance", "restartExpectedMs": 1500}
    assert plugin.log == ["cancelled forever", "anima_shutdown"]


async def test_no_new_connections_while_stopping(start_gateway, raw_connect, plugin):
    config = {"gateway": {"limits": {"shutdownGraceMs": 5_000}}}
    async with (
        start_gateway(plugins={"slow": plugin}, config=config) as gateway,
        raw_connect(gateway, scopes=[READ]) as raw,
    ):
        await raw.request("slow", "slow.work", {"ms": 300})
        conn_id = raw.hello["server"]["connId"]
        await _wait_until(lambda: gateway.connections[conn_id].in_flight == 1)
        gateway.request_shutdown()
        await raw.event("shutdown")
        # The listener is still up during the grace, but refuses newcomers.
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket("127.0.0.1", gateway.port, "/", use_ssl=False) as ws:
                await ws.get_message()
        assert refused.value.status_code == 503
        assert (await raw.response("slow"))["ok"] is True
        assert (await raw.closed()).code == 1012
