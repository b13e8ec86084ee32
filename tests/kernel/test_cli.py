"""``anima-gateway`` as an operator runs it: real processes, real sockets, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path

import pytest
import trio

from kernel import Gateway, open_client
from kernel.cli import DEFAULT_URL

TOKEN = "cli-test-token"
_script = Path(sys.executable).with_name("anima-gateway")
ANIMA = [str(_script)] if _script.exists() else [sys.executable, "-m", "kernel.cli"]


def _env(state_dir: Path, *, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMA_")}
    env["ANIMA_STATE_DIR"] = str(state_dir)
    env["ANIMA_LOG_LEVEL"] = "WARNING"
    if token is not None:
        env["ANIMA_GATEWAY_TOKEN"] = token
    return env


class RunningGateway:
    def __init__(self, process: trio.Process, screen: str, url: str) -> None:
        self.process = process
        self.screen = screen
        self.url = url


@asynccontextmanager
async def run_gateway(state_dir: Path, *args: str, token: str | None = TOKEN):
    """``anima-gateway run --port 0`` in a child process, until its first screen is out."""
    log = open(state_dir.parent / "run.log", "wb")  # noqa: SIM115 - closed below
    process = await trio.lowlevel.open_process(
        [*ANIMA, "run", "--port", "0", "--state-dir", str(state_dir), *args],
        stdout=subprocess.PIPE,
        stderr=log,
        env=_env(state_dir, token=token),
    )
    try:
        screen = b""
        with trio.fail_after(20):
            while b"try:" not in screen:
                chunk = await process.stdout.receive_some()
                assert chunk, f"gateway exited before its first screen: {screen!r}"
                screen += chunk
        text = screen.decode()
        match = re.search(r"url:\s+(ws://\S+)", text)
        assert match, text
        yield RunningGateway(process, text, match.group(1))
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5):
            await process.wait()
        log.close()


async def anima(*args: str, state_dir: Path, token: str | None = TOKEN):
    """Run one ``anima-gateway`` command to completion."""
    with trio.fail_after(30):
        return await trio.run_process(
            [*ANIMA, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_env(state_dir, token=token),
        )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


async def test_run_on_port_0_shows_the_real_port_and_call_answers(state_dir):
    async with run_gateway(state_dir) as gateway:
        port = int(gateway.url.rsplit(":", 1)[1])
        assert port != 0
        assert "auth:     token" in gateway.screen
        assert "health" in gateway.screen.split("plugins:", 1)[1]

        health = await anima("call", "health", "--url", gateway.url, "--token", TOKEN,
                             state_dir=state_dir)  # fmt: skip
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout)["ok"] is True

        probe = await anima(
            "call", "health", "--params", '{"probe": true}', "--url", gateway.url,
            "--token", TOKEN, state_dir=state_dir,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout)["heartbeat"]["lastStatus"] == "ok"


async def test_call_exits_non_zero_with_the_error_as_json(state_dir):
    async with run_gateway(state_dir) as gateway:
        unknown = await anima("call", "no.such.method", "--url", gateway.url, "--token", TOKEN,
                              state_dir=state_dir)  # fmt: skip
        assert unknown.returncode != 0
        error = json.loads(unknown.stderr)
        assert error["code"] == 404
        assert error["reason"] == "NOT_FOUND"
        assert unknown.stdout == b""

        bad = await anima(
            "call", "set-heartbeats", "--params", '{"intervalMs": "soon"}',
            "--url", gateway.url, "--token", TOKEN, state_dir=state_dir,
        )  # fmt: skip
        assert bad.returncode != 0
        error = json.loads(bad.stderr)
        assert error["code"] == 400
        assert error["details"] == {"field": "intervalMs"}

        refused = await anima("call", "health", "--url", gateway.url, "--token", "wrong",
                              state_dir=state_dir)  # fmt: skip
        assert refused.returncode != 0
        assert b"refused" in refused.stderr

        not_json = await anima("call", "health", "--params", "{oops", "--url", gateway.url,
                               state_dir=state_dir)  # fmt: skip
        assert not_json.returncode != 0
        assert b"--params" in not_json.stderr


async def test_generated_token_is_named_on_the_first_screen_and_found_by_call(state_dir):
    async with run_gateway(state_dir, token=None) as gateway:
        token_file = state_dir / "gateway.token"
        assert f"token:    in {token_file} (generated now)" in gateway.screen
        # No --token and no env: call reads the token file in the state directory.
        health = await anima("call", "health", "--url", gateway.url, "--state-dir",
                             str(state_dir), state_dir=state_dir, token=None)  # fmt: skip
        assert health.returncode == 0, health.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_run_cleanly_after_telling_clients(state_dir, signum):
    async with run_gateway(state_dir) as gateway:
        async with open_client(gateway.url, token=TOKEN) as client:
            gateway.process.send_signal(signum)
            with trio.fail_after(15):
                shutdown = await client.next_event("shutdown")
                assert shutdown["payload"]["reason"]
                code = await gateway.process.wait()
        assert code == 0
        assert client.ws.closed is not None and client.ws.closed.code == 1012


async def test_run_takes_its_config_file_and_host_from_the_command_line(state_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text('[gateway]\nhost = "192.0.2.1"\n[gateway.limits]\ntickIntervalMs = 4321\n')
    # The file's host is one this machine does not have: --host must win for run to start.
    async with run_gateway(state_dir, "--config", str(elsewhere), "--host", "127.0.0.1") as gateway:
        assert gateway.url.startswith("ws://127.0.0.1:")
        assert f"config:   {elsewhere}" in gateway.screen
        async with open_client(gateway.url, token=TOKEN) as client:
            assert client.hello["policy"]["tickIntervalMs"] == 4321


def test_run_defaults_to_loopback_port_18789_and_call_to_match(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMA_STATE_DIR", str(tmp_path))
    gateway = Gateway()
    gateway.prepare()
    assert (gateway.config.gateway.host, gateway.config.gateway.port) == ("127.0.0.1", 18789)
    limits = gateway.config.gateway.limits
    assert (limits.max_payload, limits.max_buffered_bytes, limits.tick_interval_ms) == (
        8 * 1024 * 1024,
        16 * 1024 * 1024,
        30_000,
    )
    assert DEFAULT_URL == "ws://127.0.0.1:18789"


async def test_run_with_a_bad_config_exits_naming_the_key(state_dir):
    (state_dir / "config.toml").write_text('[gateway]\nport = "high"\n')
    result = await anima("run", "--state-dir", str(state_dir), state_dir=state_dir)
    assert result.returncode == 2
    assert b"gateway.port" in result.stderr
    assert b"Traceback" not in result.stderr


async def test_run_on_a_taken_port_says_so(state_dir):
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await anima("run", "--port", str(port), "--state-dir", str(state_dir),
                             state_dir=state_dir)  # fmt: skip
    assert result.returncode == 2
    assert b"cannot listen" in result.stderr
    assert b"Traceback" not in result.stderr


async def test_plugins_lists_health_with_its_methods(state_dir):
    result = await anima("plugins", "--state-dir", str(state_dir), state_dir=state_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("health "))
    header, methods, events = lines[start : start + 3]
    assert header == f"health {metadata.version('anima-gateway')} (enabled)"
    for method in ("health", "status", "last-heartbeat", "system-presence", "set-heartbeats"):
        assert method in methods
    assert methods.lstrip().startswith("methods:")
    assert "health.changed" in events and "presence.changed" in events

    listed = await anima("plugins", "--json", "--state-dir", str(state_dir), state_dir=state_dir)
    (health,) = [p for p in json.loads(listed.stdout) if p["name"] == "health"]
    assert health["enabled"] is True and "system-event" in health["methods"]


async def test_plugins_shows_a_disabled_plugin(state_dir):
    (state_dir / "config.toml").write_text("[plugins.health]\nenabled = false\n")
    result = await anima("plugins", "--json", "--state-dir", str(state_dir), state_dir=state_dir)
    assert result.returncode == 0, result.stderr
    (health,) = [p for p in json.loads(result.stdout) if p["name"] == "health"]
    assert health["enabled"] is False
    assert health["state"] == "disabled"
