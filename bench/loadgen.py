"""Load generator for the ANIMA gateway and for its ceiling, ``bench/bare_server.py``.

It runs as its own process with its own trio loop, so it competes with the server for CPU
only as the operating system schedules it (``--cpu K`` pins it). Modes:

``rpc``
    N connections, each keeping M requests in flight (pipelined, matched by id) on a cheap
    method. Reports requests/s and latency percentiles.
``handshakes``
    N parallel clients, each repeatedly: open a socket, wait for the challenge, ``connect``
    (with ``--device``, signed with a per-process Ed25519 key), wait for ``hello-ok``,
    close. Reports handshakes/s and open-to-hello latency.
``idle``
    Opens N authenticated connections that only read, and reads the server's resident
    memory (``/proc/<--server-pid>/status`` VmRSS) before and after. Reports KiB/connection.
``fanout``
    N subscriber connections and one emitter that calls ``--emit-method`` with M in flight.
    Reports events named ``--event`` delivered per second (summed over subscribers) and any
    gap in each connection's ``seq``.

Every error (an ``ok:false`` response, an unexpected or undecodable frame, a failed or
dropped connection) is counted, and the first few messages are printed. The exit status is
0 when the run saw no error, 1 otherwise. ``--json`` prints exactly one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio
from session import (
    CONNECT_ID,
    GAP_SAMPLES_KEPT,
    DeviceIdentity,
    ErrorLog,
    Session,
    Target,
    describe,
    error_text,
    open_session,
)
from wsclient import CLIENT_KINDS, TransportClosed

MODES = ("rpc", "handshakes", "idle", "fanout")
DEFAULT_CONNECTIONS = {"rpc": 16, "handshakes": 8, "idle": 500, "fanout": 100}
DEFAULT_INFLIGHT = {"rpc": 8, "handshakes": 1, "idle": 1, "fanout": 4}
OPEN_CONCURRENCY = 64


@dataclass
class Window:
    """The measured interval, in ``time.perf_counter()`` seconds."""

    start: float
    end: float

    def contains(self, moment: float) -> bool:
        """Whether ``moment`` falls inside the window."""
        return self.start <= moment <= self.end


def trio_deadline(perf_moment: float) -> float:
    """Convert a ``perf_counter`` moment to trio's clock, for ``move_on_at``."""
    return trio.current_time() + (perf_moment - time.perf_counter())


async def sleep_until(perf_moment: float) -> None:
    """Sleep until the ``perf_counter`` clock reaches ``perf_moment``."""
    await trio.sleep(max(0.0, perf_moment - time.perf_counter()))


class StartGate:
    """Holds workers until all have connected (or failed), so setup is not measured."""

    def __init__(self, expected: int) -> None:
        self._expected = expected
        self.arrived = 0
        self.all_arrived = trio.Event()
        self.go = trio.Event()
        if expected == 0:
            self.all_arrived.set()

    def arrive(self) -> None:
        """Report one worker connected or failed; the last one opens the gate."""
        self.arrived += 1
        if self.arrived >= self._expected:
            self.all_arrived.set()


async def run_connected(
    target: Target,
    label: str,
    gate: StartGate,
    limiter: trio.CapacityLimiter,
    errors: ErrorLog,
    sessions: list[Session],
    body: Callable[[Session], Awaitable[None]],
) -> None:
    """Connect, wait at the gate, run ``body``, and always close (bounded in time)."""
    try:
        async with trio.open_nursery() as nursery:
            try:
                async with limiter:
                    with trio.fail_after(target.connect_timeout):
                        session = await open_session(target, nursery, label)
            except Exception as exc:
                errors.add(f"{label}: connect failed: {describe(exc)}")
                gate.arrive()
                return
            sessions.append(session)
            gate.arrive()
            try:
                await gate.go.wait()
                await body(session)
            except TransportClosed as exc:
                errors.add(f"{label}: {exc}")
            finally:
                with trio.CancelScope(shield=True):
                    await session.aclose()
                nursery.cancel_scope.cancel()
    except Exception as exc:
        errors.add(f"{label}: worker failed: {describe(exc)}")


class ServerGone(Exception):
    """The server process named by ``--server-pid`` cannot be read (it exited?)."""


def read_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from ``/proc/<pid>/status``."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError as exc:
        raise ServerGone(f"cannot read /proc/{pid}/status: {exc}") from None
    raise ServerGone(f"pid {pid} has no resident memory (a zombie: the server exited)")


def _process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, so utime (14) and stime (15) sit at 11, 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    """CPU seconds used so far by this process, the server and the whole machine."""

    wall: float
    client: float
    server: float | None
    machine: float | None


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent not idle since boot (``/proc/stat``), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Measures how busy the generator, the server and the machine were during the window.

    A generator near 100% of its core means the numbers measure the client, not the server;
    "other" CPU (machine minus both) means something else shared the machine.
    """

    def __init__(self, server_pid: int | None) -> None:
        self._server_pid = server_pid

    def sample(self) -> CpuSample:
        """Read all three counters now."""
        server = None
        if self._server_pid is not None:
            try:
                server = _process_cpu_seconds(self._server_pid)
            except OSError:
                server = None
        return CpuSample(time.perf_counter(), time.process_time(), server, machine_busy_seconds())

    @staticmethod
    def percentages(before: CpuSample, after: CpuSample) -> dict[str, float | None]:
        """CPU use across the interval, each in percent of one core."""
        wall = max(after.wall - before.wall, 1e-9)

        def share(start: float | None, end: float | None) -> float | None:
            if start is None or end is None:
                return None
            return round(100.0 * (end - start) / wall, 1)

        client = share(before.client, after.client)
        server = share(before.server, after.server)
        machine = share(before.machine, after.machine)
        other = None
        if machine is not None and client is not None and server is not None:
            other = round(max(0.0, machine - client - server), 1)
        return {
            "client_cpu_pct": client,
            "server_cpu_pct": server,
            "machine_cpu_pct": machine,
            "other_cpu_pct": other,
        }


def latency_summary(seconds: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean in milliseconds (nearest-rank percentiles)."""
    if not seconds:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(seconds)
    count = len(ordered)

    def rank(quantile: float) -> float:
        return round(ordered[max(0, math.ceil(quantile * count) - 1)] * 1000.0, 4)

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(ordered[-1] * 1000.0, 4),
        "mean": round(math.fsum(ordered) / count * 1000.0, 4),
    }


class RequestFactory:
    """Pre-encodes a request so each one costs a concatenation with its id."""

    def __init__(self, method: str, params: Any) -> None:
        self._head = (
            b'{"type":"req","method":'
            + msgspec.json.encode(method)
            + b',"params":'
            + msgspec.json.encode(params)
            + b',"id":"'
        )
        self._ids = itertools.count(int(CONNECT_ID) + 1)

    def make(self, sent_at: dict[str, float], count: int) -> list[bytes]:
        """Build ``count`` requests and note their send time in ``sent_at``."""
        now = time.perf_counter()
        batch = []
        for _ in range(count):
            request_id = str(next(self._ids))
            sent_at[request_id] = now
            batch.append(self._head + request_id.encode() + b'"}')
        return batch


@dataclass
class CallStats:
    """Completed calls and their latencies inside the window."""

    completed: int = 0
    latencies: list[float] = field(default_factory=list)
    events: int = 0


async def pipelined_calls(
    session: Session,
    factory: RequestFactory,
    inflight: int,
    window: Window,
    stats: CallStats,
    errors: ErrorLog,
    label: str,
) -> None:
    """Keep ``inflight`` requests outstanding on ``session`` until the window ends."""
    sent_at: dict[str, float] = {}
    with trio.move_on_at(trio_deadline(window.end)):
        await session.send_many(factory.make(sent_at, inflight))
        while True:
            frames = await session.receive_frames(errors)
            now = time.perf_counter()
            in_window = window.contains(now)
            answered = 0
            for frame in frames:
                if frame.type == "res":
                    started = sent_at.pop(frame.id, None) if frame.id is not None else None
                    if started is None:
                        errors.add(f"{label}: response for unknown id {frame.id!r}")
                        continue
                    answered += 1
                    if not frame.ok:
                        errors.add(f"{label}: request {frame.id} failed: {error_text(frame)}")
                    elif in_window:
                        stats.completed += 1
                        stats.latencies.append(now - started)
                elif frame.type == "evt":
                    stats.events += 1
                else:
                    errors.add(f"{label}: unexpected frame type {frame.type!r}")
            if answered:
                await session.send_many(factory.make(sent_at, answered))


async def run_rpc(args: argparse.Namespace, target: Target, meter: CpuMeter) -> dict[str, Any]:
    """``rpc`` mode: pipelined calls of a cheap method over N connections."""
    errors = ErrorLog()
    stats = CallStats()
    gate = StartGate(args.connections)
    limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)
    sessions: list[Session] = []
    factory = RequestFactory(args.method, args.params)
    window = Window(math.inf, math.inf)

    async def body(session: Session) -> None:
        await pipelined_calls(
            session, factory, args.inflight, window, stats, errors, session.seq.label
        )

    async with trio.open_nursery() as nursery:
        for index in range(args.connections):
            nursery.start_soon(
                run_connected, target, f"conn {index}", gate, limiter, errors, sessions, body
            )
        await gate.all_arrived.wait()
        now = time.perf_counter()
        window.start, window.end = now + args.warmup, now + args.warmup + args.duration
        gate.go.set()
        await sleep_until(window.start)
        before = meter.sample()
        await sleep_until(window.end)
        cpu = meter.percentages(before, meter.sample())
    return {
        "requests": stats.completed,
        "rps": round(stats.completed / args.duration, 1),
        "latency_ms": latency_summary(stats.latencies),
        "events_seen": stats.events,
        "errors": errors.count,
        "error_samples": errors.samples,
        **cpu,
    }


async def run_handshakes(
    args: argparse.Namespace, target: Target, meter: CpuMeter
) -> dict[str, Any]:
    """``handshakes`` mode: N clients connecting, authenticating and closing in a loop."""
    errors = ErrorLog()
    stats = CallStats()
    start = time.perf_counter()
    window = Window(start + args.warmup, start + args.warmup + args.duration)

    async def client_loop(index: int) -> None:
        label = f"client {index}"
        while time.perf_counter() < window.end:
            started = time.perf_counter()
            try:
                if target.client_kind == "trio-websocket":
                    async with trio.open_nursery() as nursery:
                        with trio.fail_after(target.connect_timeout):
                            session = await open_session(target, nursery, label)
                        opened = time.perf_counter()
                        await session.aclose()
                        nursery.cancel_scope.cancel()
                else:
                    # No nursery: the other clients run no background task, and a nursery
                    # per handshake is measurable client overhead.
                    with trio.fail_after(target.connect_timeout):
                        session = await open_session(target, None, label)
                    opened = time.perf_counter()
                    await session.aclose()
            except Exception as exc:
                errors.add(f"{label}: {describe(exc)}")
                await trio.sleep(0.01)
                continue
            if window.contains(time.perf_counter()):
                stats.completed += 1
                stats.latencies.append(opened - started)

    cpu: dict[str, float | None] = dict.fromkeys(
        ("client_cpu_pct", "server_cpu_pct", "machine_cpu_pct", "other_cpu_pct")
    )
    # Each iteration is bounded by connect_timeout plus the transport's close timeout.
    with trio.move_on_at(trio_deadline(window.end + target.connect_timeout + 2.0)):
        async with trio.open_nursery() as nursery:
            for index in range(args.connections):
                nursery.start_soon(client_loop, index)
            await sleep_until(window.start)
            before = meter.sample()
            await sleep_until(window.end)
            cpu = meter.percentages(before, meter.sample())
    return {
        "handshakes": stats.completed,
        "handshakes_per_s": round(stats.completed / args.duration, 1),
        "latency_ms": latency_summary(stats.latencies),
        "errors": errors.count,
        "error_samples": errors.samples,
        **cpu,
    }


async def drain_until(session: Session, stop: trio.Event, errors: ErrorLog) -> int:
    """Read and discard frames until ``stop`` is set; return how many events came."""
    events = 0

    async def reader() -> None:
        nonlocal events
        while True:
            for frame in await session.receive_frames(errors):
                if frame.type == "evt":
                    events += 1
                else:
                    errors.add(f"{session.seq.label}: unexpected {frame.type!r} frame")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await stop.wait()
        nursery.cancel_scope.cancel()
    return events


async def run_idle(args: argparse.Namespace, target: Target, meter: CpuMeter) -> dict[str, Any]:
    """``idle`` mode: the server's resident memory per authenticated, quiet connection."""
    errors = ErrorLog()
    gate = StartGate(args.connections)
    limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)
    sessions: list[Session] = []
    stop = trio.Event()
    events = 0
    rss_before = read_rss_kib(args.server_pid)

    async def body(session: Session) -> None:
        nonlocal events
        events += await drain_until(session, stop, errors)

    async with trio.open_nursery() as nursery:
        opening = time.perf_counter()
        for index in range(args.connections):
            nursery.start_soon(
                run_connected, target, f"conn {index}", gate, limiter, errors, sessions, body
            )
        await gate.all_arrived.wait()
        open_s = time.perf_counter() - opening
        gate.go.set()
        await trio.sleep(args.warmup)
        rss_settled = read_rss_kib(args.server_pid)
        before = meter.sample()
        await trio.sleep(args.duration)
        cpu = meter.percentages(before, meter.sample())
        rss_end = read_rss_kib(args.server_pid)
        stop.set()
    opened = len(sessions)
    per_connection = (rss_end - rss_before) / opened if opened else None
    return {
        "connections_open": opened,
        "open_s": round(open_s, 3),
        "rss_before_kib": rss_before,
        "rss_settled_kib": rss_settled,
        "rss_end_kib": rss_end,
        "kib_per_connection": round(per_connection, 2) if per_connection is not None else None,
        "events_seen": events,
        "errors": errors.count,
        "error_samples": errors.samples,
        **cpu,
    }


async def run_fanout(args: argparse.Namespace, target: Target, meter: CpuMeter) -> dict[str, Any]:
    """``fanout`` mode: one emitter's calls fanned out as events to N subscribers."""
    errors = ErrorLog()
    subscriber_gate = StartGate(args.connections)
    emitter_gate = StartGate(1)
    limiter = trio.CapacityLimiter(OPEN_CONCURRENCY)
    sessions: list[Session] = []
    emit_stats = CallStats()
    factory = RequestFactory(args.emit_method, args.emit_params)
    window = Window(math.inf, math.inf)
    delivered = 0
    without_seq = 0
    # Pausing between reads lets events pile up in the socket, so a subscriber wakes once per
    # batch instead of once per event; without it the generator saturates before the server.
    read_pause = args.read_pause_ms / 1000.0

    async def subscriber(session: Session) -> None:
        nonlocal delivered, without_seq
        with trio.move_on_at(trio_deadline(window.end)):
            while True:
                frames = await session.receive_frames(errors)
                in_window = window.contains(time.perf_counter())
                for frame in frames:
                    if frame.type != "evt":
                        errors.add(f"{session.seq.label}: unexpected {frame.type!r} frame")
                    elif frame.event == args.event:
                        if frame.seq is None:
                            without_seq += 1
                        if in_window:
                            delivered += 1
                if read_pause:
                    await trio.sleep(read_pause)

    async def emitter(session: Session) -> None:
        await pipelined_calls(
            session, factory, args.inflight, window, emit_stats, errors, "emitter"
        )

    async with trio.open_nursery() as nursery:
        for index in range(args.connections):
            nursery.start_soon(
                run_connected,
                *(target, f"sub {index}", subscriber_gate, limiter, errors, sessions, subscriber),
            )
        await subscriber_gate.all_arrived.wait()
        # The emitter connects last, so every subscriber is registered before the first emit.
        nursery.start_soon(
            run_connected, target, "emitter", emitter_gate, limiter, errors, sessions, emitter
        )
        await emitter_gate.all_arrived.wait()
        now = time.perf_counter()
        window.start, window.end = now + args.warmup, now + args.warmup + args.duration
        subscriber_gate.go.set()
        emitter_gate.go.set()
        await sleep_until(window.start)
        before = meter.sample()
        await sleep_until(window.end)
        cpu = meter.percentages(before, meter.sample())
    subscribers = sum(1 for session in sessions if session.seq.label != "emitter")
    expected = emit_stats.completed * subscribers
    if expected and not delivered:
        errors.add(
            f"no {args.event!r} event reached any of {subscribers} subscribers although"
            f" {emit_stats.completed} {args.emit_method!r} calls succeeded in the window"
        )
    gap_samples = [sample for session in sessions for sample in session.seq.samples]
    return {
        "subscribers": subscribers,
        "emits": emit_stats.completed,
        "emits_per_s": round(emit_stats.completed / args.duration, 1),
        "emit_latency_ms": latency_summary(emit_stats.latencies),
        "events": delivered,
        "events_per_s": round(delivered / args.duration, 1),
        "delivery_ratio": round(delivered / expected, 4) if expected else None,
        "events_without_seq": without_seq,
        "seq_gaps": sum(session.seq.gaps for session in sessions),
        "seq_missing": sum(session.seq.missing for session in sessions),
        "connections_with_gaps": sum(1 for session in sessions if session.seq.gaps),
        "gap_samples": gap_samples[:GAP_SAMPLES_KEPT],
        "errors": errors.count,
        "error_samples": errors.samples,
        **cpu,
    }


MODE_RUNNERS: dict[str, Callable[[argparse.Namespace, Target, CpuMeter], Awaitable[dict]]] = {
    "rpc": run_rpc,
    "handshakes": run_handshakes,
    "idle": run_idle,
    "fanout": run_fanout,
}


def build_target(args: argparse.Namespace) -> Target:
    """Turn ``--url``, ``--token``, ``--client`` and ``--device`` into a ``Target``."""
    parts = urlsplit(args.url)
    if parts.scheme != "ws" or not parts.hostname or parts.port is None:
        raise SystemExit(f"--url must look like ws://HOST:PORT[/path], got {args.url!r}")
    return Target(
        host=parts.hostname,
        port=parts.port,
        path=parts.path or "/",
        token=args.token,
        client_kind=args.client,
        device=DeviceIdentity() if args.device else None,
        connect_timeout=args.connect_timeout,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected mode and return its result with the run's settings attached."""
    target = build_target(args)
    settings = {
        "mode": args.mode,
        "url": args.url,
        "client": args.client,
        "connections": args.connections,
        "inflight": args.inflight,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "device": args.device,
        "method": args.emit_method if args.mode == "fanout" else args.method,
        "event": args.event if args.mode == "fanout" else None,
        "read_pause_ms": args.read_pause_ms if args.mode == "fanout" else None,
        "cpu": args.cpu,
        "server_pid": args.server_pid,
    }
    result = await MODE_RUNNERS[args.mode](args, target, CpuMeter(args.server_pid))
    return {**settings, **result}


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _latency_row(latency: dict[str, float | None]) -> str:
    return "  ".join(f"{name} {_fmt(latency[name])}" for name in ("p50", "p90", "p99", "max"))


def human_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The key figures of ``result`` as (label, value) rows for the terminal."""
    mode = result["mode"]
    shape = f"{result['connections']} connections"
    if mode in ("rpc", "fanout"):
        shape += f" x {result['inflight']} in flight"
    rows = [
        ("mode", f"{mode} ({result['client']} client, {shape})"),
        ("target", result["url"]),
        ("window", f"{result['duration_s']} s after {result['warmup_s']} s warm-up"),
    ]
    if mode == "rpc":
        rows += [
            ("method", result["method"]),
            ("requests/s", _fmt(result["rps"])),
            ("latency ms", _latency_row(result["latency_ms"])),
        ]
    elif mode == "handshakes":
        rows += [
            ("device", "Ed25519 signed" if result["device"] else "none (token only)"),
            ("handshakes/s", _fmt(result["handshakes_per_s"])),
            ("latency ms", _latency_row(result["latency_ms"])),
        ]
    elif mode == "idle":
        rows += [
            ("open", f"{result['connections_open']:,} in {result['open_s']} s"),
            (
                "server RSS",
                f"{_fmt(result['rss_before_kib'])} -> {_fmt(result['rss_end_kib'])} KiB",
            ),
            ("KiB/connection", _fmt(result["kib_per_connection"])),
        ]
    else:
        rows += [
            ("emitter", f"{result['method']}: {_fmt(result['emits_per_s'])} calls/s"),
            ("events/s", f"{_fmt(result['events_per_s'])} ({result['event']}, all subscribers)"),
            ("delivery", _fmt(result["delivery_ratio"])),
            (
                "seq gaps",
                f"{result['seq_gaps']} ({result['connections_with_gaps']} connections,"
                f" {result['seq_missing']} events missing)",
            ),
        ]
        rows += [("gap", sample) for sample in result["gap_samples"]]
    rows += [
        (
            "cpu (1 core=100%)",
            f"client {_percent(result['client_cpu_pct'])}"
            f"  server {_percent(result['server_cpu_pct'])}"
            f"  others {_percent(result['other_cpu_pct'])}",
        ),
        ("errors", _fmt(result["errors"])),
    ]
    rows += [("error", sample) for sample in result["error_samples"]]
    return rows


def print_report(result: dict[str, Any], as_json: bool) -> None:
    """Print one JSON object, or a table; error samples always reach a terminal."""
    if as_json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
        for sample in result["error_samples"]:
            print(f"loadgen error: {sample}", file=sys.stderr)
        return
    rows = human_rows(result)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def _json_argument(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; connection and in-flight defaults depend on the mode."""
    parser = argparse.ArgumentParser(
        description="Load generator for the ANIMA gateway (see bench/README.md).",
    )
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--url", required=True, help="ws://127.0.0.1:PORT")
    parser.add_argument(
        "--token", default=os.environ.get("ANIMA_GATEWAY_TOKEN", ""), help="auth.token"
    )
    parser.add_argument(
        "--connections", type=int, help=f"N (default per mode: {DEFAULT_CONNECTIONS})"
    )
    parser.add_argument("--inflight", type=int, help="M requests in flight per connection")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds first (idle: settle)"
    )
    parser.add_argument("--method", default="last-heartbeat", help="rpc: method to call")
    parser.add_argument("--params", type=_json_argument, default={}, help="rpc: params JSON")
    parser.add_argument("--device", action="store_true", help="sign connect with Ed25519")
    parser.add_argument("--server-pid", type=int, help="server pid for RSS and CPU readings")
    parser.add_argument("--emit-method", default="system-event", help="fanout: emitting method")
    # An instanceId makes each system-event a presence update, so presence.changed follows.
    parser.add_argument(
        "--emit-params",
        type=_json_argument,
        default={"text": "bench", "instanceId": "bench-emitter"},
        help="fanout: JSON",
    )
    parser.add_argument("--event", default="presence.changed", help="fanout: event to count")
    parser.add_argument(
        "--read-pause-ms",
        type=float,
        default=10.0,
        help="fanout: subscribers pause this long after each read, to read in batches",
    )
    parser.add_argument("--client", choices=CLIENT_KINDS, default="raw", help="client stack")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="per connection")
    parser.add_argument("--cpu", type=int, help="pin the generator to CPU K")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.connections is None:
        args.connections = DEFAULT_CONNECTIONS[args.mode]
    if args.inflight is None:
        args.inflight = DEFAULT_INFLIGHT[args.mode]
    if args.connections < 1 or args.inflight < 1:
        parser.error("--connections and --inflight must be at least 1")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    if args.client == "trio-websocket":
        # It hands over one message per receive, so a pause would cap each subscriber at
        # 1/pause messages per second instead of letting a batch pile up.
        args.read_pause_ms = 0.0
    if args.mode == "idle" and args.server_pid is None:
        parser.error("idle mode needs --server-pid to read the server's VmRSS")
    return args


def raise_open_file_limit() -> None:
    """Lift the soft descriptor limit to the hard one: idle runs hold many sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 for a clean run, 1 if any error was counted, 2 if it could not run."""
    args = parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    raise_open_file_limit()
    try:
        result = trio.run(run, args)
    except ServerGone as exc:
        print(f"loadgen: error: {exc}", file=sys.stderr)
        return 2
    print_report(result, args.json)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
