"""One client connection after its handshake: reading requests, running them, writing frames.

Each connection is one trio task tree: a reader, a writer fed by a bounded memory channel,
and request workers (at most ``limits.maxInFlight``). Everything sent goes through the
writer, so a slow client backs up only its own channel. Events are queued without waiting;
when a client's unsent bytes pass ``maxBufferedBytes`` droppable events are skipped for it
and any other event closes it as a slow consumer.

Logger ``kernel.connection``: DEBUG lines carry the connection id; nothing at INFO per frame.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import trio

from .call import Call
from .errors import GatewayError
from .frames import (
    ClientInfo,
    RequestFrame,
    ResponseFrame,
    decode_params,
    decode_request,
    encode_frame,
    error_shape,
)
from .specs import MethodSpec, missing_permission
from .websocket import ServerWebSocket, WebSocketClosed

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["CLOSE_POLICY", "ConnectionInfo"]

logger = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_RESTART = 1012

_WRITE_QUEUE_FRAMES = 4096
_WRITE_BATCH_BYTES = 256 * 1024
_CLOSE_TIMEOUT_S = 2.0


@dataclass(slots=True, eq=False)
class ConnectionInfo:
    """Who is on a connection, as plugins see it. Plugins must treat it as read-only."""

    conn_id: str
    role: str
    scopes: frozenset[str]
    client: ClientInfo
    remote_ip: str | None
    is_local: bool
    connected_at_ms: int
    auth_method: str
    device_id: str | None = None
    caps: frozenset[str] = frozenset()
    commands: tuple[str, ...] = ()
    #: The event names this connection may receive, fixed at the handshake.
    allowed_events: frozenset[str] = field(default=frozenset(), repr=False)


class SlowConsumer(Exception):
    pass


class Connection:
    """The kernel's side of one handshaken client."""

    def __init__(self, gateway: Gateway, ws: ServerWebSocket, info: ConnectionInfo) -> None:
        self.gateway = gateway
        self.ws = ws
        self.info = info
        self.seq = 0
        self.buffered_bytes = 0
        self.in_flight = 0
        self.idle = trio.Event()
        self.idle.set()
        self._max_buffered = gateway.config.gateway.limits.max_buffered_bytes
        self._max_workers = gateway.config.gateway.limits.max_in_flight
        self._workers = 0
        self._outbox_send, self._outbox_receive = trio.open_memory_channel[bytes](
            _WRITE_QUEUE_FRAMES
        )
        # Made with the first worker: most connections only ever call quick methods.
        self._requests: (
            tuple[trio.MemorySendChannel[RequestFrame], trio.MemoryReceiveChannel[RequestFrame]]
            | None
        ) = None
        self._nursery: trio.Nursery | None = None
        self._close_code: int | None = None
        self._close_reason = ""
        self._discard_outbox = False
        #: The hello-ok payload, built during the handshake.
        self.hello: object = None

    # -- sending ---------------------------------------------------------------------------

    def send_event_frame(self, prefix: bytes, droppable: bool) -> bool:
        """Queue an event whose encoded frame, up to its seq, is ``prefix``.

        Called on the event loop by the event bus, so it never waits. Returns whether the
        event was queued.
        """
        if self._close_code is not None:
            return False
        # A dropped event still takes its seq: the gap tells the client it missed one.
        self.seq += 1
        if self.buffered_bytes > self._max_buffered:
            if not droppable:
                self.close_soon(CLOSE_POLICY, "slow consumer")
            return False

        data = b"%s%d}" % (prefix, self.seq)
        try:
            self._outbox_send.send_nowait(data)
        except trio.WouldBlock:
            if not droppable:
                self.close_soon(CLOSE_POLICY, "slow consumer")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.seq -= 1
            return False
        self.buffered_bytes += len(data)
        return True

    def send_raw_nowait(self, data: bytes) -> None:
        """Queue a frame that carries no seq (targeted frames), closing a slow client."""
        try:
            self._outbox_send.send_nowait(data)
        except trio.WouldBlock:
            self.close_soon(CLOSE_POLICY, "slow consumer")
            return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        self.buffered_bytes += len(data)

    async def send_response(self, frame: ResponseFrame) -> None:
        try:
            data = encode_frame(frame)
        except (TypeError, msgspec.EncodeError) as exc:
            logger.error(
                "conn %s: result of request %s cannot be encoded: %s",
                self.info.conn_id,
                frame.id,
                exc,
            )
            data = encode_frame(
                ResponseFrame(
                    id=frame.id,
                    ok=False,
                    error=error_shape(GatewayError(500, "internal error: result not encodable")),
                )
            )
        self.buffered_bytes += len(data)
        try:
            await self._outbox_send.send(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.buffered_bytes -= len(data)

    def close_soon(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Close the connection from anywhere on the event loop, without waiting.

        The reader stops taking requests and the writer finishes the write it is in (never
        cutting a frame in half, which the client would read as garbage), then the close
        frame goes out. A client that does not take even that write within the close
        timeout is dropped without one.

        :param flush: send what is already queued first (a graceful close such as a
            restart); otherwise the queue is abandoned (a slow consumer's never drains).
        """
        if self._close_code is not None:
            return
        self._close_code, self._close_reason = code, reason
        logger.info("closing connection %s: %d %s", self.info.conn_id, code, reason)
        self._discard_outbox = not flush
        self._outbox_send.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = trio.current_time() + _CLOSE_TIMEOUT_S

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._close_code is not None:
                    nursery.cancel_scope.deadline = trio.current_time() + _CLOSE_TIMEOUT_S
                nursery.start_soon(self._write_loop)
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self._outbox_send.close()
            if self._close_code is not None:
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                    scope.shield = True
                    await self.ws.aclose(self._close_code, self._close_reason)

    async def _write_loop(self) -> None:
        """Send queued frames, as many as are waiting in each socket write."""
        outbox = self._outbox_receive
        async with outbox:
            async for first in outbox:
                if self._discard_outbox:
                    self.buffered_bytes -= len(first)
                    continue
                sent = await self._send_batch(first)
                # Unbound before the next wait, or an idle connection keeps its last frame.
                del first
                if not sent:
                    self.close_soon(CLOSE_NORMAL, "")
                    return
        # The queue was closed (close_soon) and is now sent or dropped: stop the reader too.
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _send_batch(self, first: bytes) -> bool:
        """Write ``first`` and whatever else is queued, in one write; False once closed."""
        batch, size = [first], len(first)
        while size < _WRITE_BATCH_BYTES:
            try:
                frame = self._outbox_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            batch.append(frame)
            size += len(frame)
        self.buffered_bytes -= size
        try:
            await self.ws.send_frames(batch)
        except WebSocketClosed:
            return False
        return True

    async def _read_loop(self) -> None:
        assert self._nursery is not None
        while True:
            try:
                message = await self.ws.get_message()
            except WebSocketClosed:
                return
            if self._close_code is not None:
                return
            try:
                frame = decode_request(message)
            except msgspec.MsgspecError as exc:
                await self._answer_junk(message, exc)
                continue
            await self._dispatch(frame)

    async def _dispatch(self, frame: RequestFrame) -> None:
        """Run a quick method here; hand anything else to an idle worker, to a new one if
        none is idle, or wait for one when the connection is at its in-flight bound."""
        spec = self.gateway.methods.get(frame.method)
        if spec is not None and spec.quick:
            # No hop to another task: for a handler that answers from memory the hop would
            # cost more than the handler itself.
            await self._serve(frame)
            return
        if self._requests is None:
            self._requests = trio.open_memory_channel[RequestFrame](0)
        requests_send, requests_receive = self._requests
        try:
            requests_send.send_nowait(frame)
            return
        except trio.WouldBlock:
            pass
        if self._workers < self._max_workers:
            self._workers += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._worker, frame, requests_receive)
        else:
            await requests_send.send(frame)

    async def _worker(
        self, first: RequestFrame, requests: trio.MemoryReceiveChannel[RequestFrame]
    ) -> None:
        frame: RequestFrame | None = first
        while frame is not None:
            await self._serve(frame)
            try:
                frame = await requests.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                frame = None

    async def _serve(self, frame: RequestFrame) -> None:
        self.in_flight += 1
        self.idle = trio.Event() if self.in_flight == 1 else self.idle
        try:
            response = await self._call(frame)
            await self.send_response(response)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _call(self, frame: RequestFrame) -> ResponseFrame:
        try:
            spec = self._authorize(frame.method)
            params = decode_params(frame.method, frame.params, spec.params)
            call = Call(
                self.info,
                self.gateway.services,
                frame.id,
                frame.method,
                lambda payload: self.send_response(
                    ResponseFrame(id=frame.id, ok=True, payload=payload)
                ),
            )
            if spec.idempotency_field is not None:
                key = getattr(params, spec.idempotency_field, None)
                if key:
                    payload = await self.gateway.idempotency.run(
                        (spec.name, key), lambda: spec.handler(call, params)
                    )
                    return ResponseFrame(id=frame.id, ok=True, payload=payload)
            payload = await spec.handler(call, params)
            return ResponseFrame(id=frame.id, ok=True, payload=payload)
        except GatewayError as exc:
            return ResponseFrame(id=frame.id, ok=False, error=error_shape(exc))
        except Exception as exc:
            wrapped = _sole_gateway_error(exc)
            if wrapped is not None:
                return ResponseFrame(id=frame.id, ok=False, error=error_shape(wrapped))
            logger.exception(
                "conn %s: method %s (request %s) failed", self.info.conn_id, frame.method, frame.id
            )
            return ResponseFrame(
                id=frame.id, ok=False, error=error_shape(GatewayError(500, "internal error"))
            )

    def _authorize(self, method: str) -> MethodSpec:
        entry = self.gateway.methods.get(method)
        if entry is None:
            if method == "connect":
                raise GatewayError(409, "connect is only valid as the first request")
            raise GatewayError(404, f"unknown method: {method}")
        missing = missing_permission(self.info.role, self.info.scopes, entry.scope)
        if missing is not None:
            raise GatewayError(
                403,
                f"{method} requires {missing}",
                details={"required": entry.scope},
            )
        return entry

    async def _answer_junk(self, message: str | bytes, exc: msgspec.MsgspecError) -> None:
        """A frame that is not a valid request: answer when its id can be read, else log."""
        request_id = _salvage_id(message)
        if request_id is None:
            logger.info("conn %s: unreadable frame dropped: %s", self.info.conn_id, exc)
            return
        error = GatewayError(400, f"invalid request frame: {exc}")
        await self.send_response(ResponseFrame(id=request_id, ok=False, error=error_shape(error)))


def _sole_gateway_error(exc: BaseException) -> GatewayError | None:
    """The GatewayError a handler raised from inside its own nursery, if that is all it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, GatewayError) else None


def _salvage_id(message: str | bytes) -> str | None:
    try:
        value = msgspec.json.decode(message)
    except msgspec.MsgspecError:
        return None
    if isinstance(value, dict):
        request_id = value.get("id")
        if isinstance(request_id, str) and request_id:
            return request_id
        if isinstance(request_id, int | float) and math.isfinite(request_id):
            return str(request_id)
    return None


def event_prefix(event: str, payload: bytes | None) -> bytes:
    """The encoded event frame up to (and including) the ``"seq":`` key."""
    name = msgspec.json.encode(event)
    if payload is None:
        return b'{"type":"evt","event":%s,"seq":' % name
    return b'{"type":"evt","event":%s,"payload":%s,"seq":' % (name, payload)
