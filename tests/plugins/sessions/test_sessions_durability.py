"""Acknowledged transcript entries survive a killed gateway.

A child process runs a real gateway on a state directory; the test appends (over a socket,
or the child appends through the service and reports each acknowledged id), kills the
child with SIGKILL so that nothing gets to flush or close, then opens a new gateway on the
same directory and finds every acknowledged row.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from sessions_child import LOOP_KEY
from sessions_testkit import running_gateway

from kernel import open_client

CHILD = Path(__file__).with_name("sessions_child.py")
KEY = "agent:main:durable-socket"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")


class Lines:
    """Lines from a child's stdout, read off a trio stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        # A guard against a hung child, not a speed assertion.
        with trio.fail_after(60):
            while b"\n" not in self._buffer:
                chunk = await self._stream.receive_some(65536)
                if not chunk:
                    raise AssertionError("the child process ended early")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


async def start_child(state_dir: Path, mode: str) -> tuple[trio.Process, Lines, dict]:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(CHILD), str(state_dir), mode], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    lines = Lines(process.stdout)
    return process, lines, json.loads(await lines.next())


async def kill(process: trio.Process) -> None:
    process.send_signal(signal.SIGKILL)
    with trio.fail_after(30):
        await process.wait()
    assert process.returncode == -signal.SIGKILL


async def test_appends_acknowledged_over_a_socket_survive_sigkill(tmp_path: Path) -> None:
    process, _, info = await start_child(tmp_path, "serve")
    try:
        async with open_client(f"ws://127.0.0.1:{info['port']}", token=info["token"]) as client:
            acknowledged = [
                await client.call("probe.append", {"key": KEY, "text": f"message {i}"})
                for i in range(25)
            ]
            # Killed while the client is still connected, right after the last answer.
            await kill(process)
    finally:
        if process.returncode is None:
            process.kill()

    async with running_gateway(tmp_path) as gw, gw.client() as client:
        history = await gw.sessions.history(KEY)
        assert history == acknowledged
        preview = await client.call("sessions.preview", {"keys": [KEY], "limit": 100})
        assert [item["text"] for item in preview["previews"][0]["items"]] == [
            f"message {i}" for i in range(25)
        ]
        entry = await gw.sessions.get(KEY)
        assert entry["messageCount"] == 25


async def test_appends_through_the_service_survive_sigkill_mid_stream(tmp_path: Path) -> None:
    process, lines, _ = await start_child(tmp_path, "loop")
    try:
        acknowledged = [await lines.next() for _ in range(60)]
        # The child is still appending while it dies.
        await kill(process)
    finally:
        if process.returncode is None:
            process.kill()

    async with running_gateway(tmp_path) as gw:
        history = await gw.sessions.history(LOOP_KEY, limit=10_000)
        stored_ids = [message["id"] for message in history]
        assert stored_ids[: len(acknowledged)] == acknowledged
        entry = await gw.sessions.get(LOOP_KEY)
        assert entry["messageCount"] == len(history)
