"""The benchmark ceiling: a bare trio-websocket server speaking the gateway's frames.

It does the least work the wire protocol allows, so a load generator run against it shows
what trio + trio-websocket + wsproto (+ cryptography for device signatures) can do on this
machine, and the gateway's numbers can be read as a fraction of that ceiling:

- sends ``connect.challenge``, then answers ``connect`` with a minimal ``hello-ok``;
- checks only what costs the same in any gateway: the shared token (when ``--token`` is
  given) and, when a ``device`` block is sent, its id and Ed25519 signature over the v2
  payload with this connection's nonce;
- answers every later request with a small ``ok`` response;
- for the emitter method (``--emit-method``) first sends one ``evt`` (``--event``) to every
  connection, each with that connection's own ``seq``, then answers.

Two WebSocket stacks (``--stack``): ``trio-websocket`` through its public API (a reader
task, a one-slot queue and one write per message), and ``wsproto`` driven directly over a
trio stream (every reply produced by one read leaves in one write), the way a server can
go when trio-websocket's per-message cost matters.

Usage: ``python bench/bare_server.py --port 0 [--stack S] [--cpu K] [--token T]``. The
first line on stdout is the port it listens on. Logs go to stderr through the
``bench.bare_server`` logger.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import itertools
import logging
import os
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

logger = logging.getLogger("bench.bare_server")

_HANDSHAKE_TIMEOUT_S = 10.0
_RECEIVE_BYTES = 64 * 1024
STACKS = ("trio-websocket", "wsproto")


class RequestFrame(msgspec.Struct):
    """A client ``req`` frame; params stay undecoded unless ``connect`` needs them."""

    type: str
    id: str
    method: str
    params: msgspec.Raw = msgspec.Raw(b"{}")


class ClientInfo(msgspec.Struct):
    """The parts of ``params.client`` the device signature covers."""

    id: str
    mode: str


class DeviceBlock(msgspec.Struct):
    """``params.device``: the Ed25519 identity and its signature."""

    id: str
    publicKey: str
    signature: str
    signedAt: int
    nonce: str = ""


class AuthBlock(msgspec.Struct):
    """``params.auth``: the shared secret."""

    token: str = ""


class ConnectParams(msgspec.Struct):
    """The ``connect`` params this server looks at; everything else is ignored."""

    client: ClientInfo
    role: str = "operator"
    scopes: list[str] = msgspec.field(default_factory=list)
    auth: AuthBlock = msgspec.field(default_factory=AuthBlock)
    device: DeviceBlock | None = None


_request_decoder = msgspec.json.Decoder(RequestFrame)
_connect_decoder = msgspec.json.Decoder(ConnectParams)


class HandshakeRejected(Exception):
    """``connect`` failed; ``code`` is the numeric error code sent back."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _verify_device(params: ConnectParams, nonce: str) -> None:
    """Check the device id and the v2 signature; raise ``HandshakeRejected`` if wrong."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    device = params.device
    assert device is not None
    try:
        raw_key = _b64url_decode(device.publicKey)
        signature = _b64url_decode(device.signature)
        public_key = Ed25519PublicKey.from_public_bytes(raw_key)
    except (binascii.Error, ValueError):
        raise HandshakeRejected(400, "device public key invalid") from None
    if hashlib.sha256(raw_key).hexdigest() != device.id:
        raise HandshakeRejected(401, "device identity mismatch")
    if device.nonce != nonce:
        raise HandshakeRejected(401, "device nonce mismatch")
    signed = "|".join(
        (
            "v2",
            device.id,
            params.client.id,
            params.client.mode,
            params.role,
            ",".join(params.scopes),
            str(device.signedAt),
            params.auth.token,
            nonce,
        )
    )
    try:
        public_key.verify(signature, signed.encode())
    except InvalidSignature:
        raise HandshakeRejected(401, "device signature invalid") from None


class ConnectOutcome(msgspec.Struct):
    """What to send for the first frame, and the close to follow if it was refused."""

    reply: str | None
    close: tuple[int, str] | None = None


class BareConnection:
    """A handshaken connection: how to send it a text frame, and its event counter."""

    __slots__ = ("send_text", "seq")

    def __init__(self, send_text: Callable[[str], Awaitable[None]]) -> None:
        self.send_text = send_text
        self.seq = 0


class BareServer:
    """The protocol logic and broadcast registry, shared by both WebSocket stacks."""

    def __init__(self, token: str | None, emit_method: str, event_name: str) -> None:
        self._token = token
        self._emit_method = emit_method
        self._event_prefix = (
            '{"type":"evt","event":' + msgspec.json.encode(event_name).decode() + ',"payload":'
        )
        self._connections: set[BareConnection] = set()
        self._conn_ids = itertools.count(1)

    @staticmethod
    def challenge(nonce: str) -> str:
        """The ``connect.challenge`` event for a new connection."""
        return (
            '{"type":"evt","event":"connect.challenge","payload":{"nonce":"'
            + nonce
            + '","ts":'
            + str(int(time.time() * 1000))
            + "}}"
        )

    def connect(self, first: str | bytes, nonce: str) -> ConnectOutcome:
        """Check the first frame; return ``hello-ok``, or an error reply and a close."""
        try:
            frame = _request_decoder.decode(first)
        except msgspec.DecodeError:
            return ConnectOutcome(None, (1008, "invalid request frame"))
        try:
            if frame.type != "req" or frame.method != "connect":
                raise HandshakeRejected(400, "invalid handshake: first request must be connect")
            try:
                params = _connect_decoder.decode(frame.params)
            except msgspec.DecodeError as exc:
                raise HandshakeRejected(400, f"invalid connect params: {exc}") from None
            if self._token is not None and params.auth.token != self._token:
                raise HandshakeRejected(401, "unauthorized: gateway token mismatch")
            if params.device is not None:
                _verify_device(params, nonce)
        except HandshakeRejected as exc:
            reply = _error_response(frame.id, exc.code, exc.message)
            return ConnectOutcome(reply, (1008, exc.message[:120]))
        return ConnectOutcome(
            '{"type":"res","id":'
            + msgspec.json.encode(frame.id).decode()
            + ',"ok":true,"payload":{"type":"hello-ok","protocol":3,'
            + '"server":{"version":"bare","connId":"bare-'
            + str(next(self._conn_ids))
            + '"},"features":{"methods":[],"events":[]},"snapshot":{},'
            + '"policy":{"maxPayload":8388608,"maxBufferedBytes":16777216,'
            + '"tickIntervalMs":30000}}}'
        )

    def register(self, connection: BareConnection) -> None:
        """Make a handshaken connection a broadcast recipient."""
        self._connections.add(connection)

    def unregister(self, connection: BareConnection) -> None:
        """Forget a closed connection."""
        self._connections.discard(connection)

    def answer(self, message: str | bytes) -> tuple[str, bool]:
        """The response to one request, and whether it must be broadcast first."""
        try:
            frame = _request_decoder.decode(message)
        except msgspec.DecodeError as exc:
            return _error_response("invalid", 400, f"invalid frame: {exc}"), False
        reply = (
            '{"type":"res","id":'
            + msgspec.json.encode(frame.id).decode()
            + ',"ok":true,"payload":{"ok":true}}'
        )
        return reply, frame.method == self._emit_method

    async def broadcast(self) -> None:
        """Send one event to every handshaken connection, each with its own ``seq``."""
        text_start = self._event_prefix + '{"ts":' + str(int(time.time() * 1000)) + '},"seq":'
        for connection in list(self._connections):
            connection.seq += 1
            try:
                await connection.send_text(text_start + str(connection.seq) + "}")
            except (
                trio_websocket.ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ):
                self.unregister(connection)


async def serve_trio_websocket(
    server: BareServer, request: trio_websocket.WebSocketRequest
) -> None:
    """One connection on trio-websocket's public API: one write per message."""
    nonce = str(uuid.uuid4())
    connection: BareConnection | None = None
    try:
        ws = await request.accept()
        await ws.send_message(server.challenge(nonce))
        with trio.move_on_after(_HANDSHAKE_TIMEOUT_S) as handshake_scope:
            first = await ws.get_message()
        if handshake_scope.cancelled_caught:
            await ws.aclose(1000)
            return
        outcome = server.connect(first, nonce)
        if outcome.reply is not None:
            await ws.send_message(outcome.reply)
        if outcome.close is not None:
            await ws.aclose(*outcome.close)
            return
        connection = BareConnection(ws.send_message)
        server.register(connection)
        # Requests are answered in arrival order: the cheapest thing a server can do.
        while True:
            reply, broadcast = server.answer(await ws.get_message())
            if broadcast:
                await server.broadcast()
            await ws.send_message(reply)
    except trio_websocket.ConnectionClosed:
        pass
    finally:
        if connection is not None:
            server.unregister(connection)


class WsprotoStream:
    """A server-side wsproto state machine over one trio stream.

    Frames are encoded in place and everything one read produces (all responses to a batch
    of pipelined requests) leaves in a single write; a lock keeps broadcasts from other
    tasks from interleaving with a write in progress.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self._write_lock = trio.StrictFIFOLock()

    async def write(self, data: bytes) -> None:
        """Write already encoded frames."""
        async with self._write_lock:
            await self.stream.send_all(data)

    async def send_text(self, text: str) -> None:
        """Encode and write one text frame; a closing connection refuses it."""
        if self.ws.state is not ConnectionState.OPEN:
            raise trio.ClosedResourceError("connection is closing")
        await self.write(self.ws.send(TextMessage(data=text)))


async def serve_wsproto(server: BareServer, stream: trio.SocketStream) -> None:
    """One connection on wsproto directly, with one write per batch of replies."""
    connection = WsprotoStream(stream)
    nonce = str(uuid.uuid4())
    registered: BareConnection | None = None
    parts: list[str | bytes] = []
    closing = False
    try:
        with trio.move_on_after(_HANDSHAKE_TIMEOUT_S):
            while registered is None and not closing:
                registered, closing = await _wsproto_round(
                    server, connection, nonce, parts, registered
                )
        while registered is not None and not closing:
            registered, closing = await _wsproto_round(server, connection, nonce, parts, registered)
    except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
        pass
    finally:
        if registered is not None:
            server.unregister(registered)
        await trio.aclose_forcefully(stream)


async def _wsproto_round(
    server: BareServer,
    connection: WsprotoStream,
    nonce: str,
    parts: list[str | bytes],
    registered: BareConnection | None,
) -> tuple[BareConnection | None, bool]:
    """Read once, handle every event it yields, and write all replies in one go.

    Returns the connection once it is handshaken, and whether the connection is closing.
    """
    data = await connection.stream.receive_some(_RECEIVE_BYTES)
    if not data:
        return registered, True
    ws = connection.ws
    ws.receive_data(data)
    outgoing: list[bytes] = []
    closing = False
    for event in ws.events():
        if isinstance(event, Request):
            outgoing.append(ws.send(AcceptConnection()))
            outgoing.append(ws.send(TextMessage(data=server.challenge(nonce))))
        elif isinstance(event, TextMessage | BytesMessage):
            parts.append(event.data)
            if not event.message_finished:
                continue
            message = parts[0] if len(parts) == 1 else _join(parts)
            parts.clear()
            if registered is None:
                outcome = server.connect(message, nonce)
                if outcome.reply is not None:
                    outgoing.append(ws.send(TextMessage(data=outcome.reply)))
                if outcome.close is not None:
                    code, reason = outcome.close
                    outgoing.append(ws.send(CloseConnection(code=code, reason=reason)))
                    closing = True
                    break
                registered = BareConnection(connection.send_text)
                server.register(registered)
                continue
            reply, broadcast = server.answer(message)
            if broadcast:
                # Flush earlier replies first so the broadcast cannot overtake them.
                await connection.write(b"".join(outgoing))
                outgoing.clear()
                await server.broadcast()
            outgoing.append(ws.send(TextMessage(data=reply)))
        elif isinstance(event, Ping):
            outgoing.append(ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if ws.state is ConnectionState.REMOTE_CLOSING:
                outgoing.append(ws.send(event.response()))
            closing = True
            break
    if outgoing:
        await connection.write(b"".join(outgoing))
    return registered, closing


def _join(parts: list[str | bytes]) -> str | bytes:
    if isinstance(parts[0], str):
        return "".join(part for part in parts if isinstance(part, str))
    return b"".join(part for part in parts if isinstance(part, bytes))


def _error_response(request_id: str, code: int, message: str) -> str:
    return msgspec.json.encode(
        {"type": "res", "id": request_id, "ok": False, "error": {"code": code, "message": message}}
    ).decode()


def raise_open_file_limit() -> None:
    """Lift the soft descriptor limit to the hard one: idle runs hold many sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args: argparse.Namespace) -> None:
    """Listen, print the port on stdout, and serve until interrupted."""
    server = BareServer(args.token, args.emit_method, args.event)
    async with trio.open_nursery() as nursery:
        if args.stack == "wsproto":
            listeners = await nursery.start(
                partial(trio.serve_tcp, partial(serve_wsproto, server), args.port, host=args.host)
            )
            port = listeners[0].socket.getsockname()[1]
        else:
            listener = await nursery.start(
                trio_websocket.serve_websocket,
                partial(serve_trio_websocket, server),
                args.host,
                args.port,
                None,
            )
            port = listener.port
        print(port, flush=True)
        logger.info("bare server (%s) listening on %s:%d", args.stack, args.host, port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--cpu", type=int, help="pin this process to CPU K")
    parser.add_argument("--token", help="require this auth.token (default: accept any)")
    parser.add_argument(
        "--stack",
        choices=STACKS,
        default="trio-websocket",
        help="trio-websocket's public API (one write per message), or wsproto driven directly"
        " (one write per batch of replies)",
    )
    parser.add_argument("--emit-method", default="system-event", help="method that broadcasts")
    parser.add_argument("--event", default="presence.changed", help="name of the broadcast evt")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    raise_open_file_limit()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args)


if __name__ == "__main__":
    main()
