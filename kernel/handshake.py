"""The ``connect`` handshake: challenge, first request, version, origin, auth, pairing, hello.

Checks run in a fixed order and the first failure wins (PROTOCOL.md A5, with DESIGN.md's
decisions where they differ):

1. the first frame is a ``connect`` request with valid params (400);
2. a protocol version is shared (400, close 1002);
3. a browser's ``Origin`` is the gateway's own or in ``gateway.allowedOrigins`` (403);
4. the client's address is not locked out after failed attempts (429, ``retryAfterMs``);
5. a ``device`` block, when sent, proves its key over this connection's nonce (401);
6. the shared secret (token, password, the trusted proxy's word, nothing in mode ``none``)
   or else that device's device token authenticates (401);
7. a remote client presents a device identity (403 ``NOT_PAIRED``);
8. the device is paired for the role and scopes it asks for; a local one is paired on the
   spot, a remote one gets a pending request (403 ``NOT_PAIRED``, ``details.requestId``);
9. a paired device holding no token for its role gets one in ``hello-ok.auth``.

Every refusal is answered on the connect request, its error naming the failed check in
``details.authReason`` (``device-signature-expired``, ``token-mismatch``...), and the
socket is then closed: 1002 when no protocol version is shared, 1008 for everything else,
1000 when the client never spoke in time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import trio

from .connection import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL,
    Connection,
    ConnectionInfo,
)
from .device_identity import DeviceIdentityError, VerifiedDevice, verify_device_proof
from .devices import DeviceMeta, IssuedToken
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
from .locality import ClientAddress, is_loopback
from .specs import missing_permission
from .websocket import ServerWebSocket, WebSocketClosed

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["DEVICE_TOKEN_METHOD", "HelloOk", "origin_allowed", "run_handshake"]

logger = logging.getLogger(__name__)

_REASON_LIMIT = 120

#: ``ConnectionInfo.auth_method`` of a connection that authenticated with a device token.
DEVICE_TOKEN_METHOD = "device-token"
#: Rate-limiter scopes (PROTOCOL.md A9): guesses at the shared secret and at device tokens
#: are counted apart.
SHARED_SECRET_SCOPE = "shared-secret"
DEVICE_TOKEN_SCOPE = "device-token"


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
    """What the connection was granted, and a device token when one was just minted.

    ``deviceToken`` appears once, on the connect that minted it; only its hash is kept, so
    a client must store it. ``tokenScopes`` are the scopes that token can later ask for.
    """

    role: str
    scopes: list[str]
    method: str
    device_id: str | None = None
    user: str | None = None
    device_token: str | None = None
    token_scopes: list[str] | None = None
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
    gateway: Gateway, ws: ServerWebSocket, client: ClientAddress, headers: Mapping[str, str]
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
        await ws.send_frames((encode_frame(challenge),))
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
        try:
            connection = await _admit(gateway, ws, frame, conn_id, nonce, client, headers)
        except GatewayError as exc:
            # The registry's own refusals (a full pairing queue) end the handshake the same way.
            raise Refusal(CLOSE_POLICY, exc) from None
    except Refusal as refusal:
        if refusal.error is not None and request_id is not None:
            response = ResponseFrame(id=request_id, ok=False, error=error_shape(refusal.error))
            with trio.move_on_after(2):
                with contextlib.suppress(WebSocketClosed):
                    await ws.send_frames((encode_frame(response),))
        logger.info("handshake refused (%s): %s", client.ip or "unknown", refusal.reason)
        with trio.move_on_after(2):
            await ws.aclose(refusal.close_code, _truncate(refusal.reason))
        return None
    except WebSocketClosed:
        return None

    # Not kept on the connection: the snapshot in it can be large, and idle connections
    # are what a gateway has most of.
    hello, connection.hello = connection.hello, None
    try:
        await ws.send_frames((encode_frame(ResponseFrame(id=request_id, ok=True, payload=hello)),))
    except WebSocketClosed:
        gateway.forget(connection)
        auth = hello.auth if isinstance(hello, HelloOk) else None
        if auth is not None and auth.device_token and auth.device_id:
            # Shown once or never: a token the device never received would leave it holding
            # a "live" token it does not know, which only an operator could clear.
            await gateway.devices.discard_token(auth.device_id, auth.role, auth.device_token)
        return None
    return connection


async def _admit(
    gateway: Gateway,
    ws: ServerWebSocket,
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
    verdict = await _authenticate(gateway, params, nonce, client, headers)

    identity = verdict.device
    if identity is None and not client.is_local:
        raise _refuse(
            403,
            "device-identity-required",
            "device identity required: a remote client must sign in with a device key"
            " (connect params device block)",
            reason="NOT_PAIRED",
        )

    issued: IssuedToken | None = None
    if identity is not None:
        admission = await gateway.devices.admit(
            device_id=identity.device_id,
            public_key=identity.public_key,
            role=params.role,
            scopes=params.scopes,
            meta=_device_meta(params, client),
            is_local=client.is_local,
            by_device_token=verdict.method == DEVICE_TOKEN_METHOD,
        )
        if not admission.admitted:
            request = admission.request or {}
            raise Refusal(
                CLOSE_POLICY,
                GatewayError(
                    403,
                    f"pairing required ({admission.pairing_reason}): an operator must approve"
                    f" request {request.get('requestId')} (anima-gateway devices approve ID)",
                    reason="NOT_PAIRED",
                    details={
                        "authReason": "pairing-required",
                        "pairingReason": admission.pairing_reason,
                        "requestId": request.get("requestId"),
                        "deviceId": identity.device_id,
                        "expiresAtMs": request.get("expiresAtMs"),
                    },
                ),
                "pairing required",
            )
        issued = admission.token

    info = ConnectionInfo(
        conn_id=conn_id,
        role=params.role,
        scopes=frozenset(params.scopes),
        client=params.client,
        remote_ip=client.ip,
        is_local=client.is_local,
        connected_at_ms=gateway.services.clock.now_ms(),
        auth_method=verdict.method,
        device_id=identity.device_id if identity else None,
        caps=frozenset(params.caps),
        commands=tuple(params.commands),
    )
    info.allowed_events = gateway.events_allowed(info.role, info.scopes)
    connection = Connection(gateway, ws, info)
    gateway.register(connection)
    connection.hello = _hello(gateway, connection, protocol, verdict, issued)
    return connection


@dataclass(frozen=True, slots=True)
class _Verdict:
    """Who the client proved to be: how it authenticated and the device it signed as."""

    method: str
    device: VerifiedDevice | None
    user: str | None = None


def _refuse(
    code: int,
    auth_reason: str,
    message: str,
    *,
    reason: str | None = None,
    close_reason: str = "",
    **details: Any,
) -> Refusal:
    """A refusal whose error names the failed check in ``details.authReason``."""
    error = GatewayError(
        code, message, reason=reason, details={"authReason": auth_reason, **details}
    )
    return Refusal(CLOSE_POLICY, error, close_reason)


async def _authenticate(
    gateway: Gateway,
    params: ConnectParams,
    nonce: str,
    client: ClientAddress,
    headers: Mapping[str, str],
) -> _Verdict:
    """Rate limit, device proof, shared secret (or proxy), then a device token (A5, A9).

    The limiter is consulted before any credential is looked at, and on the request's form
    only (is there a token and a device block?), never on whether the credential is right:
    a locked-out address is refused even with the right secret, so that neither guessing
    goes on nor a 429-or-401 difference tells a guess was right. Guesses at the shared
    secret and at device tokens are counted apart; a success clears its count.
    """
    token = params.auth.token if params.auth else None
    may_be_device_token = params.device is not None and bool(token)
    limiter = gateway.rate_limiter
    if limiter is not None:
        scopes = (SHARED_SECRET_SCOPE, DEVICE_TOKEN_SCOPE)
        for scope in scopes if may_be_device_token else scopes[:1]:
            status = limiter.check(scope, client.ip, local=client.is_local)
            if not status.allowed:
                raise _rate_limited(scope, status.retry_after_ms)

    device = _verify_device(gateway, params, nonce, client)
    shared = gateway.auth.check(params, client, dict(headers))
    if shared.ok:
        if limiter is not None:
            limiter.reset(SHARED_SECRET_SCOPE, client.ip)
        return _Verdict(shared.method, device, shared.user)

    if may_be_device_token and device is not None and token:
        check = await gateway.devices.verify_token(
            device.device_id, device.public_key, params.role, token, params.scopes
        )
        if check.ok:
            if limiter is not None:
                limiter.reset(DEVICE_TOKEN_SCOPE, client.ip)
            return _Verdict(DEVICE_TOKEN_METHOD, device)
        if check.has_token:
            if limiter is not None and check.counts_as_failure:
                limiter.record_failure(DEVICE_TOKEN_SCOPE, client.ip, local=client.is_local)
            raise _refuse(
                401, check.reason or "device-token-mismatch", f"unauthorized: {check.message}"
            )
        # The device holds no token for this role, so auth.token was a shared-secret guess
        # (counted as one): say that it failed, and why it was no device token either.
        if limiter is not None and shared.counts_as_failure:
            limiter.record_failure(SHARED_SECRET_SCOPE, client.ip, local=client.is_local)
        raise _refuse(
            401,
            shared.reason or "unauthorized",
            f"unauthorized: {shared.message} (nor is it a device token: {check.message})",
            deviceTokenReason=check.reason,
        )

    if limiter is not None and shared.counts_as_failure:
        limiter.record_failure(SHARED_SECRET_SCOPE, client.ip, local=client.is_local)
    raise _refuse(401, shared.reason or "unauthorized", f"unauthorized: {shared.message}")


def _rate_limited(scope: str, retry_after_ms: int) -> Refusal:
    seconds = -(-retry_after_ms // 1000)
    return Refusal(
        CLOSE_POLICY,
        GatewayError(
            429,
            f"too many failed authentication attempts from this address; retry in {seconds} s",
            retryable=True,
            retry_after_ms=retry_after_ms,
            details={"authReason": "rate-limited", "limiter": scope},
        ),
        "rate limited",
    )


def _verify_device(
    gateway: Gateway, params: ConnectParams, nonce: str, client: ClientAddress
) -> VerifiedDevice | None:
    """Check the device block's proof (A10); a failure is a 401 naming the check."""
    block = params.device
    if block is None:
        return None
    try:
        return verify_device_proof(
            device_id=block.id,
            public_key=block.public_key,
            signature=block.signature,
            signed_at_ms=block.signed_at,
            nonce=block.nonce,
            expected_nonce=nonce,
            is_local=client.is_local,
            client_id=params.client.id,
            client_mode=params.client.mode,
            role=params.role,
            scopes=params.scopes,
            token=params.auth.token if params.auth else None,
            now_ms=gateway.services.clock.now_ms(),
        )
    except DeviceIdentityError as exc:
        # "device-signature-expired", "device-nonce-mismatch"...: one namespace for clients.
        reason = exc.reason if exc.reason.startswith("device-") else f"device-{exc.reason}"
        raise _refuse(401, reason, exc.message) from None


def _device_meta(params: ConnectParams, client: ClientAddress) -> DeviceMeta:
    # Loopback addresses say nothing about where a device is; they are not recorded (A7).
    remote_ip = client.ip if client.ip and not is_loopback(client.ip) else None
    return DeviceMeta(
        display_name=params.client.display_name,
        platform=params.client.platform,
        client_id=params.client.id,
        client_mode=params.client.mode,
        remote_ip=remote_ip,
    )


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


_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Names that always mean "this machine" in an Origin; any other name could have been
#: pointed at 127.0.0.1 by its owner (DNS rebinding), so it must be listed explicitly.
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _origin_key(text: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) origin, lowercased, or ``None`` if it is not one."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def _host_of(host_header: str) -> str:
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def origin_allowed(
    origin: str,
    *,
    allowed: Sequence[str],
    port: int | None,
    listen_host: str,
    host_header: str | None,
) -> bool:
    """Whether a browser page from ``origin`` may use this gateway.

    Allowed: an entry of ``gateway.allowedOrigins`` (compared as scheme, host and port, so
    ``https://a.example`` and ``https://a.example:443/`` are one), ``*`` there, or the
    gateway's own origin: ``http(s)://`` a loopback name or the configured listen address,
    on the gateway's port, or the very IP address and port the client dialled. The Host
    header alone is not trusted, because a page on a name its owner re-pointed at this
    machine (DNS rebinding) sends a matching Host and Origin.
    """
    if "*" in allowed:
        return True
    key = _origin_key(origin)
    if key is None:
        # Not an http(s) origin ("null" from a file or a sandbox): only if listed verbatim.
        return origin.strip() in allowed
    if any(_origin_key(entry) == key for entry in allowed):
        return True
    _scheme, host, origin_port = key
    if port is None or origin_port != port:
        return False
    own = set(_LOOPBACK_NAMES)
    listen = _host_of(listen_host)
    if listen not in _WILDCARD_HOSTS:
        own.add(listen)
    if host in own:
        return True
    return host_header is not None and _is_ip_literal(host) and host == _host_of(host_header)


def _check_origin(gateway: Gateway, headers: Mapping[str, str]) -> None:
    """A connection carrying ``Origin`` comes from a browser page: is that page ours?"""
    origin = headers.get("origin")
    if origin is None:
        return
    config = gateway.config.gateway
    if origin_allowed(
        origin,
        allowed=config.allowed_origins,
        port=gateway.port,
        listen_host=config.host,
        host_header=headers.get("host"),
    ):
        return
    raise _refuse(
        403,
        "origin-not-allowed",
        f"origin not allowed: {origin} is not this gateway's own origin (open the UI from"
        " the gateway's address or add the origin to gateway.allowedOrigins)",
        close_reason="origin not allowed",
        origin=origin,
    )


def _hello(
    gateway: Gateway,
    connection: Connection,
    protocol: int,
    verdict: _Verdict,
    issued: IssuedToken | None,
) -> HelloOk:
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
        auth=HelloAuth(
            role=info.role,
            scopes=sorted(info.scopes),
            method=info.auth_method,
            device_id=info.device_id,
            user=verdict.user,
            device_token=issued.token if issued else None,
            token_scopes=issued.scopes if issued else None,
            issued_at_ms=issued.issued_at_ms if issued else None,
        ),
    )
