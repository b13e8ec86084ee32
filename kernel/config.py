"""The gateway's TOML config: the kernel's own ``[gateway]`` section and each plugin's table.

A config file is validated whole, before anything starts and before anything is written, so
a bad file is refused with the key path at fault and a good one is never half-applied.
Writes go to a temporary file that is renamed over the old one.
"""

from __future__ import annotations

import copy
import logging
import os
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import tomli_w

from .frames import validation_message

__all__ = [
    "AuthConfig",
    "ConfigError",
    "GatewayConfig",
    "LimitsConfig",
    "LoadedConfig",
    "RateLimitConfig",
    "TrustedProxyConfig",
    "default_state_dir",
    "load_config",
    "validate_config",
    "write_config_atomically",
]

logger = logging.getLogger(__name__)

KERNEL_PLUGIN_KEYS = frozenset({"enabled", "required"})

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


class RateLimitConfig(_Section):
    """Failed-authentication lockout per client address."""

    enabled: bool = True
    max_attempts: Positive = 10
    window_ms: Positive = 60_000
    lockout_ms: Positive = 300_000
    exempt_loopback: bool = True


class TrustedProxyConfig(_Section):
    """Where the ``trusted-proxy`` auth mode reads the user from."""

    user_header: str = "x-forwarded-user"
    required_headers: list[str] = msgspec.field(default_factory=list)
    allow_users: list[str] = msgspec.field(default_factory=list)


AuthMode = Literal["token", "password", "none", "trusted-proxy"]


class AuthConfig(_Section):
    #: Unset means ``password`` when a password is configured, else ``token`` (PROTOCOL.md A8).
    mode: AuthMode | None = None
    token: str | None = None
    password: str | None = None
    rate_limit: RateLimitConfig = msgspec.field(default_factory=RateLimitConfig)
    trusted_proxy: TrustedProxyConfig = msgspec.field(default_factory=TrustedProxyConfig)


class LimitsConfig(_Section):
    max_payload: Positive = 8 * 1024 * 1024
    max_buffered_bytes: Positive = 16 * 1024 * 1024
    tick_interval_ms: Positive = 30_000
    handshake_timeout_ms: Positive = 10_000
    max_in_flight: Positive = 32
    max_connections: Positive = 10_000
    shutdown_grace_ms: Annotated[int, msgspec.Meta(ge=0)] = 5_000


class GatewayConfig(_Section):
    """The kernel's own ``[gateway]`` section."""

    host: str = "127.0.0.1"
    port: Port = 18789
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)


class ConfigError(Exception):
    """A config that cannot be used; the message starts with the key path at fault."""


class LoadedConfig(msgspec.Struct, kw_only=True):
    """A validated config: the raw document plus its decoded sections."""

    raw: dict[str, Any]
    gateway: GatewayConfig
    sections: dict[str, msgspec.Struct | None]
    disabled: frozenset[str]
    required: frozenset[str]


def default_state_dir() -> Path:
    return Path(os.environ.get("ANIMA_STATE_DIR") or Path.home() / ".anima")


def _convert(value: Any, schema: type[msgspec.Struct], path: str) -> Any:
    try:
        return msgspec.convert(value, schema, str_keys=True)
    except msgspec.ValidationError as exc:
        message, field = validation_message(exc)
        where = f"{path}.{field}" if field else path
        message = message.removesuffix(f" (at {field})")
        raise ConfigError(f"{where}: {message}") from None


def plugin_flags(raw: Mapping[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    """The names of plugins the document disables and those it marks required."""
    plugins = raw.get("plugins", {})
    if not isinstance(plugins, Mapping):
        raise ConfigError("plugins: expected a table of plugin sections")
    disabled, required = set(), set()
    for name, table in plugins.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"plugins.{name}: expected a table")
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"plugins.{name}.enabled: expected true or false")
        is_required = table.get("required", False)
        if not isinstance(is_required, bool):
            raise ConfigError(f"plugins.{name}.required: expected true or false")
        if not enabled:
            disabled.add(name)
        if is_required:
            required.add(name)
    return frozenset(disabled), frozenset(required)


def validate_config(
    raw: Mapping[str, Any],
    schemas: Mapping[str, type[msgspec.Struct] | None],
    *,
    ignored: Collection[str] = (),
) -> LoadedConfig:
    """Validate a whole config document against the kernel's and the loaded plugins' schemas.

    :param raw: the parsed TOML document.
    :param schemas: each loaded plugin's section schema (``None`` for a plugin without one).
    :param ignored: plugins that are installed but were left out (they failed to load); their
        tables are kept as written, unchecked, so that a broken plugin does not also make
        the config look wrong.
    :raises ConfigError: naming the first key at fault.
    """
    unknown = sorted(set(raw) - {"gateway", "plugins"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (expected gateway or plugins)")

    gateway = _convert(raw.get("gateway", {}), GatewayConfig, "gateway")
    disabled, required = plugin_flags(raw)

    sections: dict[str, msgspec.Struct | None] = {}
    tables = raw.get("plugins", {})
    for name in tables:
        if name not in schemas and name not in disabled and name not in ignored:
            raise ConfigError(f"plugins.{name}: no plugin of that name is installed")
    for name, schema in schemas.items():
        table = {k: v for k, v in tables.get(name, {}).items() if k not in KERNEL_PLUGIN_KEYS}
        if schema is None:
            if table:
                raise ConfigError(f"plugins.{name}.{next(iter(table))}: unknown key")
            sections[name] = None
        else:
            sections[name] = _convert(table, schema, f"plugins.{name}")

    return LoadedConfig(
        raw=copy.deepcopy(dict(raw)),
        gateway=gateway,
        sections=sections,
        disabled=disabled,
        required=required,
    )


def read_config_document(path: Path) -> dict[str, Any]:
    """The parsed TOML at ``path``; an absent file is an empty config."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def load_config(path: Path, schemas: Mapping[str, type[msgspec.Struct] | None]) -> LoadedConfig:
    return validate_config(read_config_document(path), schemas)


def write_config_atomically(path: Path, raw: Mapping[str, Any]) -> None:
    """Write ``raw`` as TOML so that a crash leaves either the old or the new file whole."""
    text = tomli_w.dumps(_drop_none(raw))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    logger.info("config written", extra={"path": str(path)})


def _drop_none(value: Any) -> Any:
    # TOML has no null; a key set to None means "unset" and is left out.
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value
