"""The server side of WebSocket, on wsproto over a trio stream, without extra tasks.

trio-websocket gives every connection a reader task that parses frames and hands each
message over a memory channel, and it writes one frame per call. On the gateway's hot path
both cost more than the rest of the kernel together (see bench/RESULTS.md), so the server
side is done here: the connection's own reader parses in place, and the writer sends every
frame it has queued in one socket write. wsproto still does the upgrade, unmasking,
fragments, UTF-8 checks and the close handshake; data frames going out are built directly,
as the server's frames are never masked.

The client side (``kernel.client``) keeps using trio-websocket.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

__all__ = ["ServerWebSocket", "UpgradeRequest", "WebSocketClosed"]

logger = logging.getLogger(__name__)

_RECEIVE_BYTES = 64 * 1024
_CLOSE_DRAIN_S = 1.0
_ABNORMAL = 1006
_TOO_BIG = 1009


class WebSocketClosed(Exception):
    """The connection is closed; ``code`` is the close code seen (1006 without one)."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        super().__init__(f"{code} {reason or ''}".strip())
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """The HTTP upgrade request, as the handshake's checks need it."""

    host: str
    target: str
    #: Header names in lower case; Host included.
    headers: dict[str, str]
    peer_ip: str


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame carrying ``payload`` (already UTF-8)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


def _wire_size(data: str | bytes) -> int:
    """How many bytes ``data`` took on the wire: text arrives decoded, but the limit is on
    its UTF-8 bytes, which outnumber its characters as soon as one is not ASCII."""
    if isinstance(data, bytes) or data.isascii():  # isascii() is O(1) on CPython's str
        return len(data)
    return len(data.encode())


class ServerWebSocket:
    """One accepted TCP stream, through the upgrade and then as a WebSocket.

    One task reads (``get_message``) and any task may write; writes are serialised.

    :param max_message_size: a message longer than this, in bytes, closes the connection
        with 1009.
    """

    def __init__(self, stream: trio.SocketStream, *, max_message_size: int) -> None:
        self._stream = stream
        self._ws: WSConnection | Connection = WSConnection(ConnectionType.SERVER)
        self._max_message_size = max_message_size
        self._send_lock = trio.StrictFIFOLock()
        self._parts: list[str | bytes] = []
        self._size = 0
        self._torn = False
        self.close_code: int | None = None
        self.close_reason: str | None = None

    # -- upgrade ---------------------------------------------------------------------------

    async def read_upgrade(self) -> UpgradeRequest | None:
        """Read the HTTP upgrade request; ``None`` when the peer sent something else."""
        while True:
            try:
                for event in self._ws.events():
                    if isinstance(event, Request):
                        return self._upgrade_request(event)
            except RemoteProtocolError as exc:
                await self._refuse_http(exc)
                return None
            data = await self._receive()
            if not data:
                return None
            try:
                self._ws.receive_data(data)
            except RemoteProtocolError as exc:
                await self._refuse_http(exc)
                return None

    def _upgrade_request(self, event: Request) -> UpgradeRequest:
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in event.extra_headers
        }
        headers["host"] = event.host
        try:
            peer = self._stream.socket.getpeername()[0]
        except OSError:
            peer = ""
        return UpgradeRequest(host=event.host, target=event.target, headers=headers, peer_ip=peer)

    async def _refuse_http(self, exc: RemoteProtocolError) -> None:
        logger.debug("not a WebSocket upgrade: %s", exc)
        hint = exc.event_hint
        if isinstance(hint, RejectConnection):
            await self._send_bytes(self._ws.send(hint))
        await self._stream.aclose()

    async def accept(self) -> None:
        await self._send_bytes(self._ws.send(AcceptConnection()))
        # From here on only the WebSocket connection is needed: dropping the HTTP handshake
        # state (an h11 connection and its buffers) makes every idle connection smaller.
        if self._ws.connection is not None:
            self._ws = self._ws.connection

    async def reject(self, status: int, body: bytes) -> None:
        """Answer the upgrade with a plain HTTP error and close."""
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        data = self._ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        data += self._ws.send(RejectData(data=body))
        try:
            await self._send_bytes(data)
        finally:
            await self._stream.aclose()

    # -- messages --------------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next whole message; raises ``WebSocketClosed`` when the connection ends."""
        while True:
            message = await self._next_buffered_message()
            if message is not None:
                return message
            data = await self._receive()
            if not data:
                self._mark_closed(_ABNORMAL, None)
                raise WebSocketClosed(_ABNORMAL)
            try:
                self._ws.receive_data(data)
            except RemoteProtocolError as exc:
                await self.aclose(1002, str(exc)[:100])
                raise WebSocketClosed(1002, "protocol error") from None

    async def _next_buffered_message(self) -> str | bytes | None:
        try:
            for event in self._ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    self._size += _wire_size(event.data)
                    if self._size > self._max_message_size:
                        await self.aclose(_TOO_BIG, f"message over {self._max_message_size} bytes")
                        raise WebSocketClosed(_TOO_BIG, "message too big")
                    self._parts.append(event.data)
                    if event.message_finished:
                        return self._take_message()
                elif isinstance(event, Ping):
                    await self._send_bytes(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self._mark_closed(event.code, event.reason)
                    if self._ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._send_bytes(self._ws.send(event.response()))
                    await self._stream.aclose()
                    raise WebSocketClosed(event.code, event.reason)
        except RemoteProtocolError as exc:
            await self.aclose(1002, str(exc)[:100])
            raise WebSocketClosed(1002, "protocol error") from None
        return None

    def _take_message(self) -> str | bytes:
        parts, self._parts, self._size = self._parts, [], 0
        if len(parts) == 1:
            return parts[0]
        # Fragments of one message share a type.
        if isinstance(parts[0], bytes):
            return b"".join(parts)  # type: ignore[arg-type]
        return "".join(parts)  # type: ignore[arg-type]

    async def send_message(self, message: str) -> None:
        await self.send_frames((message.encode(),))

    async def send_frames(self, payloads: Iterable[bytes]) -> None:
        """Send each payload (encoded JSON) as a text frame, all in one write."""
        if self.close_code is not None or self._ws.state is not ConnectionState.OPEN:
            raise WebSocketClosed(self.close_code or _ABNORMAL, self.close_reason)
        await self._send_bytes(b"".join([text_frame(payload) for payload in payloads]))

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame, wait briefly for the peer's, then close the stream.

        Waiting matters: closing a socket with unread data makes the kernel reset it, and
        the peer may then never see the close code (1009 after an oversized message).
        """
        if self._torn:
            self._mark_closed(_ABNORMAL, None)
        elif self._ws.state is ConnectionState.OPEN:
            self._mark_closed(code, reason)
            try:
                await self._send_bytes(self._ws.send(CloseConnection(code=code, reason=reason)))
                with trio.move_on_after(_CLOSE_DRAIN_S):
                    await self._drain_until_closed()
            except (WebSocketClosed, RemoteProtocolError):
                pass
        await self._stream.aclose()

    async def _drain_until_closed(self) -> None:
        while self._ws.state is not ConnectionState.CLOSED:
            data = await self._receive()
            if not data:
                return
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, CloseConnection):
                    return

    def _mark_closed(self, code: int, reason: str | None) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    # -- the stream ------------------------------------------------------------------------

    async def _receive(self) -> bytes:
        try:
            return await self._stream.receive_some(_RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def _send_bytes(self, data: bytes) -> None:
        try:
            async with self._send_lock:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._mark_closed(_ABNORMAL, None)
            raise WebSocketClosed(_ABNORMAL) from None
        except trio.Cancelled:
            # Part of a frame may be on the wire; anything sent after it would be read as
            # garbage, so the stream can only be dropped now.
            self._torn = True
            raise
