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

from .config import AuthMode, GatewayConfig, RateLimitConfig
from .frames import ConnectParams
from .locality import ClientAddress, is_loopback
from .ratelimit import AuthRateLimiter

__all__ = [
    "AuthOutcome",
    "SharedSecretAuth",
    "StartupRefused",
    "build_rate_limiter",
    "secrets_equal",
]

logger = logging.getLogger(__name__)

TOKEN_FILE_NAME = "gateway.token"


class StartupRefused(Exception):
    """The auth settings are unsafe or incomplete; the gateway must not start with them."""


def secrets_equal(presented: str, expected: str) -> bool:
    """Compare two secrets in constant time, whatever their lengths."""
    return hmac.compare_digest(
        hashlib.sha256(presented.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The shared-secret verdict.

    :ivar ok: the secret (or the proxy's word) was accepted.
    :ivar method: ``token``, ``password``, ``none`` or ``trusted-proxy``.
    :ivar reason: which check failed, when not ok: ``token-missing``, ``token-mismatch``,
        ``password-missing``, ``password-mismatch`` or ``trusted-proxy-*``; clients get it
        as ``error.details.authReason``.
    :ivar user: the user a trusted proxy named.
    :ivar counts_as_failure: whether it feeds the failed-attempt rate limiter (a guess at
        a secret does; a misconfigured proxy does not).
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
        env_password = os.environ.get("ANIMA_GATEWAY_PASSWORD")
        self.mode: AuthMode = auth.mode or (
            "password" if env_password or auth.password else "token"
        )
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
            self.password = env_password or auth.password
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
                return AuthOutcome(
                    False, "password", "password-missing", "gateway password missing"
                )
            if secrets_equal(given, self.password or ""):
                return AuthOutcome(True, "password")
            return AuthOutcome(False, "password", "password-mismatch", "gateway password mismatch")

        given = presented.token if presented else None
        if not given:
            return AuthOutcome(False, "token", "token-missing", "gateway token missing")
        if secrets_equal(given, self.token or ""):
            return AuthOutcome(True, "token")
        return AuthOutcome(False, "token", "token-mismatch", "gateway token mismatch")

    def _check_proxy(self, client: ClientAddress, headers: dict[str, str]) -> AuthOutcome:
        """The user comes from the proxy's header, and only when the peer is that proxy.

        Failures are not counted by the rate limiter: behind one proxy every client shares
        an address pattern, and a missing header is a proxy misconfiguration, not a guess.
        """

        def refuse(reason: str, message: str) -> AuthOutcome:
            return AuthOutcome(False, "trusted-proxy", reason, message, counts_as_failure=False)

        if not client.via_trusted_proxy:
            return refuse(
                "trusted-proxy-untrusted-source",
                "connection is not from a trusted proxy (gateway.trustedProxies)",
            )
        for name in self._proxy.required_headers:
            if not headers.get(name.lower(), "").strip():
                return refuse("trusted-proxy-missing-header", f"proxy header {name} missing")
        user = headers.get(self._proxy.user_header.lower(), "").strip()
        if not user:
            return refuse(
                "trusted-proxy-user-missing",
                f"proxy did not name the user (header {self._proxy.user_header})",
            )
        if self._proxy.allow_users and user not in self._proxy.allow_users:
            return refuse("trusted-proxy-user-not-allowed", f"user {user} is not allowed")
        return AuthOutcome(True, "trusted-proxy", user=user)


def build_rate_limiter(config: RateLimitConfig) -> AuthRateLimiter | None:
    """The failed-authentication limiter ``[gateway.auth.rateLimit]`` asks for, or ``None``."""
    # TODO(live reconfig): built once at start-up, so a changed rateLimit section (like the
    # auth mode and trustedProxies) takes effect on the next start, not on config.set.
    if not config.enabled:
        return None
    return AuthRateLimiter(
        max_attempts=config.max_attempts,
        window_ms=config.window_ms,
        lockout_ms=config.lockout_ms,
        exempt_loopback=config.exempt_loopback,
    )


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
