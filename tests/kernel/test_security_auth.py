"""Issue 3 gaps closed at the handshake: default rate limiting, start-up refusals, PEM keys,
RFC 7239 ``Forwarded``, and a role upgrade through pairing from end to end.

The device is the foreign client of ``test_devices_handshake`` (raw trio-websocket, plain
JSON, its own Ed25519 key); gateways run on 127.0.0.1 port 0 with state in ``tmp_path``.
A "remote" client here is one behind a trusted proxy on 127.0.0.1 that names it in
``X-Forwarded-For``, which is how a test gets a non-loopback client address.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio.testing
from cryptography.hazmat.primitives import serialization
from test_devices_handshake import (
    PAIRING,
    Attempt,
    ForeignDevice,
    connect_params,
    device_connect,
    raw_connect,
    remote_host,
    running,
    url,
    write_config,
)

from kernel import READ, GatewayStartupError, open_client, open_gateway
from kernel.auth import SharedSecretAuth, StartupRefused
from kernel.config import AuthConfig, GatewayConfig

PROXIED = [("X-Forwarded-For", "203.0.113.9")]


async def _plain(gw: Any, token: str, headers: list[tuple[str, str]] | None = None) -> Attempt:
    async with raw_connect(
        gw.port, lambda challenge: connect_params(token=token, scopes=[READ]), headers=headers
    ) as attempt:
        return attempt


# -- rate limiting is on by default, with upstream's numbers -------------------------------------


async def test_rate_limiting_is_on_by_default_with_upstreams_numbers(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    write_config(tmp_path, '[gateway]\ntrustedProxies = ["127.0.0.1"]\n')  # no rateLimit
    async with running(tmp_path) as gw:
        for _ in range(9):
            assert (await _plain(gw, "guess", PROXIED)).error["code"] == 401
        mock_clock.jump(59)  # all ten inside one 60 s window
        tenth = await _plain(gw, "guess", PROXIED)
        assert tenth.error["details"]["authReason"] == "token-mismatch"

        locked = await _plain(gw, gw.auth.token, PROXIED)
        assert locked.error["code"] == 429
        assert locked.error["retryAfterMs"] == 300_000
        assert locked.error["details"] == {"authReason": "rate-limited", "limiter": "shared-secret"}
        assert locked.close_code == 1008
        # Per address: another proxied client and the operator on the host are not locked.
        other = await _plain(gw, gw.auth.token, [("X-Forwarded-For", "203.0.113.10")])
        assert other.error["details"]["authReason"] == "device-identity-required"
        assert (await _plain(gw, gw.auth.token)).ok

        mock_clock.jump(299)
        assert (await _plain(gw, gw.auth.token, PROXIED)).error["retryAfterMs"] == 1_000
        mock_clock.jump(1)
        # Past the secret check again: refused only because a remote client needs a device.
        after = await _plain(gw, gw.auth.token, PROXIED)
        assert after.error["details"]["authReason"] == "device-identity-required"


# -- auth modes refused at start-up ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('[gateway.auth]\nmode = "password"\n', "no password is set"),
        ('[gateway.auth]\nmode = "trusted-proxy"\n', "trustedProxies"),
        ('[gateway]\ntrustedProxies = ["10.0.0.0/33"]\n', "10.0.0.0/33"),
        ('[gateway]\nhost = "::"\n[gateway.auth]\nmode = "none"\n', "only on loopback"),
        ("[gateway.auth.rateLimit]\nmaxAttempts = 0\n", "gateway.auth.rateLimit.maxAttempts"),
        ("[gateway.auth.rateLimit]\nlockoutMs = -1\n", "gateway.auth.rateLimit.lockoutMs"),
    ],
)
async def test_unsafe_or_incomplete_auth_settings_stop_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, message: str
) -> None:
    monkeypatch.delenv("ANIMA_GATEWAY_PASSWORD", raising=False)
    write_config(tmp_path, config)
    with pytest.raises(GatewayStartupError, match=message):
        async with open_gateway(state_dir=tmp_path, port=0, use_entry_points=False):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.5", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.5", False),
        ("localhost.example.net", False),
    ],
)
def test_mode_none_needs_a_loopback_listen_address(
    tmp_path: Path, host: str, allowed: bool
) -> None:
    config = GatewayConfig(host=host, auth=AuthConfig(mode="none"))
    if allowed:
        assert SharedSecretAuth(config, tmp_path).mode == "none"
    else:
        with pytest.raises(StartupRefused, match="only on loopback"):
            SharedSecretAuth(config, tmp_path)


async def _with_password(port: int, password: str) -> Attempt:
    """A plain-JSON connect that presents ``password``."""
    async with raw_connect(
        port, lambda challenge: connect_params(password=password, scopes=[READ])
    ) as attempt:
        return attempt


async def test_the_password_from_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANIMA_GATEWAY_PASSWORD", "from the environment")
    write_config(tmp_path, '[gateway.auth]\nmode = "password"\npassword = "from the file"\n')
    async with running(tmp_path) as gw:
        assert (await _with_password(gw.port, "from the environment")).ok
        refused = await _with_password(gw.port, "from the file")
        assert refused.error["details"]["authReason"] == "password-mismatch"


@pytest.mark.parametrize(
    ("auth", "env_password", "mode"),
    [
        (AuthConfig(), None, "token"),
        (AuthConfig(password="in the file"), None, "password"),
        (AuthConfig(), "in the environment", "password"),
        (AuthConfig(token="a token", password="in the file"), None, "password"),
        (AuthConfig(mode="token", password="in the file"), None, "token"),
    ],
)
def test_an_unset_mode_is_password_when_a_password_is_set_else_token(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    auth: AuthConfig,
    env_password: str | None,
    mode: str,
) -> None:
    """PROTOCOL.md A8: an explicit mode wins; else a configured password means password mode."""
    monkeypatch.delenv("ANIMA_GATEWAY_PASSWORD", raising=False)
    if env_password is not None:
        monkeypatch.setenv("ANIMA_GATEWAY_PASSWORD", env_password)

    resolved = SharedSecretAuth(GatewayConfig(auth=auth), tmp_path)

    assert resolved.mode == mode


async def test_a_password_in_the_file_alone_is_what_clients_must_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANIMA_GATEWAY_PASSWORD", raising=False)
    write_config(tmp_path, '[gateway.auth]\npassword = "from the file"\n')
    async with running(tmp_path) as gw:
        assert (await _with_password(gw.port, "from the file")).ok
        assert (await _with_password(gw.port, "a guess")).error["code"] == 401


# -- device identity: a PEM key is the same device as its raw form --------------------------------


async def test_a_pem_key_is_the_same_device_as_its_base64url_form(tmp_path: Path) -> None:
    device = ForeignDevice()
    pem = (
        device.key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )

    def as_pem(params: dict[str, Any], challenge: dict[str, Any]) -> None:
        params["device"]["publicKey"] = pem  # the signature does not cover the key's spelling

    async with running(tmp_path) as gw:
        first = await device_connect(
            gw.port, device, token=gw.auth.token, scopes=[READ], tamper=as_pem
        )
        assert first.ok, first.error
        assert first.auth["deviceId"] == device.device_id
        token = first.auth["deviceToken"]

        # The base64url spelling finds the same paired device and its token.
        alone = await device_connect(gw.port, device, token=token, scopes=[READ])
        assert alone.ok and alone.auth["method"] == "device-token"
        stored = await gw.devices.get(device.device_id)
        assert stored["publicKey"] == device.public_key


# -- locality: RFC 7239 Forwarded makes a loopback client remote ---------------------------------


async def test_a_forwarded_header_makes_a_loopback_client_remote(tmp_path: Path) -> None:
    async with running(tmp_path) as gw:
        proxied = await _plain(gw, gw.auth.token, [("Forwarded", "for=127.0.0.1")])
        assert proxied.error["code"] == 403
        assert proxied.error["details"]["authReason"] == "device-identity-required"
        device = ForeignDevice()
        pending = await device_connect(
            gw.port,
            device,
            token=gw.auth.token,
            scopes=[READ],
            headers=[("Forwarded", "for=127.0.0.1;host=localhost")],
        )
        assert pending.error["details"]["pairingReason"] == "not-paired"  # not paired silently


# -- pairing: a role upgrade goes through pairing again --------------------------------------------


async def test_a_role_upgrade_goes_through_pairing_and_gets_its_own_token(
    tmp_path: Path,
) -> None:
    device = ForeignDevice()
    async with running(tmp_path) as gw:
        shared, remote = gw.auth.token, remote_host(gw.port)
        paired = await device_connect(gw.port, device, token=shared, scopes=[READ])
        operator_token = paired.auth["deviceToken"]

        async with open_client(url(gw), token=shared, scopes=[PAIRING]) as operator:
            as_node = await device_connect(
                gw.port, device, token=shared, scopes=[], role="node", host=remote
            )
            assert as_node.error["code"] == 403 and as_node.error["reason"] == "NOT_PAIRED"
            details = as_node.error["details"]
            assert details["pairingReason"] == "role-upgrade"
            requested = await operator.next_event("device.pair.requested")
            assert requested["payload"]["role"] == "node"
            assert requested["payload"]["isRepair"] is True

            # The operator token is no way around it: it is not a node token.
            by_token = await device_connect(
                gw.port, device, token=operator_token, scopes=[], role="node", host=remote
            )
            assert by_token.error["code"] == 401
            assert by_token.error["details"]["deviceTokenReason"] == "device-token-no-token"

            await operator.call("device.pair.approve", {"requestId": details["requestId"]})

        node = await device_connect(
            gw.port, device, token=shared, scopes=[], role="node", host=remote
        )
        assert node.ok, node.error
        assert node.auth["role"] == "node" and node.auth["deviceToken"] != operator_token
        node_token = node.auth["deviceToken"]
        again = await device_connect(
            gw.port, device, token=node_token, scopes=[], role="node", host=remote
        )
        assert again.ok and again.auth["method"] == "device-token"
        still = await device_connect(gw.port, device, token=operator_token, scopes=[READ])
        assert still.ok and still.auth["method"] == "device-token"


async def test_a_loopback_relay_is_not_exempt_from_the_lockout(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path) as gw:  # default config: no trustedProxies
        relayed = [("X-Forwarded-For", "203.0.113.9")]
        for _ in range(10):
            assert (await _plain(gw, "guess", relayed)).error["code"] == 401
        assert (await _plain(gw, gw.auth.token, relayed)).error["code"] == 429
