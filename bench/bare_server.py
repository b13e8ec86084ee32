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

Usage: ``python bench/bare_server.py --port 0 [--cpu K] [--token T]``. The first line on
stdout is the port it listens on. Logs go to stderr through the ``bench.bare_server``
logger.
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

import msgspec
import trio
import trio_websocket

logger = logging.getLogger("bench.bare_server")

_HANDSHAKE_TIMEOUT_S = 10.0


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


class BareConnection:
    """One handshaken WebSocket and the per-connection event counter."""

    __slots__ = ("seq", "ws")

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.seq = 0


class BareServer:
    """Connection handler and broadcast registry for the bare server."""

    def __init__(self, token: str | None, emit_method: str, event_name: str) -> None:
        self._token = token
        self._emit_method = emit_method
        self._event_prefix = (
            '{"type":"evt","event":' + msgspec.json.encode(event_name).decode() + ',"payload":'
        )
        self._connections: set[BareConnection] = set()
        self._conn_ids = itertools.count(1)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        """Serve one WebSocket from upgrade to close."""
        nonce = str(uuid.uuid4())
        connection: BareConnection | None = None
        try:
            ws = await request.accept()
            await ws.send_message(
                '{"type":"evt","event":"connect.challenge","payload":{"nonce":"'
                + nonce
                + '","ts":'
                + str(int(time.time() * 1000))
                + "}}"
            )
            with trio.move_on_after(_HANDSHAKE_TIMEOUT_S) as handshake_scope:
                first = await ws.get_message()
            if handshake_scope.cancelled_caught:
                await ws.aclose(1000)
                return
            if not await self._handshake(ws, first, nonce):
                return
            connection = BareConnection(ws)
            self._connections.add(connection)
            await self._serve_requests(ws)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            if connection is not None:
                self._connections.discard(connection)

    async def _handshake(
        self, ws: trio_websocket.WebSocketConnection, first: str | bytes, nonce: str
    ) -> bool:
        try:
            frame = _request_decoder.decode(first)
        except msgspec.DecodeError:
            await ws.aclose(1008, "invalid request frame")
            return False
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
            await ws.send_message(_error_response(frame.id, exc.code, exc.message))
            await ws.aclose(1008, exc.message[:120])
            return False
        conn_id = next(self._conn_ids)
        await ws.send_message(
            '{"type":"res","id":'
            + msgspec.json.encode(frame.id).decode()
            + ',"ok":true,"payload":{"type":"hello-ok","protocol":3,'
            + '"server":{"version":"bare","connId":"bare-'
            + str(conn_id)
            + '"},"features":{"methods":[],"events":[]},"snapshot":{},'
            + '"policy":{"maxPayload":8388608,"maxBufferedBytes":16777216,'
            + '"tickIntervalMs":30000}}}'
        )
        return True

    async def _serve_requests(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Answer requests in arrival order: the cheapest thing a server can do."""
        while True:
            message = await ws.get_message()
            try:
                frame = _request_decoder.decode(message)
            except msgspec.DecodeError as exc:
                await ws.send_message(_error_response("invalid", 400, f"invalid frame: {exc}"))
                continue
            if frame.method == self._emit_method:
                await self._broadcast()
            await ws.send_message(
                '{"type":"res","id":'
                + msgspec.json.encode(frame.id).decode()
                + ',"ok":true,"payload":{"ok":true}}'
            )

    async def _broadcast(self) -> None:
        """Send one event to every handshaken connection, each with its own ``seq``."""
        text_start = self._event_prefix + '{"ts":' + str(int(time.time() * 1000)) + '},"seq":'
        for connection in list(self._connections):
            connection.seq += 1
            try:
                await connection.ws.send_message(text_start + str(connection.seq) + "}")
            except trio_websocket.ConnectionClosed:
                self._connections.discard(connection)


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
        listener = await nursery.start(
            trio_websocket.serve_websocket, server.handle, args.host, args.port, None
        )
        print(listener.port, flush=True)
        logger.info("bare server listening on %s:%d", args.host, listener.port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--cpu", type=int, help="pin this process to CPU K")
    parser.add_argument("--token", help="require this auth.token (default: accept any)")
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
