"""The shared-secret layer of authentication: token, password, none and trusted-proxy.

Device identity and device tokens sit on top of this (``kernel.handshake``). Secrets are
compared in constant time over their SHA-256 digests, so neither their content nor their
length leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .config import GatewayConfig
from .frames import ConnectParams
from .locality import ClientAddress, is_loopback

__all__ = ["AuthOutcome", "SharedSecretAuth", "StartupRefused", "secrets_equal"]

logger = logging.getLogger(__name__)

TOKEN_FILE_NAME = "gateway.token"


class StartupRefused(Exception):
    """The auth settings are unsafe or incomplete; the gateway must not start with them."""


def secrets_equal(presented: str, expected: str) -> bool:
    return hmac.compare_digest(
        hashlib.sha256(presented.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The shared-secret verdict.

    :ivar ok: the secret (or the proxy's word) was accepted.
    :ivar method: ``token``, ``password``, ``none`` or ``trusted-proxy``.
    :ivar reason: a machine-readable cause when not ok (``token_missing``, ...).
    :ivar counts_as_failure: whether it feeds the failed-attempt rate limiter.
    """

    ok: bool
    method: str
    reason: str | None = None
    message: str | None = None
    user: str | None = None
    counts_as_failure: bool = True


def _host_is_loopback(host: str) -> bool:
    return host == "localhost" or is_loopback(host)


class SharedSecretAuth:
    """Resolves the auth mode and its secret at start-up and checks each ``connect``."""

    def __init__(self, config: GatewayConfig, state_dir: Path) -> None:
        auth = config.auth
        self.mode = auth.mode
        self.token: str | None = None
        self.password: str | None = None
        self.token_file: Path | None = None
        self.token_generated = False

        if self.mode == "token":
            self.token = os.environ.get("ANIMA_GATEWAY_TOKEN") or auth.token
            if not self.token:
                self.token, self.token_generated = _load_or_make_token(state_dir)
                self.token_file = state_dir / TOKEN_FILE_NAME
        elif self.mode == "password":
            self.password = os.environ.get("ANIMA_GATEWAY_PASSWORD") or auth.password
            if not self.password:
                raise StartupRefused(
                    "gateway.auth.mode is password but no password is set"
                    " (gateway.auth.password or ANIMA_GATEWAY_PASSWORD)"
                )
        elif self.mode == "none":
            if not _host_is_loopback(config.host):
                raise StartupRefused(
                    f"gateway.auth.mode none is allowed only on loopback; host is {config.host}"
                )
        elif self.mode == "trusted-proxy" and not config.trusted_proxies:
            raise StartupRefused("gateway.auth.mode trusted-proxy needs gateway.trustedProxies")
        self._proxy = auth.trusted_proxy

    def check(
        self, params: ConnectParams, client: ClientAddress, headers: dict[str, str]
    ) -> AuthOutcome:
        presented = params.auth
        if self.mode == "none":
            return AuthOutcome(True, "none")

        if self.mode == "trusted-proxy":
            return self._check_proxy(client, headers)

        if self.mode == "password":
            given = presented.password if presented else None
            if not given:
                return AuthOutcome(False, "password", "password_missing", "password missing")
            if secrets_equal(given, self.password or ""):
                return AuthOutcome(True, "password")
            return AuthOutcome(False, "password", "password_mismatch", "password mismatch")

        given = presented.token if presented else None
        if not given:
            return AuthOutcome(False, "token", "token_missing", "gateway token missing")
        if secrets_equal(given, self.token or ""):
            return AuthOutcome(True, "token")
        return AuthOutcome(False, "token", "token_mismatch", "gateway token mismatch")

    def _check_proxy(self, client: ClientAddress, headers: dict[str, str]) -> AuthOutcome:
        def refuse(reason: str, message: str) -> AuthOutcome:
            return AuthOutcome(False, "trusted-proxy", reason, message)

        if not client.via_trusted_proxy:
            return refuse(
                "trusted_proxy_untrusted_source", "connection is not from a trusted proxy"
            )
        for name in self._proxy.required_headers:
            if not headers.get(name.lower(), "").strip():
                return refuse("trusted_proxy_missing_header", f"proxy header {name} missing")
        user = headers.get(self._proxy.user_header.lower(), "").strip()
        if not user:
            return refuse("trusted_proxy_user_missing", "proxy did not name the user")
        if self._proxy.allow_users and user not in self._proxy.allow_users:
            return refuse("trusted_proxy_user_not_allowed", f"user {user} is not allowed")
        return AuthOutcome(True, "trusted-proxy", user=user)


def _load_or_make_token(state_dir: Path) -> tuple[str, bool]:
    """The token kept in the state directory, made (owner-only) on first start."""
    path = state_dir / TOKEN_FILE_NAME
    try:
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token, False
    except FileNotFoundError:
        pass

    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    logger.info("generated a gateway token", extra={"path": str(path)})
    return token, True
