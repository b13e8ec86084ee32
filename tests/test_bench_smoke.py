"""Smoke test for the benchmark tools in bench/, run as the real processes they are.

``bench/bare_server.py`` is started once per stack on port 0; ``bench/loadgen.py`` then
runs each mode with tiny numbers and ``--json``. The checks are about shape and correctness
only (expected keys, zero errors, some throughput), never about speed: timing assertions
would make the suite flaky on a loaded machine, and the numbers belong in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from kernel import Gateway

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
TOKEN = "bench-smoke-token"
START_TIMEOUT_S = 15.0
LOADGEN_TIMEOUT_S = 30.0
COMMON_KEYS = {
    "mode",
    "url",
    "client",
    "connections",
    "errors",
    "error_samples",
    "client_cpu_pct",
    "server_cpu_pct",
}


@dataclass(frozen=True)
class BareServer:
    """The running bare server: where to connect and which pid to read memory from."""

    url: str
    pid: int


def _read_port(process: subprocess.Popen[bytes]) -> int:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(START_TIMEOUT_S):
            raise AssertionError("bare_server.py did not print its port in time")
    line = process.stdout.readline()
    assert line, f"bare_server.py exited with code {process.wait()}"
    return int(line)


@contextmanager
def running_bare_server(stack: str, log_dir: Path) -> Iterator[BareServer]:
    """Run bare_server.py with ``--stack stack`` on a free port; always terminate it."""
    command = [sys.executable, str(BENCH_DIR / "bare_server.py"), "--port", "0"]
    command += ["--stack", stack, "--token", TOKEN]
    with (log_dir / f"bare_server-{stack}.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
    try:
        port = _read_port(process)
        yield BareServer(f"ws://127.0.0.1:{port}", process.pid)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareServer]:
    """The trio-websocket bare server, shared by the module."""
    with running_bare_server("trio-websocket", tmp_path_factory.mktemp("bench")) as server:
        yield server


@pytest.fixture(scope="module")
def wsproto_bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareServer]:
    """The bare server on wsproto directly, shared by the module."""
    with running_bare_server("wsproto", tmp_path_factory.mktemp("bench")) as server:
        yield server


def loadgen_command(url: str, token: str, pid: int, *args: str) -> list[str]:
    """The loadgen.py command line for one ``--json`` run against ``url``."""
    command = [sys.executable, str(BENCH_DIR / "loadgen.py"), *args, "--url", url]
    return [*command, f"--token={token}", "--server-pid", str(pid), "--json"]


def run_loadgen(server: BareServer, *args: str) -> dict[str, Any]:
    """Run loadgen.py with ``--json``; return its single JSON object."""
    completed = subprocess.run(
        loadgen_command(server.url, TOKEN, server.pid, *args),
        capture_output=True,
        timeout=LOADGEN_TIMEOUT_S,
        check=False,
        env=LOADGEN_ENV,
    )
    return parse_loadgen_output(completed)


def parse_loadgen_output(completed: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The single JSON object of a finished loadgen run, which must have counted no error."""
    stdout = completed.stdout.decode()
    assert completed.returncode == 0, (
        f"loadgen exited {completed.returncode}\nstdout: {stdout}\n"
        f"stderr: {completed.stderr.decode()}"
    )
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one JSON line, got: {stdout!r}"
    result = json.loads(lines[0])
    missing = COMMON_KEYS - result.keys()
    assert not missing, f"result lacks {sorted(missing)}"
    assert result["errors"] == 0, result["error_samples"]
    assert result["error_samples"] == []
    return result


TINY = ("--duration", "0.5", "--warmup", "0.1")
LOADGEN_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.mark.parametrize("client", ["raw", "wsproto", "trio-websocket"])
def test_rpc_answers_every_request(bare_server: BareServer, client: str) -> None:
    """Every client transport gets all pipelined requests answered."""
    result = run_loadgen(
        bare_server, "rpc", "--connections", "2", "--inflight", "4", "--client", client, *TINY
    )
    assert result["mode"] == "rpc"
    assert result["client"] == client
    assert result["requests"] > 0
    assert result["rps"] > 0
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["max"]


@pytest.mark.parametrize("device", [False, True], ids=["token", "ed25519"])
def test_handshakes_complete(bare_server: BareServer, device: bool) -> None:
    """Handshakes complete with a token, and with a signed Ed25519 device block."""
    extra = ("--device",) if device else ()
    result = run_loadgen(bare_server, "handshakes", "--connections", "2", *extra, *TINY)
    assert result["device"] is device
    assert result["handshakes"] > 0
    assert result["handshakes_per_s"] > 0
    assert result["latency_ms"]["p99"] is not None


def test_fanout_delivers_every_event_in_order(bare_server: BareServer) -> None:
    """Every subscriber sees the broadcasts, with per-connection seq and no gaps."""
    result = run_loadgen(
        bare_server,
        "fanout",
        "--connections",
        "3",
        "--inflight",
        "2",
        "--read-pause-ms",
        "1",
        *TINY,
    )
    assert result["subscribers"] == 3
    assert result["emits"] > 0
    assert result["events"] > 0
    assert result["events_per_s"] > 0
    assert result["events_without_seq"] == 0
    assert result["seq_gaps"] == 0
    assert result["connections_with_gaps"] == 0


def test_idle_reads_server_memory(bare_server: BareServer) -> None:
    """Idle mode holds every connection and reads the server's VmRSS."""
    result = run_loadgen(
        bare_server, "idle", "--connections", "20", "--duration", "0.2", "--warmup", "0.2"
    )
    assert result["connections_open"] == 20
    assert result["rss_before_kib"] > 0
    assert result["rss_end_kib"] > 0
    assert result["kib_per_connection"] is not None


@pytest.mark.parametrize(
    "mode_args",
    [
        ("rpc", "--connections", "2", "--inflight", "4"),
        ("handshakes", "--connections", "2", "--device"),
        ("fanout", "--connections", "3", "--read-pause-ms", "1"),
        ("idle", "--connections", "20"),
    ],
    ids=["rpc", "handshakes-device", "fanout", "idle"],
)
def test_wsproto_stack_serves_every_mode(
    wsproto_bare_server: BareServer, mode_args: tuple[str, ...]
) -> None:
    """The wsproto bare server answers every mode as the trio-websocket one does."""
    result = run_loadgen(wsproto_bare_server, *mode_args, *TINY)
    headline = {
        "rpc": "requests",
        "handshakes": "handshakes",
        "fanout": "events",
        "idle": "connections_open",
    }[result["mode"]]
    assert result[headline] > 0
    assert result.get("seq_gaps", 0) == 0


@pytest.mark.parametrize(
    ("mode_args", "headline"),
    [
        (("rpc", "--connections", "2", "--inflight", "4"), "requests"),
        (("handshakes", "--connections", "2", "--device"), "handshakes"),
        (("fanout", "--connections", "3", "--inflight", "2", "--read-pause-ms", "1"), "events"),
    ],
    ids=["rpc", "handshakes-device", "fanout"],
)
async def test_every_mode_runs_clean_against_the_gateway(
    gateway: Gateway, gateway_token: str, mode_args: tuple[str, ...], headline: str
) -> None:
    """The default scenarios work against the real gateway, not only the bare server.

    The gateway runs in this test's trio loop and the generator in its own process, as in
    run_all.py; fan-out must deliver the events its default emitter params announce.
    """
    url = f"ws://127.0.0.1:{gateway.port}"
    command = loadgen_command(url, gateway_token, os.getpid(), *mode_args, *TINY)
    with trio.fail_after(LOADGEN_TIMEOUT_S):
        completed = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, env=LOADGEN_ENV
        )

    result = parse_loadgen_output(completed)

    assert result[headline] > 0
    assert result.get("seq_gaps", 0) == 0
