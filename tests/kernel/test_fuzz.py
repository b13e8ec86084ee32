"""Random frames thrown at a live gateway over one connection: it must keep serving.

The gateway runs in its own ``trio.run`` on a helper thread for the whole test; hypothesis
drives the examples from the test's thread and hands each frame over with
``trio.from_thread.run``. After every frame the same connection must still answer
``health``; after all of them a new connection must too.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket

from kernel import open_gateway

TOKEN = "fuzz-token"
METHODS = [
    "connect",
    "health",
    "status",
    "last-heartbeat",
    "system-presence",
    "set-heartbeats",
    "system-event",
    "no.such.method",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

near_valid_requests = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["req", "res", "evt", "REQ", ""]) | json_values,
        "id": st.text(max_size=12) | st.integers() | json_values,
        "method": st.sampled_from(METHODS) | st.text(max_size=16) | json_values,
        "params": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "probe": json_values,
                "enabled": st.booleans() | json_values,
                "intervalMs": st.integers() | json_values,
                "text": st.text(max_size=20) | json_values,
                "deviceId": st.text(max_size=8),
                "minProtocol": st.integers(),
            },
        ),
    },
)

frames = st.one_of(
    st.binary(max_size=256),
    st.text(max_size=128),
    json_values.map(json.dumps),
    near_valid_requests.map(json.dumps),
)


class Fuzzer:
    """Lives in the gateway's trio thread; owns the connection the frames go down."""

    def __init__(self, nursery: trio.Nursery, port: int) -> None:
        self.nursery = nursery
        self.port = port
        self.ws: WebSocketConnection | None = None
        self.frames_sent = 0

    async def open(self) -> WebSocketConnection:
        ws = await connect_websocket(self.nursery, "127.0.0.1", self.port, "/", use_ssl=False)
        await ws.get_message()  # the challenge
        connect = {
            "type": "req",
            "id": "connect",
            "method": "connect",
            "params": {
                "minProtocol": 1,
                "maxProtocol": 3,
                "client": {"id": "fuzz", "version": "0", "platform": "pytest", "mode": "test"},
                "scopes": ["operator.admin"],
                "auth": {"token": TOKEN},
            },
        }
        await ws.send_message(json.dumps(connect))
        hello = json.loads(await ws.get_message())
        assert hello["ok"], hello
        return ws

    async def health(self, ws: WebSocketConnection) -> dict[str, Any]:
        probe_id = f"probe-{uuid.uuid4()}"
        await ws.send_message(json.dumps({"type": "req", "id": probe_id, "method": "health"}))
        with trio.fail_after(10):
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("type") == "res" and frame.get("id") == probe_id:
                    return frame

    async def throw(self, frame: str | bytes) -> dict[str, Any]:
        if self.ws is None:
            self.ws = await self.open()
        self.frames_sent += 1
        await self.ws.send_message(frame)
        return await self.health(self.ws)


def _serve(ready: queue.Queue, stop: trio.Event, state_dir) -> None:
    async def main() -> None:
        async with (
            open_gateway(state_dir=state_dir, host="127.0.0.1", port=0) as gateway,
            trio.open_nursery() as nursery,
        ):
            ready.put((trio.lowlevel.current_trio_token(), Fuzzer(nursery, gateway.port)))
            await stop.wait()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:
        ready.put(exc)
        raise


def test_random_frames_do_not_stop_the_gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMA_GATEWAY_TOKEN", TOKEN)
    stop = trio.Event()
    ready: queue.Queue = queue.Queue()
    thread = threading.Thread(target=_serve, args=(ready, stop, tmp_path), daemon=True)
    thread.start()
    started = ready.get(timeout=30)
    if isinstance(started, BaseException):
        raise started
    token, fuzzer = started

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(frame=frames)
    def throw_one(frame: str | bytes) -> None:
        try:
            answer = trio.from_thread.run(fuzzer.throw, frame, trio_token=token)
        except ConnectionClosed as closed:
            fuzzer.ws = None
            pytest.fail(f"the connection was closed ({closed.reason}) by {frame!r}")
        assert answer["ok"] is True, answer

    try:
        throw_one()

        async def final_check() -> tuple[dict, dict]:
            fresh = await fuzzer.open()
            try:
                return await fuzzer.health(fuzzer.ws), await fuzzer.health(fresh)
            finally:
                await fresh.aclose()

        same, fresh = trio.from_thread.run(final_check, trio_token=token)
        assert same["ok"] and same["payload"]["ok"] is True
        assert fresh["ok"] and fresh["payload"]["ok"] is True
        assert fuzzer.frames_sent >= 100
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout=30)
    assert not thread.is_alive()
