"""Real processes: a gateway killed mid-run, and ``anima-gateway chat`` driven over pipes.

The gateway runs as ``anima-gateway run`` (installed plugins, port 0); the model is the fake
LLM server in this test process, so a test can hold an answer half-way and look at what the
gateway has done by then.
"""

from __future__ import annotations

import signal
import subprocess

import trio
from chat_testkit import (
    ANIMA_GATEWAY,
    SESSION,
    TEXTS,
    add_key,
    chat_plugins,
    gateway_process,
    send,
)
from fake_llm_server import RecordedRequest, Reply, openai_chunks

from kernel import open_client

KEY = "sk-process-test-0123456789abcdef"


def openai_config(base_url: str) -> str:
    return f'[plugins.providers.openai]\nbaseUrl = "{base_url}/v1"\nmodel = "gpt-test"\n'


async def test_killing_the_gateway_mid_run_loses_no_acknowledged_message(
    state_dir, gateway_token, llm, start_gateway
) -> None:
    hold = trio.Event()  # never set: the first answer stops half-way
    llm.route("POST", "/v1/chat/completions", Reply(body=[*openai_chunks(TEXTS)[:2], hold]))
    async with (
        gateway_process(state_dir, gateway_token, openai_config(llm.base_url)) as gw,
        open_client(gw.url, token=gateway_token) as client,
    ):
        await add_key(client, "openai", KEY)
        first = await send(client, "doomed", "remember me")
        assert first["status"] == "started"
        with trio.fail_after(30):
            await client.next_event("chat.delta")
        # Queued behind the first run in the session lane, acknowledged all the same.
        for n in range(3):
            ack = await send(client, f"queued-{n}", f"and me {n}")
            assert ack["status"] == "started"
        gw.process.send_signal(signal.SIGKILL)
        with trio.fail_after(30):
            await gw.process.wait()
    assert gw.process.returncode == -signal.SIGKILL

    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as restarted,
        open_client(f"ws://127.0.0.1:{restarted.port}", token=gateway_token) as c,
    ):
        history = await c.call("chat.history", {"sessionKey": SESSION})
        users = [(m["runId"], m["text"]) for m in history["messages"] if m["role"] == "user"]
        assert users == [
            ("doomed", "remember me"),
            ("queued-0", "and me 0"),
            ("queued-1", "and me 1"),
            ("queued-2", "and me 2"),
        ]
        # The key the operator added survived too.
        described = await c.call("anima.providers.get", {"provider": "openai"})
        assert described["providers"][0]["keyCount"] == 1


class Output:
    """Everything a child process printed so far, read on demand."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.data = b""

    async def until(self, marker: bytes, *, after: int = 0) -> int:
        """Read until ``marker`` appears at or after ``after``; return where it ends."""
        with trio.fail_after(30):
            while (found := self.data.find(marker, after)) < 0:
                chunk = await self.stream.receive_some()
                assert chunk, f"output ended without {marker!r}: {self.data!r}"
                self.data += chunk
        return found + len(marker)


async def test_the_chat_command_streams_answers_and_ctrl_c_aborts_only_the_run(
    state_dir, gateway_token, llm
) -> None:
    gates: list[trio.Event] = []

    def answer(request: RecordedRequest) -> Reply:
        gate = trio.Event()
        gates.append(gate)
        pieces = openai_chunks(TEXTS)
        return Reply(body=[*pieces[:2], gate, *pieces[2:]])

    llm.route("POST", "/v1/chat/completions", answer)
    session = "agent:main:terminal"
    async with (
        gateway_process(state_dir, gateway_token, openai_config(llm.base_url)) as gw,
        open_client(gw.url, token=gateway_token) as admin,
    ):
        await add_key(admin, "openai", KEY)
        cli = await trio.lowlevel.open_process(
            [ANIMA_GATEWAY, "chat", "--url", gw.url, "--session", session],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"ANIMA_GATEWAY_TOKEN": gateway_token, "PATH": "/usr/bin:/bin"},
        )
        try:
            assert cli.stdin is not None and cli.stdout is not None
            out = Output(cli.stdout)
            await cli.stdin.send_all("first question ✓\n".encode())
            # The first piece shows while the server still holds the rest: it streams.
            mark = await out.until(b"openai> " + TEXTS[0].encode())
            assert b"[openai/" not in out.data
            gates[0].set()
            mark = await out.until(b"[openai/gpt-test: 11 in, 7 out]\n", after=mark)
            assert "".join(TEXTS).encode() in out.data

            await cli.stdin.send_all(b"second question\n")
            mark = await out.until(b"openai> " + TEXTS[0].encode(), after=mark)
            cli.send_signal(signal.SIGINT)
            mark = await out.until(b"[aborted: rpc]\n", after=mark)
            with trio.fail_after(10):
                await llm.client_gone.wait()
            assert cli.returncode is None, "Ctrl-C must abort the run, not the program"

            await cli.stdin.send_all(b"third\n")
            await out.until(b"openai> " + TEXTS[0].encode(), after=mark)
            gates[2].set()
            await out.until(b"[openai/gpt-test: 11 in, 7 out]\n", after=mark)
            await cli.stdin.aclose()  # Ctrl-D
            with trio.fail_after(30):
                assert await cli.wait() == 0
        finally:
            if cli.returncode is None:
                cli.kill()
                await cli.wait()

        history = await admin.call("chat.history", {"sessionKey": session})
        assert [(m["role"], m.get("stopReason")) for m in history["messages"]] == [
            ("user", None),
            ("assistant", "stop"),
            ("user", None),
            ("assistant", "aborted"),
            ("user", None),
            ("assistant", "stop"),
        ]
        assert history["messages"][0]["text"] == "first question ✓"
        assert history["messages"][3]["text"] == TEXTS[0]


async def test_the_chat_command_reports_an_unreachable_gateway(gateway_token) -> None:
    result = await trio.run_process(
        [ANIMA_GATEWAY, "chat", "--url", "ws://127.0.0.1:9", "--token", gateway_token],
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    assert b"cannot reach ws://127.0.0.1:9" in result.stderr
