"""The ``connect`` handshake: challenge, first request, version, origin, auth, hello-ok.

Checks run in a fixed order and the first failure wins. A refusal is answered on the connect
request (when there is one to answer) and the socket is closed: 1002 when no protocol
version is shared, 1008 for everything else, 1000 when the client never spoke in time.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .connection import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL,
    Connection,
    ConnectionInfo,
)
from .errors import GatewayError
from .frames import (
    PROTOCOL_VERSIONS,
    ConnectParams,
    EventFrame,
    Payload,
    RequestFrame,
    ResponseFrame,
    decode_params,
    decode_request,
    encode_frame,
    error_shape,
)
from .locality import ClientAddress
from .specs import event_allowed, missing_permission

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["HelloOk", "run_handshake"]

logger = logging.getLogger(__name__)

_REASON_LIMIT = 120


class ServerInfo(Payload):
    version: str
    conn_id: str
    host: str | None = None


class Features(Payload):
    methods: list[str]
    events: list[str]


class Policy(Payload):
    max_payload: int
    max_buffered_bytes: int
    tick_interval_ms: int


class HelloAuth(Payload):
    role: str
    scopes: list[str]
    method: str
    device_token: str | None = None
    issued_at_ms: int | None = None


class HelloOk(Payload, tag_field="type", tag="hello-ok"):
    protocol: int
    server: ServerInfo
    features: Features
    snapshot: dict[str, Any]
    policy: Policy
    auth: HelloAuth


class Refusal(Exception):
    """Ends a handshake: an optional error response, then a close code and reason."""

    def __init__(self, close_code: int, error: GatewayError | None, reason: str = "") -> None:
        super().__init__(reason or (error.message if error else ""))
        self.close_code = close_code
        self.error = error
        self.reason = reason or (error.message if error else "")


def _truncate(reason: str) -> str:
    encoded = reason.encode()[:_REASON_LIMIT]
    return encoded.decode(errors="ignore")


async def run_handshake(
    gateway: Gateway, ws: WebSocketConnection, client: ClientAddress, headers: Mapping[str, str]
) -> Connection | None:
    """Take a fresh socket through the handshake; return the live connection or ``None``."""
    nonce = str(uuid.uuid4())
    conn_id = str(uuid.uuid4())
    challenge = EventFrame(
        event="connect.challenge",
        payload=msgspec.Raw(
            msgspec.json.encode({"nonce": nonce, "ts": gateway.services.clock.now_ms()})
        ),
    )
    request_id: str | None = None
    try:
        await ws.send_message(encode_frame(challenge).decode())
        timeout_s = gateway.config.gateway.limits.handshake_timeout_ms / 1000
        with trio.move_on_after(timeout_s) as waited:
            message = await ws.get_message()
        if waited.cancelled_caught:
            raise Refusal(CLOSE_NORMAL, None, "handshake timeout")

        try:
            frame = decode_request(message)
        except msgspec.MsgspecError:
            raise Refusal(
                CLOSE_POLICY, None, "invalid handshake: expected a connect request"
            ) from None
        request_id = frame.id
        connection = _admit(gateway, ws, frame, conn_id, nonce, client, headers)
    except Refusal as refusal:
        if refusal.error is not None and request_id is not None:
            response = ResponseFrame(id=request_id, ok=False, error=error_shape(refusal.error))
            with trio.move_on_after(2):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send_message(encode_frame(response).decode())
        logger.info("handshake refused (%s): %s", client.ip or "unknown", refusal.reason)
        with trio.move_on_after(2):
            await ws.aclose(refusal.close_code, _truncate(refusal.reason))
        return None
    except ConnectionClosed:
        return None

    hello = connection.hello
    try:
        await ws.send_message(
            encode_frame(ResponseFrame(id=request_id, ok=True, payload=hello)).decode()
        )
    except ConnectionClosed:
        gateway.forget(connection)
        return None
    return connection


def _admit(
    gateway: Gateway,
    ws: WebSocketConnection,
    frame: RequestFrame,
    conn_id: str,
    nonce: str,
    client: ClientAddress,
    headers: Mapping[str, str],
) -> Connection:
    if frame.method != "connect":
        raise Refusal(
            CLOSE_POLICY, GatewayError(400, "invalid handshake: first request must be connect")
        )
    try:
        params: ConnectParams = decode_params("connect", frame.params, ConnectParams)
    except GatewayError as exc:
        raise Refusal(CLOSE_POLICY, exc) from None

    protocol = _negotiate_protocol(params)
    _check_origin(gateway, headers)

    outcome = gateway.auth.check(params, client, dict(headers))
    if not outcome.ok:
        raise Refusal(
            CLOSE_POLICY,
            GatewayError(
                401,
                f"unauthorized: {outcome.message}",
                details={"authReason": outcome.reason},
            ),
        )

    scopes = frozenset(params.scopes)
    if not client.is_local and params.device is None:
        raise Refusal(
            CLOSE_POLICY,
            GatewayError(
                403,
                "device identity required for a remote connection",
                reason="NOT_PAIRED",
            ),
        )
    # TODO(device identity): verify params.device and pair remote devices (issue 3).

    info = ConnectionInfo(
        conn_id=conn_id,
        role=params.role,
        scopes=scopes,
        client=params.client,
        remote_ip=client.ip,
        is_local=client.is_local,
        connected_at_ms=gateway.services.clock.now_ms(),
        auth_method=outcome.method,
        device_id=params.device.id if params.device else None,
        caps=frozenset(params.caps),
        commands=tuple(params.commands),
    )
    info.allowed_events = frozenset(
        name
        for name, spec in gateway.events.items()
        if event_allowed(info.role, info.scopes, spec.scope)
    )
    connection = Connection(gateway, ws, info)
    gateway.register(connection)
    connection.hello = _hello(gateway, connection, protocol, nonce)
    return connection


def _negotiate_protocol(params: ConnectParams) -> int:
    low = max(params.min_protocol, PROTOCOL_VERSIONS.start)
    high = min(params.max_protocol, PROTOCOL_VERSIONS.stop - 1)
    if low > high:
        supported = [PROTOCOL_VERSIONS.start, PROTOCOL_VERSIONS.stop - 1]
        raise Refusal(
            CLOSE_PROTOCOL,
            GatewayError(
                400,
                f"protocol mismatch: this gateway speaks {supported[0]} to {supported[1]}",
                details={"supported": supported},
            ),
            "protocol mismatch",
        )
    return high


def _check_origin(gateway: Gateway, headers: Mapping[str, str]) -> None:
    """A browser's Origin must be the gateway's own or listed in ``gateway.allowedOrigins``."""
    origin = headers.get("origin")
    if not origin:
        return
    allowed = gateway.config.gateway.allowed_origins
    if origin in allowed or "*" in allowed:
        return
    host = headers.get("host", "")
    parts = urlsplit(origin)
    if parts.scheme in ("http", "https") and parts.netloc and parts.netloc == host:
        return
    raise Refusal(
        CLOSE_POLICY,
        GatewayError(
            403,
            f"origin not allowed: {origin} (open the UI from the gateway's own address or add"
            " it to gateway.allowedOrigins)",
        ),
    )


def _hello(gateway: Gateway, connection: Connection, protocol: int, nonce: str) -> HelloOk:
    info = connection.info
    limits = gateway.config.gateway.limits
    methods = sorted(
        name
        for name, spec in gateway.methods.items()
        if spec.advertised and missing_permission(info.role, info.scopes, spec.scope) is None
    )
    snapshot = gateway.snapshot_for(info)
    return HelloOk(
        protocol=protocol,
        server=ServerInfo(
            version=gateway.services.info.version, conn_id=info.conn_id, host=gateway.hostname
        ),
        features=Features(methods=methods, events=sorted(info.allowed_events)),
        snapshot=snapshot,
        policy=Policy(
            max_payload=limits.max_payload,
            max_buffered_bytes=limits.max_buffered_bytes,
            tick_interval_ms=limits.tick_interval_ms,
        ),
        auth=HelloAuth(role=info.role, scopes=sorted(info.scopes), method=info.auth_method),
    )
