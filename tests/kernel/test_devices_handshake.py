"""Device identity, pairing, device tokens, locality, origin and rate limits at the handshake.

The device here is a client that is not ours: a raw trio-websocket connection speaking plain
JSON (the ``json`` module), with its own Ed25519 key from ``cryptography``, building and
signing the v2 payload itself. Nothing from ``kernel.client`` or ``kernel.device_identity``
is used on its side. "Remote" is a connection to 127.0.0.1 whose Host header names another
machine, which is what a client behind a port forward or a rebinding page looks like.

Operators use the kernel's own client. Gateways run on 127.0.0.1 port 0 with state in
``tmp_path``; time-dependent tests use trio's ``mock_clock`` (it moves only when told).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from kernel import (
    READ,
    Call,
    GatewayError,
    GatewayStartupError,
    MethodSpec,
    hookimpl,
    open_client,
    open_gateway,
)
from kernel.handshake import origin_allowed
from plugins.devices import DevicesPlugin

PAIRING = "operator.pairing"
ELEVEN_MINUTES_MS = 11 * 60 * 1000


# -- a client that is not ours ----------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class ForeignDevice:
    """An Ed25519 device identity kept and used the way a third-party client would."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.raw_public_key = raw
        self.public_key = b64url(raw)
        self.device_id = hashlib.sha256(raw).hexdigest()
        self.device_token: str | None = None

    def block(
        self,
        *,
        nonce: str | None,
        role: str = "operator",
        scopes: list[str],
        token: str | None,
        client_id: str = "test",
        mode: str = "test",
        signed_at: int | None = None,
    ) -> dict[str, Any]:
        signed_at = int(time.time() * 1000) if signed_at is None else signed_at
        fields = [
            "v2" if nonce else "v1",
            self.device_id,
            client_id,
            mode,
            role,
            ",".join(scopes),
            str(signed_at),
            token or "",
        ]
        if nonce:
            fields.append(nonce)
        signature = self.key.sign("|".join(fields).encode())
        block: dict[str, Any] = {
            "id": self.device_id,
            "publicKey": self.public_key,
            "signature": b64url(signature),
            "signedAt": signed_at,
        }
        if nonce:
            block["nonce"] = nonce
        return block


def connect_params(
    *,
    token: str | None = None,
    password: str | None = None,
    scopes: list[str] | None = None,
    role: str = "operator",
    device: dict[str, Any] | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "minProtocol": 3,
        "maxProtocol": 3,
        "client": {"id": "test", "version": "9.9", "platform": "elsewhere", "mode": "test"},
        "role": role,
        "scopes": scopes if scopes is not None else [],
    }
    auth = {k: v for k, v in (("token", token), ("password", password)) if v is not None}
    if auth:
        params["auth"] = auth
    if device is not None:
        params["device"] = device
    return params


@dataclass
class Attempt:
    """One raw connect: the challenge, the answer, and the close if the gateway closed."""

    challenge: dict[str, Any]
    answer: dict[str, Any]
    ws: WebSocketConnection
    close_code: int | None = None
    close_reason: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.answer.get("ok"))

    @property
    def error(self) -> dict[str, Any]:
        return self.answer.get("error") or {}

    @property
    def auth(self) -> dict[str, Any]:
        return self.answer["payload"]["auth"]

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        await self.ws.send_message(
            json.dumps({"type": "req", "id": method, "method": method, "params": params or {}})
        )
        while True:
            frame = json.loads(await self.ws.get_message())
            if frame.get("type") == "res" and frame.get("id") == method:
                return frame
            self.events.append(frame)


ParamsFor = Callable[[dict[str, Any]], dict[str, Any]]


@asynccontextmanager
async def raw_connect(
    port: int,
    params_for: ParamsFor,
    *,
    host: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> AsyncIterator[Attempt]:
    """Connect to 127.0.0.1:``port`` sending ``host`` as the Host header; ``params_for`` gets
    the challenge payload and returns the connect params."""
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        extra = [(k.encode(), v.encode()) for k, v in headers or ()]
        ws = await wrap_client_stream(
            nursery, stream, host or f"127.0.0.1:{port}", "/", extra_headers=extra
        )
        challenge = json.loads(await ws.get_message())
        assert challenge["event"] == "connect.challenge"
        request = {
            "type": "req",
            "id": "hello",
            "method": "connect",
            "params": params_for(challenge["payload"]),
        }
        await ws.send_message(json.dumps(request))
        attempt = Attempt(challenge["payload"], json.loads(await ws.get_message()), ws)
        if not attempt.ok:
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                attempt.close_code = closed.reason.code
                attempt.close_reason = closed.reason.reason
        try:
            yield attempt
        finally:
            await ws.aclose()
            nursery.cancel_scope.cancel()


async def device_connect(
    port: int,
    device: ForeignDevice,
    *,
    token: str | None,
    scopes: list[str],
    host: str | None = None,
    role: str = "operator",
    headers: list[tuple[str, str]] | None = None,
    signed_at: Callable[[dict[str, Any]], int] | None = None,
    tamper: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> Attempt:
    """A signed v2 connect that is closed again at once; returns what the gateway said."""

    def params_for(challenge: dict[str, Any]) -> dict[str, Any]:
        block = device.block(
            nonce=challenge["nonce"],
            role=role,
            scopes=scopes,
            token=token,
            signed_at=signed_at(challenge) if signed_at else None,
        )
        params = connect_params(token=token, scopes=scopes, role=role, device=block)
        if tamper is not None:
            tamper(params, challenge)
        return params

    async with raw_connect(port, params_for, host=host, headers=headers) as attempt:
        return attempt


def remote_host(port: int) -> str:
    return f"gateway.example.net:{port}"


# -- the gateway under test -------------------------------------------------------------------


class ProbePlugin:
    """Answers who the caller is, so tests can see what a connection was granted."""

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [MethodSpec("probe.whoami", self.whoami, READ)]

    async def whoami(self, call: Call, params: Any) -> dict[str, Any]:
        info = call.connection
        return {
            "scopes": sorted(info.scopes),
            "authMethod": info.auth_method,
            "deviceId": info.device_id,
            "isLocal": info.is_local,
        }


def write_config(state_dir: Path, text: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "config.toml").write_text(text, encoding="utf-8")


@asynccontextmanager
async def running(state_dir: Path, *, devices_plugin: bool = True) -> AsyncIterator[Any]:
    plugins: dict[str, object] = {"probe": ProbePlugin()}
    if devices_plugin:
        plugins["devices"] = DevicesPlugin()
    async with open_gateway(
        state_dir=state_dir, port=0, use_entry_points=False, plugins=plugins
    ) as gw:
        yield gw


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Any]:
    async with running(tmp_path) as gw:
        yield gw


def url(gateway: Any) -> str:
    return f"ws://127.0.0.1:{gateway.port}"


# -- done when: local ----------------------------------------------------------------------------


async def test_local_device_pairs_with_the_shared_token_and_its_token_then_works_alone(
    gateway: Any,
) -> None:
    device = ForeignDevice()
    shared = gateway.auth.token
    first = await device_connect(gateway.port, device, token=shared, scopes=[READ])
    assert first.ok, first.error
    auth = first.auth
    assert auth["method"] == "token"
    assert auth["deviceId"] == device.device_id
    assert len(auth["deviceToken"]) == 43  # 32 bytes, base64url, no padding
    assert auth["tokenScopes"] == [READ]
    device_token = auth["deviceToken"]
    assert device_token != shared

    def alone(challenge: dict[str, Any]) -> dict[str, Any]:
        block = device.block(nonce=challenge["nonce"], scopes=[READ], token=device_token)
        return connect_params(token=device_token, scopes=[READ], device=block)

    async with raw_connect(gateway.port, alone) as second:
        assert second.ok, second.error
        assert second.auth["method"] == "device-token"
        assert "deviceToken" not in second.auth  # shown once, on the connect that minted it
        answer = await second.call("probe.whoami")
        assert answer["payload"] == {
            "scopes": [READ],
            "authMethod": "device-token",
            "deviceId": device.device_id,
            "isLocal": True,
        }

    again = await device_connect(gateway.port, device, token=shared, scopes=[READ])
    assert again.ok and "deviceToken" not in again.auth  # still holds a live token


async def test_tampered_signature_is_refused_and_closed_1008(gateway: Any) -> None:
    def flip_scopes(params: dict[str, Any], challenge: dict[str, Any]) -> None:
        params["scopes"] = ["operator.admin"]  # signed for read, asks for admin

    attempt = await device_connect(
        gateway.port, ForeignDevice(), token=gateway.auth.token, scopes=[READ], tamper=flip_scopes
    )
    assert attempt.error["code"] == 401
    assert attempt.error["details"]["authReason"] == "device-signature-invalid"
    assert attempt.close_code == 1008

    def flip_byte(params: dict[str, Any], challenge: dict[str, Any]) -> None:
        raw = bytearray(base64.urlsafe_b64decode(params["device"]["signature"] + "=="))
        raw[10] ^= 0x01
        params["device"]["signature"] = b64url(bytes(raw))

    attempt = await device_connect(
        gateway.port, ForeignDevice(), token=gateway.auth.token, scopes=[READ], tamper=flip_byte
    )
    assert attempt.error["details"]["authReason"] == "device-signature-invalid"
    assert attempt.close_code == 1008


@pytest.mark.parametrize("skew_ms", [-ELEVEN_MINUTES_MS, ELEVEN_MINUTES_MS])
async def test_a_signature_eleven_minutes_off_is_refused(gateway: Any, skew_ms: int) -> None:
    attempt = await device_connect(
        gateway.port,
        ForeignDevice(),
        token=gateway.auth.token,
        scopes=[READ],
        signed_at=lambda challenge: challenge["ts"] + skew_ms,
    )
    assert attempt.error["code"] == 401
    assert attempt.error["details"]["authReason"] == "device-signature-expired"
    assert "expired" in attempt.error["message"]
    assert attempt.close_code == 1008


async def test_a_signature_nine_minutes_old_is_accepted(gateway: Any) -> None:
    attempt = await device_connect(
        gateway.port,
        ForeignDevice(),
        token=gateway.auth.token,
        scopes=[READ],
        signed_at=lambda challenge: challenge["ts"] - 9 * 60 * 1000,
    )
    assert attempt.ok, attempt.error


# -- bad inputs --------------------------------------------------------------------------------


def _rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize(
    ("field_name", "value", "auth_reason"),
    [
        ("publicKey", "not base64 at all!", "device-public-key-invalid"),
        ("publicKey", b64url(b"\x01" * 31), "device-public-key-invalid"),
        ("publicKey", _rsa_pem(), "device-public-key-invalid"),
        (
            "publicKey",
            b64url(
                Ed25519PrivateKey.generate()
                .public_key()
                .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            ),
            "device-id-mismatch",
        ),
        ("id", "0" * 64, "device-id-mismatch"),
        ("signature", "%%%", "device-signature-invalid"),
        ("signature", b64url(b"\x00" * 63), "device-signature-invalid"),
        ("signature", "", "device-signature-invalid"),
        ("nonce", "not-the-challenge", "device-nonce-mismatch"),
    ],
)
async def test_malformed_device_blocks_are_refused_naming_the_check(
    gateway: Any, field_name: str, value: str, auth_reason: str
) -> None:
    def replace(params: dict[str, Any], challenge: dict[str, Any]) -> None:
        params["device"][field_name] = value

    attempt = await device_connect(
        gateway.port, ForeignDevice(), token=gateway.auth.token, scopes=[READ], tamper=replace
    )
    assert attempt.error["code"] == 401, attempt.answer
    assert attempt.error["details"]["authReason"] == auth_reason
    assert attempt.close_code == 1008


@pytest.mark.parametrize(
    "device_block",
    [
        {"id": "x", "publicKey": "y", "signature": "z"},  # signedAt missing
        {"id": "x", "publicKey": "y", "signature": "z", "signedAt": "yesterday"},
        {"id": "x", "publicKey": "y", "signature": "z", "signedAt": 1, "extra": True},
        "a string",
    ],
)
async def test_device_blocks_of_the_wrong_shape_are_400(gateway: Any, device_block: Any) -> None:
    def params_for(challenge: dict[str, Any]) -> dict[str, Any]:
        params = connect_params(token=gateway.auth.token)
        params["device"] = device_block
        return params

    async with raw_connect(gateway.port, params_for) as attempt:
        assert attempt.error["code"] == 400
        assert "device" in attempt.error["message"]
        assert attempt.close_code == 1008


async def test_a_remote_device_must_sign_the_nonce(gateway: Any) -> None:
    device = ForeignDevice()

    def v1(challenge: dict[str, Any]) -> dict[str, Any]:
        block = device.block(nonce=None, scopes=[READ], token=gateway.auth.token)
        return connect_params(token=gateway.auth.token, scopes=[READ], device=block)

    async with raw_connect(gateway.port, v1, host=remote_host(gateway.port)) as attempt:
        assert attempt.error["details"]["authReason"] == "device-nonce-required"
        assert attempt.close_code == 1008

    # The same unsigned-nonce (v1) proof is fine from the machine itself.
    async with raw_connect(gateway.port, v1) as attempt:
        assert attempt.ok, attempt.error


async def test_a_signed_connect_replayed_on_another_connection_is_refused(gateway: Any) -> None:
    device = ForeignDevice()
    token = gateway.auth.token
    captured: dict[str, Any] = {}

    def original(challenge: dict[str, Any]) -> dict[str, Any]:
        captured.update(
            connect_params(
                token=token,
                scopes=[READ],
                device=device.block(nonce=challenge["nonce"], scopes=[READ], token=token),
            )
        )
        return captured

    async with raw_connect(gateway.port, original) as first:
        assert first.ok

    async with raw_connect(gateway.port, lambda challenge: captured) as replay:
        assert replay.error["code"] == 401
        assert replay.error["details"]["authReason"] == "device-nonce-mismatch"
        assert replay.close_code == 1008

    # Swapping in the new nonce without re-signing breaks the signature instead.
    def swapped(challenge: dict[str, Any]) -> dict[str, Any]:
        params = json.loads(json.dumps(captured))
        params["device"]["nonce"] = challenge["nonce"]
        return params

    async with raw_connect(gateway.port, swapped) as replay:
        assert replay.error["details"]["authReason"] == "device-signature-invalid"


async def test_a_wrong_shared_token_names_the_check(gateway: Any) -> None:
    async with raw_connect(
        gateway.port, lambda challenge: connect_params(token="wrong", scopes=[READ])
    ) as attempt:
        assert attempt.error["code"] == 401
        assert attempt.error["details"]["authReason"] == "token-mismatch"
        assert attempt.close_code == 1008
    async with raw_connect(gateway.port, lambda challenge: connect_params(scopes=[READ])) as a:
        assert a.error["details"]["authReason"] == "token-missing"


async def test_a_device_token_only_works_with_its_own_device(gateway: Any) -> None:
    owner, other = ForeignDevice(), ForeignDevice()
    first = await device_connect(gateway.port, owner, token=gateway.auth.token, scopes=[READ])
    stolen = first.auth["deviceToken"]
    attempt = await device_connect(gateway.port, other, token=stolen, scopes=[READ])
    assert attempt.error["code"] == 401
    # The other device holds no token, so the token counts as a (wrong) shared secret.
    assert attempt.error["details"]["authReason"] == "token-mismatch"
    assert attempt.error["details"]["deviceTokenReason"] == "device-token-not-paired"


async def test_a_device_token_covers_no_more_than_its_scopes(gateway: Any) -> None:
    device = ForeignDevice()
    first = await device_connect(gateway.port, device, token=gateway.auth.token, scopes=[READ])
    token = first.auth["deviceToken"]
    attempt = await device_connect(
        gateway.port, device, token=token, scopes=[READ, "operator.write"]
    )
    assert attempt.error["code"] == 401
    assert attempt.error["details"]["authReason"] == "device-token-scope-exceeded"
    assert "operator.write" in attempt.error["message"]

    wrong_role = await device_connect(gateway.port, device, token=token, scopes=[], role="node")
    assert wrong_role.error["details"]["authReason"] == "token-mismatch"
    assert wrong_role.error["details"]["deviceTokenReason"] == "device-token-no-token"


async def test_local_clients_without_a_device_get_the_scopes_they_ask_for(gateway: Any) -> None:
    async with open_client(url(gateway), token=gateway.auth.token, scopes=[READ, PAIRING]) as c:
        assert c.hello["auth"]["scopes"] == sorted([READ, PAIRING])
        assert "deviceToken" not in c.hello["auth"]
        assert (await c.call("probe.whoami"))["scopes"] == sorted([READ, PAIRING])


async def test_local_scope_upgrade_is_approved_silently(gateway: Any) -> None:
    device = ForeignDevice()
    async with open_client(url(gateway), token=gateway.auth.token, scopes=[PAIRING]) as operator:
        first = await device_connect(gateway.port, device, token=gateway.auth.token, scopes=[READ])
        token = first.auth["deviceToken"]
        resolved = await operator.next_event("device.pair.resolved")
        assert resolved["payload"]["deviceId"] == device.device_id
        assert resolved["payload"]["decision"] == "approved"

        wider = [READ, "operator.write"]
        upgraded = await device_connect(
            gateway.port, device, token=gateway.auth.token, scopes=wider
        )
        assert upgraded.ok, upgraded.error
        assert "deviceToken" not in upgraded.auth  # the live token was widened instead
        assert (await operator.next_event("device.pair.resolved"))["payload"]["decision"] == (
            "approved"
        )
    widened = await device_connect(gateway.port, device, token=token, scopes=wider)
    assert widened.ok and widened.auth["method"] == "device-token"


# -- done when: remote ---------------------------------------------------------------------------


async def test_remote_device_is_paired_by_an_operator_then_revoked(gateway: Any) -> None:
    device = ForeignDevice()
    shared = gateway.auth.token
    remote = remote_host(gateway.port)
    async with (
        open_client(url(gateway), token=shared, scopes=[PAIRING]) as operator,
        open_client(url(gateway), token=shared, scopes=[READ]) as onlooker,
    ):
        refused = await device_connect(
            gateway.port, device, token=shared, scopes=[READ], host=remote
        )
        assert refused.error["code"] == 403
        assert refused.error["reason"] == "NOT_PAIRED"
        details = refused.error["details"]
        assert details["authReason"] == "pairing-required"
        assert details["pairingReason"] == "not-paired"
        assert refused.close_code == 1008
        request_id = details["requestId"]

        requested = await operator.next_event("device.pair.requested")
        assert requested["payload"]["requestId"] == request_id
        assert requested["payload"]["deviceId"] == device.device_id
        assert requested["payload"]["scopes"] == [READ]

        # One request per device: asking again gets the same one, and no second event.
        again = await device_connect(gateway.port, device, token=shared, scopes=[READ], host=remote)
        assert again.error["details"]["requestId"] == request_id

        # The event is scoped: a client without operator.pairing never saw it.
        await onlooker.call("probe.whoami")
        assert not [e for e in onlooker.events_nowait() if e["event"].startswith("device.")]

        approved = await operator.call("device.pair.approve", {"requestId": request_id})
        assert approved["device"]["deviceId"] == device.device_id
        resolved = await operator.next_event("device.pair.resolved")
        assert resolved["payload"] == {
            "requestId": request_id,
            "deviceId": device.device_id,
            "decision": "approved",
            "ts": resolved["payload"]["ts"],
        }
        assert not [e for e in operator.events_nowait() if e["event"] == "device.pair.requested"]

        paired = await device_connect(
            gateway.port, device, token=shared, scopes=[READ], host=remote
        )
        assert paired.ok, paired.error
        token = paired.auth["deviceToken"]

        def with_token(challenge: dict[str, Any]) -> dict[str, Any]:
            block = device.block(nonce=challenge["nonce"], scopes=[READ], token=token)
            return connect_params(token=token, scopes=[READ], device=block)

        async with raw_connect(gateway.port, with_token, host=remote) as session:
            assert session.ok and session.auth["method"] == "device-token"
            whoami = await session.call("probe.whoami")
            assert whoami["payload"]["isLocal"] is False

            revoked = await operator.call(
                "device.token.revoke", {"deviceId": device.device_id, "role": "operator"}
            )
            assert revoked["disconnected"] == 1
            with pytest.raises(ConnectionClosed) as closed:
                await session.ws.get_message()
            assert closed.value.reason.code == 1008

        refused = await device_connect(
            gateway.port, device, token=token, scopes=[READ], host=remote
        )
        assert refused.error["code"] == 401
        assert refused.error["details"]["authReason"] == "device-token-revoked"

        # Sticky: the shared secret still lets the paired device in, but mints nothing.
        shared_again = await device_connect(
            gateway.port, device, token=shared, scopes=[READ], host=remote
        )
        assert shared_again.ok, shared_again.error
        assert "deviceToken" not in shared_again.auth
        local_again = await device_connect(gateway.port, device, token=shared, scopes=[READ])
        assert "deviceToken" not in local_again.auth

        rotated = await operator.call(
            "device.token.rotate", {"deviceId": device.device_id, "role": "operator"}
        )
        fresh = rotated["token"]
        assert fresh != token and rotated["scopes"] == [READ]
    old = await device_connect(gateway.port, device, token=token, scopes=[READ], host=remote)
    assert old.error["details"]["authReason"] == "device-token-mismatch"
    new = await device_connect(gateway.port, device, token=fresh, scopes=[READ], host=remote)
    assert new.ok and new.auth["method"] == "device-token"


async def test_a_remote_client_without_a_device_is_refused(gateway: Any) -> None:
    async with raw_connect(
        gateway.port,
        lambda challenge: connect_params(token=gateway.auth.token, scopes=[READ]),
        host=remote_host(gateway.port),
    ) as attempt:
        assert attempt.error["code"] == 403
        assert attempt.error["reason"] == "NOT_PAIRED"
        assert attempt.error["details"]["authReason"] == "device-identity-required"
        assert attempt.close_code == 1008


@pytest.mark.parametrize(
    "headers",
    [[("X-Forwarded-For", "127.0.0.1")], [("X-Real-IP", "127.0.0.1")]],
)
async def test_forwarding_headers_from_an_untrusted_peer_make_a_client_remote(
    gateway: Any, headers: list[tuple[str, str]]
) -> None:
    async with raw_connect(
        gateway.port,
        lambda challenge: connect_params(token=gateway.auth.token, scopes=[READ]),
        headers=headers,
    ) as attempt:
        assert attempt.error["details"]["authReason"] == "device-identity-required"


async def test_remote_scope_upgrade_goes_through_pairing(gateway: Any) -> None:
    device = ForeignDevice()
    shared = gateway.auth.token
    first = await device_connect(gateway.port, device, token=shared, scopes=[READ])
    assert first.ok
    wider = [READ, "operator.write"]
    upgrade = await device_connect(
        gateway.port, device, token=shared, scopes=wider, host=remote_host(gateway.port)
    )
    assert upgrade.error["reason"] == "NOT_PAIRED"
    assert upgrade.error["details"]["pairingReason"] == "scope-upgrade"
    node = await device_connect(
        gateway.port, device, token=shared, scopes=[], role="node", host=remote_host(gateway.port)
    )
    # Still the same pending request: one per device.
    assert node.error["details"]["requestId"] == upgrade.error["details"]["requestId"]


async def test_a_pending_request_expires_after_five_minutes(gateway: Any) -> None:
    device = ForeignDevice()
    clock = gateway.services.clock
    now = [clock.now_ms()]
    clock.now_ms = lambda: now[0]  # the wall clock the gateway stamps and expires with
    remote = remote_host(gateway.port)

    def server_time(challenge: dict[str, Any]) -> int:
        return challenge["ts"]  # sign on the gateway's (faked) clock

    first = await device_connect(
        gateway.port,
        device,
        token=gateway.auth.token,
        scopes=[READ],
        host=remote,
        signed_at=server_time,
    )
    request_id = first.error["details"]["requestId"]
    assert first.error["details"]["expiresAtMs"] == now[0] + 300_000

    now[0] += 299_999
    async with open_client(url(gateway), token=gateway.auth.token, scopes=[PAIRING]) as operator:
        listing = await operator.call("device.pair.list")
        assert [r["requestId"] for r in listing["pending"]] == [request_id]
        now[0] += 1
        assert (await operator.call("device.pair.list"))["pending"] == []
        with pytest.raises(GatewayError) as refused:
            await operator.call("device.pair.approve", {"requestId": request_id})
        assert refused.value.code == 404

    second = await device_connect(
        gateway.port,
        device,
        token=gateway.auth.token,
        scopes=[READ],
        host=remote,
        signed_at=server_time,
    )
    assert second.error["details"]["requestId"] != request_id


# -- auth modes ----------------------------------------------------------------------------------


async def test_password_mode_pairs_and_then_the_device_token_stands_in(tmp_path: Path) -> None:
    write_config(tmp_path, '[gateway.auth]\nmode = "password"\npassword = "correct horse"\n')
    async with running(tmp_path) as gw:
        device = ForeignDevice()

        def with_password(challenge: dict[str, Any]) -> dict[str, Any]:
            block = device.block(nonce=challenge["nonce"], scopes=[READ], token=None)
            return connect_params(password="correct horse", scopes=[READ], device=block)

        async with raw_connect(gw.port, with_password) as first:
            assert first.ok, first.error
            assert first.auth["method"] == "password"
            token = first.auth["deviceToken"]
        alone = await device_connect(gw.port, device, token=token, scopes=[READ])
        assert alone.ok and alone.auth["method"] == "device-token"

        async with raw_connect(
            gw.port, lambda challenge: connect_params(password="wrong", scopes=[READ])
        ) as wrong:
            assert wrong.error["details"]["authReason"] == "password-mismatch"


async def test_mode_none_is_refused_unless_listening_on_loopback(tmp_path: Path) -> None:
    write_config(tmp_path, '[gateway]\nhost = "0.0.0.0"\n[gateway.auth]\nmode = "none"\n')
    with pytest.raises(GatewayStartupError, match="loopback"):
        async with open_gateway(state_dir=tmp_path, port=0, use_entry_points=False):
            pass  # pragma: no cover


async def test_mode_none_on_loopback_needs_no_secret_but_remote_still_pairs(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, '[gateway.auth]\nmode = "none"\n')
    async with running(tmp_path) as gw:
        async with raw_connect(gw.port, lambda challenge: connect_params(scopes=[READ])) as a:
            assert a.ok and a.auth["method"] == "none"
        remote = await device_connect(
            gw.port, ForeignDevice(), token=None, scopes=[READ], host=remote_host(gw.port)
        )
        assert remote.error["reason"] == "NOT_PAIRED"
        assert remote.error["details"]["authReason"] == "pairing-required"


async def test_trusted_proxy_mode_takes_the_user_from_the_proxy_only(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        '[gateway]\ntrustedProxies = ["127.0.0.1"]\n'
        '[gateway.auth]\nmode = "trusted-proxy"\n'
        '[gateway.auth.trustedProxy]\nuserHeader = "x-forwarded-user"\n'
        'requiredHeaders = ["x-forwarded-proto"]\nallowUsers = ["alice"]\n',
    )
    async with running(tmp_path) as gw:
        local_via_proxy = [
            ("X-Forwarded-For", "127.0.0.1"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-User", "alice"),
        ]

        def no_secret(challenge: dict[str, Any]) -> dict[str, Any]:
            return connect_params(scopes=[READ])

        async with raw_connect(
            gw.port, no_secret, host=f"localhost:{gw.port}", headers=local_via_proxy
        ) as attempt:
            assert attempt.ok, attempt.error
            assert attempt.auth["method"] == "trusted-proxy"
            assert attempt.auth["user"] == "alice"

        for headers, reason in [
            (local_via_proxy[:2], "trusted-proxy-user-missing"),
            ([local_via_proxy[0], local_via_proxy[2]], "trusted-proxy-missing-header"),
            (
                [*local_via_proxy[:2], ("X-Forwarded-User", "mallory")],
                "trusted-proxy-user-not-allowed",
            ),
        ]:
            async with raw_connect(
                gw.port, no_secret, host=f"localhost:{gw.port}", headers=headers
            ) as attempt:
                assert attempt.error["code"] == 401
                assert attempt.error["details"]["authReason"] == reason

        # A client the proxy forwards from elsewhere is remote: it needs a device and pairing.
        remote = [("X-Forwarded-For", "203.0.113.9"), *local_via_proxy[1:]]
        async with raw_connect(gw.port, no_secret, headers=remote) as attempt:
            assert attempt.error["details"]["authReason"] == "device-identity-required"
        paired = await device_connect(
            gw.port, ForeignDevice(), token=None, scopes=[READ], headers=remote
        )
        assert paired.error["details"]["authReason"] == "pairing-required"


async def test_trusted_proxy_mode_ignores_a_user_header_from_anyone_else(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        '[gateway]\ntrustedProxies = ["10.0.0.0/8"]\n[gateway.auth]\nmode = "trusted-proxy"\n',
    )
    async with (
        running(tmp_path) as gw,
        raw_connect(
            gw.port,
            lambda challenge: connect_params(scopes=[READ]),
            headers=[("X-Forwarded-User", "alice")],
        ) as attempt,
    ):
        assert attempt.error["code"] == 401
        assert attempt.error["details"]["authReason"] == "trusted-proxy-untrusted-source"


# -- origin ----------------------------------------------------------------------------------------


async def test_browser_origins_must_be_the_gateways_own_or_allowed(tmp_path: Path) -> None:
    write_config(tmp_path, '[gateway]\nallowedOrigins = ["https://ui.example.org"]\n')
    async with running(tmp_path) as gw:
        token = gw.auth.token

        async def attempt(origin: str, host: str | None = None) -> Attempt:
            async with raw_connect(
                gw.port,
                lambda challenge: connect_params(token=token, scopes=[READ]),
                host=host,
                headers=[("Origin", origin)],
            ) as result:
                return result

        for good in (
            f"http://127.0.0.1:{gw.port}",
            f"http://localhost:{gw.port}",
            f"https://LOCALHOST:{gw.port}/",
            "https://ui.example.org",
            "https://ui.example.org:443",
        ):
            result = await attempt(good)
            assert result.ok, (good, result.error)

        for bad, host in (
            ("https://evil.example", None),
            ("null", None),
            (f"http://127.0.0.1:{gw.port + 1}", None),
            ("http://ui.example.org", None),  # scheme differs from the allowed entry
            # DNS rebinding: the page's name now points here, Host and Origin agree.
            (f"http://rebound.example:{gw.port}", f"rebound.example:{gw.port}"),
        ):
            result = await attempt(bad, host)
            assert result.error["code"] == 403, bad
            assert result.error["details"]["authReason"] == "origin-not-allowed"
            assert result.error["details"]["origin"] == bad
            assert result.close_code == 1008


def test_origin_allowed_rules() -> None:
    def check(
        origin: str,
        *,
        allowed: tuple[str, ...] = (),
        host: str | None = None,
        listen: str = "127.0.0.1",
    ) -> bool:
        return origin_allowed(
            origin, allowed=allowed, port=18789, listen_host=listen, host_header=host
        )

    assert check("http://[::1]:18789")
    assert check("http://192.168.1.5:18789", listen="192.168.1.5")
    assert not check("http://192.168.1.5:18789")
    # The very address the client dialled, as an IP literal, cannot be a rebinding.
    assert check("http://192.168.1.5:18789", host="192.168.1.5:18789", listen="0.0.0.0")
    assert not check("http://box.lan:18789", host="box.lan:18789", listen="0.0.0.0")
    assert check("http://box.lan:18789", allowed=("http://box.lan:18789",))
    assert check("https://anything.example", allowed=("*",))
    assert check("null", allowed=("null",))
    assert not check("http://:18789")
    assert not check("http://localhost:notaport")
    assert not check("ftp://localhost:18789")


# -- rate limiting -------------------------------------------------------------------------------


def _limit_config(state_dir: Path, extra: str = "") -> None:
    write_config(
        state_dir,
        "[gateway.auth.rateLimit]\nmaxAttempts = 3\nwindowMs = 60000\nlockoutMs = 300000\n"
        f"exemptLoopback = false\n{extra}",
    )


async def test_failed_attempts_lock_an_address_out_until_the_lockout_ends(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    _limit_config(tmp_path)
    async with running(tmp_path) as gw:

        async def connect(token: str) -> Attempt:
            async with raw_connect(
                gw.port, lambda challenge: connect_params(token=token, scopes=[READ])
            ) as attempt:
                return attempt

        for _ in range(3):  # the third failure locks the address out
            failed = await connect("guess")
            assert failed.error["code"] == 401
            assert failed.error["details"]["authReason"] == "token-mismatch"

        locked = await connect(gw.auth.token)  # even the right token, while locked out
        assert locked.error["code"] == 429
        assert locked.error["reason"] == "RATE_LIMITED"
        assert locked.error["retryAfterMs"] == 300_000
        assert locked.error["retryable"] is True
        assert locked.error["details"]["authReason"] == "rate-limited"
        assert locked.close_code == 1008

        mock_clock.jump(299)
        assert (await connect(gw.auth.token)).error["retryAfterMs"] == 1_000
        mock_clock.jump(1)
        assert (await connect(gw.auth.token)).ok


async def test_failures_age_out_of_the_window(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    _limit_config(tmp_path)
    async with running(tmp_path) as gw:

        async def connect(token: str) -> Attempt:
            async with raw_connect(
                gw.port, lambda challenge: connect_params(token=token, scopes=[READ])
            ) as attempt:
                return attempt

        await connect("guess")
        await connect("guess")
        mock_clock.jump(61)
        await connect("guess")
        assert (await connect(gw.auth.token)).ok  # only one failure left in the window


async def test_device_token_guesses_are_limited_too(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    _limit_config(tmp_path)
    async with running(tmp_path) as gw:
        device = ForeignDevice()
        first = await device_connect(gw.port, device, token=gw.auth.token, scopes=[READ])
        token = first.auth["deviceToken"]
        for _ in range(3):
            guess = await device_connect(gw.port, device, token="x" * 43, scopes=[READ])
            assert guess.error["details"]["authReason"] == "device-token-mismatch"
        locked = await device_connect(gw.port, device, token=token, scopes=[READ])
        assert locked.error["code"] == 429
        assert locked.error["details"]["limiter"] == "device-token"
        # A token beside a device block could be either kind, so that form is locked out
        # whole; a plain shared-secret connect is counted apart and still works.
        with_shared = await device_connect(gw.port, device, token=gw.auth.token, scopes=[READ])
        assert with_shared.error["code"] == 429
        async with raw_connect(
            gw.port, lambda challenge: connect_params(token=gw.auth.token, scopes=[READ])
        ) as plain:
            assert plain.ok
        mock_clock.jump(300)
        assert (await device_connect(gw.port, device, token=token, scopes=[READ])).ok


async def test_a_locked_out_address_cannot_tell_a_right_guess_from_a_wrong_one(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    _limit_config(tmp_path)
    async with running(tmp_path) as gw:
        # Guesses sent beside a fresh (unpaired) device key are shared-secret guesses.
        for _ in range(3):
            guess = await device_connect(gw.port, ForeignDevice(), token="guess", scopes=[READ])
            assert guess.error["details"]["authReason"] == "token-mismatch"
        answers = []
        for token in ("guess", gw.auth.token):
            attempt = await device_connect(gw.port, ForeignDevice(), token=token, scopes=[READ])
            answers.append((attempt.error["code"], attempt.error["details"]))
            async with raw_connect(
                gw.port, lambda challenge, token=token: connect_params(token=token, scopes=[READ])
            ) as plain:
                answers.append((plain.error["code"], plain.error["details"]))
        assert answers == [(429, {"authReason": "rate-limited", "limiter": "shared-secret"})] * 4


async def test_loopback_is_exempt_by_default(tmp_path: Path) -> None:
    async with running(tmp_path) as gw:
        for _ in range(12):
            async with raw_connect(
                gw.port, lambda challenge: connect_params(token="guess", scopes=[READ])
            ) as attempt:
                assert attempt.error["code"] == 401
        async with raw_connect(
            gw.port, lambda challenge: connect_params(token=gw.auth.token, scopes=[READ])
        ) as attempt:
            assert attempt.ok


async def test_rate_limiting_can_be_turned_off(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    _limit_config(tmp_path)
    config = (tmp_path / "config.toml").read_text() + "enabled = false\n"
    (tmp_path / "config.toml").write_text(config)
    async with running(tmp_path) as gw:
        assert gw.rate_limiter is None
        for _ in range(5):
            async with raw_connect(
                gw.port, lambda challenge: connect_params(token="guess", scopes=[READ])
            ) as attempt:
                assert attempt.error["code"] == 401
