"""Events: the tick, and clients too slow to take what they are sent.

A client whose unsent data passes ``maxBufferedBytes`` misses droppable events (with a gap
in its ``seq``) and is closed as a slow consumer by any other event; no other client notices.
"""

from __future__ import annotations

import pytest
import trio

from kernel import ADMIN, READ, EventSpec, MethodSpec, Params, hookimpl

pytestmark = pytest.mark.usefixtures("gateway_token")

MAX_BUFFERED = 64 * 1024


class FloodParams(Params):
    size: int
    max_events: int


class FloodPlugin:
    """Admin-only events, one droppable and one not, and a method that floods with them."""

    def __init__(self) -> None:
        self.disconnected: list[str] = []

    @hookimpl
    def anima_events(self):
        return [
            EventSpec("flood.spray", ADMIN, droppable=True),
            EventSpec("flood.bulk", ADMIN),
            EventSpec("flood.note", READ),
        ]

    @hookimpl
    def anima_methods(self):
        return [
            MethodSpec("flood.start", self.flood, READ, FloodParams),
            MethodSpec("flood.ping", self.ping, READ),
        ]

    @hookimpl
    def anima_client_disconnected(self, connection):
        self.disconnected.append(connection.conn_id)

    async def flood(self, call, params: FloodParams):
        """Emit non-droppable events, paced, until nobody takes them any more."""
        filler = "x" * params.size
        for sent in range(params.max_events):
            if call.emit("flood.bulk", {"n": sent, "filler": filler}) == 0:
                return {"sent": sent}
            # Let the writers run, so that what piles up is what the socket would not take.
            await trio.sleep(0)
        return {"sent": params.max_events}

    async def ping(self, call, params):
        return {"pong": True}


@pytest.fixture
def plugin() -> FloodPlugin:
    return FloodPlugin()


@pytest.fixture
async def flood_gateway(start_gateway, plugin):
    config = {"gateway": {"limits": {"maxBufferedBytes": MAX_BUFFERED}}}
    async with start_gateway(
        plugins={"flood": plugin}, use_entry_points=False, config=config
    ) as gateway:
        yield gateway


async def _wait_until(predicate, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


# -- tick -------------------------------------------------------------------------------------


async def test_tick_every_tick_interval_and_droppable(start_gateway, connect):
    config = {"gateway": {"limits": {"tickIntervalMs": 50}}}
    async with start_gateway(config=config, use_entry_points=False) as gateway:
        assert gateway.events["tick"].droppable is True
        assert gateway.events["tick"].scope is None
        async with connect(gateway, scopes=[READ]) as client:
            assert client.hello["policy"]["tickIntervalMs"] == 50
            with trio.fail_after(5):
                ticks = [await client.next_event("tick") for _ in range(3)]
    stamps = [tick["payload"]["ts"] for tick in ticks]
    assert stamps == sorted(stamps)
    assert [tick["seq"] for tick in ticks] == [1, 2, 3]


async def test_no_tick_before_the_interval(start_gateway, connect):
    async with (
        start_gateway(use_entry_points=False) as gateway,
        connect(gateway, scopes=[READ]) as client,
    ):
        await trio.sleep(0.1)
        assert client.events_nowait() == []


# -- backed-up clients --------------------------------------------------------------------------


async def test_droppable_events_are_skipped_for_a_backed_up_client_leaving_a_seq_gap(
    flood_gateway, raw_connect
):
    async with raw_connect(flood_gateway, scopes=[ADMIN]) as raw:
        conn_id = raw.hello["server"]["connId"]
        events = flood_gateway.services.events
        # All in one go, without yielding: the writer cannot drain in between.
        delivered = sum(events.emit("flood.spray", {"filler": "y" * 1024}) for _ in range(200))
        assert 0 < delivered < 200
        connection = flood_gateway.connections[conn_id]
        await _wait_until(lambda: connection.buffered_bytes == 0)
        assert events.emit("flood.bulk", {"after": True}) == 1
        marker = await raw.event("flood.bulk")
        assert (await raw.call("p", "flood.ping"))["ok"] is True

    sprays = [e for e in raw.events if e["event"] == "flood.spray"]
    assert [e["seq"] for e in sprays] == list(range(1, delivered + 1))
    # The skipped events still counted: the client can see it missed some.
    assert marker["seq"] == 201


async def test_non_droppable_event_closes_a_backed_up_client_and_no_one_else(
    flood_gateway, raw_connect, connect, plugin
):
    async with (
        raw_connect(flood_gateway, scopes=[ADMIN]) as backed_up,
        connect(flood_gateway, scopes=[READ]) as bystander,
    ):
        conn_id = backed_up.hello["server"]["connId"]
        events = flood_gateway.services.events
        for _ in range(200):
            events.emit("flood.spray", {"filler": "y" * 1024})
        assert events.emit("flood.bulk", {"too": "much"}) == 0
        with trio.fail_after(10):
            closed = await backed_up.closed()
        assert closed.code == 1008
        assert closed.reason == "slow consumer"
        await _wait_until(lambda: conn_id in plugin.disconnected)
        # The other client saw nothing of it.
        assert events.emit("flood.note", {"still": "here"}) == 1
        assert (await bystander.next_event("flood.note"))["seq"] == 1
        assert await bystander.call("flood.ping") == {"pong": True}


async def test_client_that_never_reads_is_closed_while_another_is_served(
    flood_gateway, raw_connect, connect, plugin
):
    with trio.fail_after(30):
        async with (
            raw_connect(flood_gateway, scopes=[ADMIN]) as never_reads,
            connect(flood_gateway, scopes=[READ]) as reader,
        ):
            slow_id = never_reads.hello["server"]["connId"]
            # 4 KiB events, up to 128 MiB in all: far more than socket buffers hold, so the
            # flood can only end because the slow client was dropped.
            result = await reader.call("flood.start", {"size": 4096, "maxEvents": 32768})
            assert result["sent"] < 32768
            assert await reader.call("flood.ping") == {"pong": True}
            # The slow client, reading at last, finds its connection closed...
            closed = await never_reads.closed()
            # ...with 1008 when the close frame got through whole, or 1006 when the socket
            # had to be aborted behind a half-sent frame; either way the server let go.
            assert closed.code in (1008, 1006)
            # What piled up for it was dropped, not kept.
            assert len(never_reads.events) < result["sent"]
            await _wait_until(lambda: slow_id in plugin.disconnected)
            assert slow_id not in flood_gateway.connections
            assert await reader.call("flood.ping") == {"pong": True}
            assert reader.hello["server"]["connId"] in flood_gateway.connections
