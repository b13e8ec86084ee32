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
import base64
import hashlib
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
from wsclient import (
    CLIENT_KINDS,
    HandshakeFailed,
    MessageTransport,
    TransportClosed,
    open_transport,
)

MODES = ("rpc", "handshakes", "idle", "fanout")
DEFAULT_CONNECTIONS = {"rpc": 16, "handshakes": 8, "idle": 500, "fanout": 100}
DEFAULT_INFLIGHT = {"rpc": 8, "handshakes": 1, "idle": 1, "fanout": 4}
CLIENT_INFO = {"id": "test", "version": "bench", "platform": "linux", "mode": "test"}
ROLE = "operator"
SCOPES = ["operator.admin", "operator.read", "operator.write"]
CONNECT_ID = "1"
ERROR_SAMPLES_KEPT = 5
GAP_SAMPLES_KEPT = 5
OPEN_CONCURRENCY = 64


class Frame(msgspec.Struct):
    """Any server frame; payload and error stay raw until someone needs them."""

    type: str
    id: str | None = None
    ok: bool | None = None
    event: str | None = None
    seq: int | None = None
    payload: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()


class ChallengePayload(msgspec.Struct):
    """``connect.challenge`` payload: only the nonce matters here."""

    nonce: str


class HelloPayload(msgspec.Struct):
    """The one field of ``hello-ok`` the generator checks."""

    type: str


_frame_decoder = msgspec.json.Decoder(Frame)
_challenge_decoder = msgspec.json.Decoder(ChallengePayload)
_hello_decoder = msgspec.json.Decoder(HelloPayload)


class SessionFailed(Exception):
    """The gateway handshake (challenge, connect, hello-ok) did not complete."""


class ErrorLog:
    """Counts every error and keeps the first few messages, so no error goes unseen."""

    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.samples) < ERROR_SAMPLES_KEPT:
            self.samples.append(message)


class SeqTracker:
    """Checks that one connection's event ``seq`` numbers rise by exactly one."""

    __slots__ = ("gaps", "label", "last", "missing", "samples")

    def __init__(self, label: str) -> None:
        self.label = label
        self.last: int | None = None
        self.gaps = 0
        self.missing = 0
        self.samples: list[str] = []

    def observe(self, seq: int) -> None:
        last = self.last
        if last is not None and seq != last + 1:
            self.gaps += 1
            if seq > last:
                self.missing += seq - last - 1
            if len(self.samples) < GAP_SAMPLES_KEPT:
                self.samples.append(f"{self.label}: expected seq {last + 1}, got {seq}")
        self.last = seq


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DeviceIdentity:
    """A fresh Ed25519 key for this process that signs v2 ``connect`` payloads."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.device_id = hashlib.sha256(raw).hexdigest()
        self.public_key = _b64url(raw)

    def connect_block(self, nonce: str, token: str) -> dict[str, Any]:
        """Build ``params.device`` for this connection's challenge ``nonce``."""
        signed_at = int(time.time() * 1000)
        signed = "|".join(
            (
                "v2",
                self.device_id,
                CLIENT_INFO["id"],
                CLIENT_INFO["mode"],
                ROLE,
                ",".join(SCOPES),
                str(signed_at),
                token,
                nonce,
            )
        )
        return {
            "id": self.device_id,
            "publicKey": self.public_key,
            "signature": _b64url(self._key.sign(signed.encode())),
            "signedAt": signed_at,
            "nonce": nonce,
        }


@dataclass(frozen=True)
class Target:
    """Where and how to connect."""

    host: str
    port: int
    path: str
    token: str
    client_kind: str
    device: DeviceIdentity | None
    connect_timeout: float


def describe(exc: BaseException) -> str:
    """One line for an exception, unwrapping single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, TransportClosed | SessionFailed | HandshakeFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def error_text(frame: Frame) -> str:
    """The ``error`` of an ``ok:false`` response as ``code=... message``."""
    try:
        error = msgspec.json.decode(frame.error) if frame.error else None
    except msgspec.DecodeError:
        error = None
    if isinstance(error, dict):
        reason = f" ({error['reason']})" if "reason" in error else ""
        return f"code={error.get('code')!r}{reason} {error.get('message')!r}"
    return f"no usable error object: {bytes(frame.error)[:120]!r}"


def _clip(message: bytes | str) -> str:
    return repr(message[:160])


class Session:
    """An authenticated connection: transport, unread frames and the ``seq`` tracker."""

    def __init__(self, transport: MessageTransport, unread: list[bytes | str], label: str) -> None:
        self.transport = transport
        self._unread = unread
        self.seq = SeqTracker(label)

    async def send_many(self, messages: list[bytes]) -> None:
        await self.transport.send_many(messages)

    async def receive_frames(self, errors: ErrorLog) -> list[Frame]:
        """Decode the next batch of frames; undecodable ones are logged as errors."""
        if self._unread:
            messages, self._unread = self._unread, []
        else:
            messages = await self.transport.receive_many()
        frames = []
        for message in messages:
            try:
                frame = _frame_decoder.decode(message)
            except msgspec.DecodeError as exc:
                errors.add(f"undecodable frame ({exc}): {_clip(message)}")
                continue
            if frame.type == "evt" and frame.seq is not None:
                self.seq.observe(frame.seq)
            frames.append(frame)
        return frames

    async def aclose(self) -> None:
        await self.transport.aclose()


async def _next_message(transport: MessageTransport, inbox: list[bytes | str]) -> bytes | str:
    if not inbox:
        inbox.extend(await transport.receive_many())
    return inbox.pop(0)


async def open_session(target: Target, nursery: trio.Nursery, label: str) -> Session:
    """Open a socket and run the gateway handshake up to ``hello-ok``."""
    transport = await open_transport(
        target.client_kind, target.host, target.port, target.path, nursery
    )
    try:
        inbox: list[bytes | str] = []
        first = await _next_message(transport, inbox)
        challenge = _frame_decoder.decode(first)
        if challenge.type != "evt" or challenge.event != "connect.challenge":
            raise SessionFailed(f"expected connect.challenge, got {_clip(first)}")
        nonce = _challenge_decoder.decode(challenge.payload).nonce
        params: dict[str, Any] = {
            "minProtocol": 3,
            "maxProtocol": 3,
            "client": CLIENT_INFO,
            "role": ROLE,
            "scopes": SCOPES,
            "auth": {"token": target.token},
        }
        if target.device is not None:
            params["device"] = target.device.connect_block(nonce, target.token)
        request = {"type": "req", "id": CONNECT_ID, "method": "connect", "params": params}
        await transport.send_many([msgspec.json.encode(request)])
        while True:
            message = await _next_message(transport, inbox)
            frame = _frame_decoder.decode(message)
            if frame.type == "res" and frame.id == CONNECT_ID:
                if not frame.ok:
                    raise SessionFailed(f"connect rejected: {error_text(frame)}")
                hello_type = _hello_decoder.decode(frame.payload).type
                if hello_type != "hello-ok":
                    raise SessionFailed(f"connect answered with payload type {hello_type!r}")
                return Session(transport, inbox, label)
            if frame.type != "evt":
                raise SessionFailed(f"unexpected frame before hello-ok: {_clip(message)}")
    except msgspec.DecodeError as exc:
        with trio.CancelScope(shield=True):
            await transport.aclose()
        raise SessionFailed(f"undecodable handshake frame: {exc}") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await transport.aclose()
        raise


@dataclass
class Window:
    """The measured interval, in ``time.perf_counter()`` seconds."""

    start: float
    end: float

    def contains(self, moment: float) -> bool:
        return self.start <= moment <= self.end


def trio_deadline(perf_moment: float) -> float:
    """Convert a ``perf_counter`` moment to trio's clock, for ``move_on_at``."""
    return trio.current_time() + (perf_moment - time.perf_counter())


async def sleep_until(perf_moment: float) -> None:
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


def read_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS line for pid {pid}")


def _process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, so utime (14) and stime (15) sit at 11, 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    """CPU seconds used so far by this process and by the server, at one moment."""

    wall: float
    client: float
    server: float | None


class CpuMeter:
    """Measures how busy the generator and the server were during the window.

    A generator near 100% of its core means the numbers measure the client, not the server.
    """

    def __init__(self, server_pid: int | None) -> None:
        self._server_pid = server_pid

    def sample(self) -> CpuSample:
        server = None
        if self._server_pid is not None:
            try:
                server = _process_cpu_seconds(self._server_pid)
            except OSError:
                server = None
        return CpuSample(time.perf_counter(), time.process_time(), server)

    @staticmethod
    def percentages(before: CpuSample, after: CpuSample) -> dict[str, float | None]:
        wall = max(after.wall - before.wall, 1e-9)
        server = None
        if before.server is not None and after.server is not None:
            server = round(100.0 * (after.server - before.server) / wall, 1)
        return {
            "client_cpu_pct": round(100.0 * (after.client - before.client) / wall, 1),
            "server_cpu_pct": server,
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
                async with trio.open_nursery() as nursery:
                    with trio.fail_after(target.connect_timeout):
                        session = await open_session(target, nursery, label)
                    opened = time.perf_counter()
                    await session.aclose()
                    nursery.cancel_scope.cancel()
            except Exception as exc:
                errors.add(f"{label}: {describe(exc)}")
                await trio.sleep(0.01)
                continue
            if window.contains(time.perf_counter()):
                stats.completed += 1
                stats.latencies.append(opened - started)

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
            "cpu",
            f"client {_fmt(result['client_cpu_pct'], '%')}"
            f"  server {_fmt(result['server_cpu_pct'], '%')}",
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
    parser.add_argument(
        "--emit-params", type=_json_argument, default={"text": "bench"}, help="fanout: JSON"
    )
    parser.add_argument("--event", default="presence.changed", help="fanout: event to count")
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
    if args.mode == "idle" and args.server_pid is None:
        parser.error("idle mode needs --server-pid to read the server's VmRSS")
    return args


def raise_open_file_limit() -> None:
    """Lift the soft descriptor limit to the hard one: idle runs hold many sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns 0 for a clean run, 1 if any error was counted."""
    args = parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    raise_open_file_limit()
    result = trio.run(run, args)
    print_report(result, args.json)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
