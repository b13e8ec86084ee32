"""WebSocket client transports for the load generator, behind one small interface.

The load generator must never be the bottleneck, so its default transport (``raw``) speaks
only the part of RFC 6455 a benchmark client needs, straight over a trio socket: it parses
every complete frame already buffered in one pass and writes a whole batch of requests with
a single ``send_all``. The ``wsproto`` and ``trio-websocket`` transports offer the same
interface so ``loadgen.py --client`` can measure what each client stack costs.

A transport is owned by one task: ``send_many`` and ``receive_many`` must not run
concurrently on the same transport (trio would raise ``BusyResourceError``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import socket
from collections.abc import Iterable, Sequence
from typing import Protocol

import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

CLIENT_KINDS = ("raw", "wsproto", "trio-websocket")

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_RECEIVE_BYTES = 256 * 1024
_MAX_RESPONSE_HEAD = 16 * 1024
_CLOSE_TIMEOUT_S = 1.0

_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA


class TransportClosed(Exception):
    """The WebSocket is closed; ``code`` is the close code (1006 when the TCP link died)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed: code={code} reason={reason!r}")
        self.code = code
        self.reason = reason


class HandshakeFailed(Exception):
    """The HTTP upgrade to WebSocket did not succeed."""


class MessageTransport(Protocol):
    """What the load generator needs from a WebSocket client."""

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """Send each UTF-8 JSON document as one text message."""

    async def receive_many(self) -> list[bytes | str]:
        """Wait for at least one message; return every complete message available."""

    async def aclose(self) -> None:
        """Run the closing handshake (bounded in time), then close the socket."""


async def open_transport(
    kind: str, host: str, port: int, path: str, nursery: trio.Nursery | None
) -> MessageTransport:
    """Connect to ``ws://host:port/path`` with the client stack named by ``kind``.

    trio-websocket needs ``nursery`` for its reader task, and it must outlive the transport;
    the other kinds run no background task and take None.
    """
    if kind == "raw":
        return await RawWebSocket.connect(host, port, path)
    if kind == "wsproto":
        return await WsprotoWebSocket.connect(host, port, path)
    if kind == "trio-websocket":
        if nursery is None:
            raise ValueError("the trio-websocket client needs a nursery for its reader task")
        return await TrioWebSocket.connect(host, port, path, nursery)
    raise ValueError(f"unknown client kind {kind!r}; expected one of {CLIENT_KINDS}")


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """Open a TCP stream, skipping ``open_tcp_stream``'s happy-eyeballs machinery for an
    IP literal: its nursery and tasks cost more per connection than the handshake itself.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    return await trio.open_tcp_stream(host, port)


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """Encode one final, masked client frame.

    The mask comes from ``random`` rather than ``os.urandom``: masking exists to defeat
    cache poisoning by intermediaries, which cannot happen on loopback, and a syscall per
    frame would be pure load-generator overhead.
    """
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        header = bytes((first, 0x80 | length))
    elif length < 65536:
        header = bytes((first, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + length.to_bytes(8, "big")
    mask = random.randbytes(4)
    if length:
        keystream = (mask * (length // 4 + 1))[:length]
        masked = int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")
        payload = masked.to_bytes(length, "little")
    return header + mask + payload


def _close_payload(code: int) -> bytes:
    return code.to_bytes(2, "big")


class RawWebSocket:
    """A minimal RFC 6455 client over a trio ``SocketStream`` (no extensions)."""

    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self._stream = stream
        self._buffer = bytearray(leftover)
        self._fragments: list[bytes] | None = None
        self._control_replies: list[bytes] = []
        self._peer_close: tuple[int, str] | None = None
        self._close_sent = False
        self._stream_closed = False

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> RawWebSocket:
        """Open the TCP connection and perform the HTTP/1.1 upgrade."""
        stream = await connect_tcp(host, port)
        try:
            key = base64.b64encode(os.urandom(16))
            request = (
                (
                    f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                ).encode()
                + b"Sec-WebSocket-Key: "
                + key
                + b"\r\n\r\n"
            )
            await stream.send_all(request)
            response = bytearray()
            while (head_end := response.find(b"\r\n\r\n")) < 0:
                if len(response) > _MAX_RESPONSE_HEAD:
                    raise HandshakeFailed("upgrade response headers too long")
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise HandshakeFailed("connection closed during the HTTP upgrade")
                response += chunk
            _check_upgrade_response(bytes(response[:head_end]), key)
            return cls(stream, bytes(response[head_end + 4 :]))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """Send all messages with one write."""
        data = b"".join([_client_frame(_OP_TEXT, message) for message in messages])
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed(1006, f"send failed: {exc!r}") from None

    async def receive_many(self) -> list[bytes | str]:
        """Return every complete message buffered, reading from the socket only if none."""
        while True:
            messages = self._take_messages()
            if self._control_replies:
                await self._send_raw(b"".join(self._control_replies))
                self._control_replies.clear()
            if messages:
                return messages
            if self._peer_close is not None:
                code, reason = self._peer_close
                await self.aclose()
                raise TransportClosed(code, reason)
            try:
                data = await self._stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TransportClosed(1006, f"receive failed: {exc!r}") from None
            if not data:
                raise TransportClosed(1006, "TCP connection closed without a close frame")
            self._buffer += data

    async def aclose(self) -> None:
        """Send a close frame, wait (bounded) for the peer's close and EOF, then close."""
        if self._stream_closed:
            return
        try:
            with trio.move_on_after(_CLOSE_TIMEOUT_S):
                if not self._close_sent:
                    self._close_sent = True
                    await self._send_raw(_client_frame(_OP_CLOSE, _close_payload(1000)))
                # RFC 6455 has the server close TCP first, so its side keeps TIME_WAIT.
                while True:
                    self._take_messages()
                    data = await self._stream.receive_some(_RECEIVE_BYTES)
                    if not data:
                        break
                    self._buffer += data
        except (trio.BrokenResourceError, trio.ClosedResourceError, TransportClosed):
            pass
        finally:
            self._stream_closed = True
            await trio.aclose_forcefully(self._stream)

    async def _send_raw(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed(1006, f"send failed: {exc!r}") from None

    def _take_messages(self) -> list[bytes | str]:
        """Parse all complete frames in the buffer; keep any partial frame for later."""
        buffer = self._buffer
        size = len(buffer)
        position = 0
        messages: list[bytes | str] = []
        while self._peer_close is None and size - position >= 2:
            first = buffer[position]
            second = buffer[position + 1]
            if second & 0x80:
                raise TransportClosed(1002, "server sent a masked frame")
            length = second & 0x7F
            header = 2
            if length == 126:
                if size - position < 4:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 4], "big")
                header = 4
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 10], "big")
                header = 10
            end = position + header + length
            if end > size:
                break
            payload = bytes(buffer[position + header : end])
            position = end
            self._handle_frame(first & 0x80 != 0, first & 0x0F, payload, messages)
        del buffer[:position]
        return messages

    def _handle_frame(
        self, final: bool, opcode: int, payload: bytes, messages: list[bytes | str]
    ) -> None:
        if opcode in (_OP_TEXT, _OP_BINARY):
            if self._fragments is not None:
                raise TransportClosed(1002, "new message started inside a fragmented one")
            if final:
                messages.append(payload)
            else:
                self._fragments = [payload]
        elif opcode == _OP_CONTINUATION:
            if self._fragments is None:
                raise TransportClosed(1002, "continuation frame without a message")
            self._fragments.append(payload)
            if final:
                messages.append(b"".join(self._fragments))
                self._fragments = None
        elif opcode == _OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._peer_close = (code, payload[2:].decode("utf-8", "replace"))
            if not self._close_sent:
                self._close_sent = True
                self._control_replies.append(_client_frame(_OP_CLOSE, payload[:2]))
        elif opcode == _OP_PING:
            self._control_replies.append(_client_frame(_OP_PONG, payload))
        elif opcode != _OP_PONG:
            raise TransportClosed(1002, f"unknown opcode {opcode:#x}")


def _check_upgrade_response(head: bytes, key: bytes) -> None:
    """Raise ``HandshakeFailed`` unless ``head`` is a valid 101 answer to ``key``."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status_parts = status_line.split(" ", 2)
    if len(status_parts) < 2 or status_parts[1] != "101":
        raise HandshakeFailed(f"upgrade refused: {status_line!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    expected = base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != expected:
        raise HandshakeFailed("upgrade response has a wrong Sec-WebSocket-Accept")


class WsprotoWebSocket:
    """The same interface over wsproto's sans-I/O client state machine."""

    def __init__(self, stream: trio.SocketStream, connection: WSConnection) -> None:
        self._stream = stream
        self._ws = connection
        self._text_parts: list[str] = []
        self._bytes_parts: list[bytes] = []
        self._ready: list[bytes | str] = []
        self._peer_close: tuple[int, str] | None = None
        self._stream_closed = False

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> WsprotoWebSocket:
        """Open the TCP connection and let wsproto drive the upgrade."""
        stream = await connect_tcp(host, port)
        try:
            client = cls(stream, WSConnection(ConnectionType.CLIENT))
            await stream.send_all(client._ws.send(Request(host=f"{host}:{port}", target=path)))
            await client._await_accept()
            return client
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def _await_accept(self) -> None:
        while True:
            data = await self._stream.receive_some(_RECEIVE_BYTES)
            if not data:
                raise HandshakeFailed("connection closed during the HTTP upgrade")
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, AcceptConnection):
                    # Frames that arrived with the 101 response are kept for the reader.
                    self._collect(self._ws.events())
                    return
                if isinstance(event, RejectConnection):
                    raise HandshakeFailed(f"upgrade refused: status {event.status_code}")

    def _collect(self, events: Iterable[Event]) -> bytes:
        """Turn wsproto events into finished messages; return bytes that must be sent."""
        outgoing = b""
        for event in events:
            if isinstance(event, TextMessage):
                self._text_parts.append(event.data)
                if event.message_finished:
                    self._ready.append("".join(self._text_parts))
                    self._text_parts.clear()
            elif isinstance(event, BytesMessage):
                self._bytes_parts.append(bytes(event.data))
                if event.message_finished:
                    self._ready.append(b"".join(self._bytes_parts))
                    self._bytes_parts.clear()
            elif isinstance(event, Ping):
                outgoing += self._ws.send(event.response())
            elif isinstance(event, CloseConnection):
                self._peer_close = (event.code, event.reason or "")
                with contextlib.suppress(LocalProtocolError):
                    outgoing += self._ws.send(event.response())
        return outgoing

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """Encode each message through wsproto and write them together."""
        data = b"".join([self._ws.send(TextMessage(data=message.decode())) for message in messages])
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportClosed(1006, f"send failed: {exc!r}") from None

    async def receive_many(self) -> list[bytes | str]:
        """Return every finished message, reading from the socket only if none."""
        while not self._ready:
            if self._peer_close is not None:
                code, reason = self._peer_close
                await self.aclose()
                raise TransportClosed(code, reason)
            try:
                data = await self._stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TransportClosed(1006, f"receive failed: {exc!r}") from None
            if not data:
                raise TransportClosed(1006, "TCP connection closed without a close frame")
            self._ws.receive_data(data)
            outgoing = self._collect(self._ws.events())
            if outgoing:
                await self._stream.send_all(outgoing)
        ready, self._ready = self._ready, []
        return ready

    async def aclose(self) -> None:
        """Close through wsproto, wait (bounded) for the server's EOF, then close."""
        if self._stream_closed:
            return
        try:
            with trio.move_on_after(_CLOSE_TIMEOUT_S):
                if self._ws.state == ConnectionState.OPEN:
                    await self._stream.send_all(self._ws.send(CloseConnection(code=1000)))
                while data := await self._stream.receive_some(_RECEIVE_BYTES):
                    self._ws.receive_data(data)
                    self._collect(self._ws.events())
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            LocalProtocolError,
            RemoteProtocolError,
        ):
            pass  # the peer or the state machine ended the close early; we close anyway
        finally:
            self._stream_closed = True
            await trio.aclose_forcefully(self._stream)


class TrioWebSocket:
    """The same interface over trio-websocket's client (one message per receive)."""

    def __init__(self, connection: trio_websocket.WebSocketConnection) -> None:
        self._ws = connection

    @classmethod
    async def connect(cls, host: str, port: int, path: str, nursery: trio.Nursery) -> TrioWebSocket:
        """Open the connection; its reader task runs in ``nursery``, owned by the caller."""
        try:
            connection = await trio_websocket.connect_websocket(
                nursery, host, port, path, use_ssl=False
            )
        except trio_websocket.HandshakeError as exc:
            raise HandshakeFailed(f"trio-websocket handshake failed: {exc!r}") from None
        return cls(connection)

    async def send_many(self, messages: Sequence[bytes]) -> None:
        """Send one text message per call, as trio-websocket's API requires."""
        try:
            for message in messages:
                await self._ws.send_message(message.decode())
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(exc.reason.code, exc.reason.reason or "") from None

    async def receive_many(self) -> list[bytes | str]:
        """Return the next message (trio-websocket has no way to drain its queue)."""
        try:
            return [await self._ws.get_message()]
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(exc.reason.code, exc.reason.reason or "") from None

    async def aclose(self) -> None:
        """Run trio-websocket's closing handshake, bounded like the other transports."""
        with trio.move_on_after(_CLOSE_TIMEOUT_S):
            await self._ws.aclose()
