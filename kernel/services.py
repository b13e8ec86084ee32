"""The services the kernel hands every plugin: config, store, events, jobs, connections.

Plugins reach each other's capabilities only through these and through hooks, never by
importing one another, so either side can be disabled or replaced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from .config import LoadedConfig, validate_config, write_config_atomically
from .errors import GatewayError

if TYPE_CHECKING:
    import pluggy

    from .connection import Connection, ConnectionInfo
    from .events import EventBus
    from .jobs import JobRegistry
    from .store import Store

__all__ = ["Clock", "ConfigService", "Connections", "GatewayInfo", "Services"]

logger = logging.getLogger(__name__)


class Clock:
    """Wall-clock milliseconds for timestamps on the wire; trio's clock for durations."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return trio.current_time()


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    version: str
    state_dir: Path
    config_path: Path
    started_at_ms: int
    host: str


class ConfigService:
    """The current config, and the one way to replace it.

    :ivar current: the validated config in force.
    """

    def __init__(
        self,
        path: Path,
        loaded: LoadedConfig,
        schemas: Mapping[str, type[msgspec.Struct] | None],
        on_change: Any,
        *,
        ignored: Collection[str] = (),
    ) -> None:
        self.path = path
        self.current = loaded
        self._schemas = schemas
        self._ignored = ignored
        self._on_change = on_change
        self._write_lock = trio.Lock()

    @property
    def gateway(self) -> Any:
        return self.current.gateway

    def section(self, plugin: str) -> Any:
        """A plugin's decoded ``[plugins.NAME]`` section (``None`` if it declares none)."""
        return self.current.sections.get(plugin)

    def raw(self) -> dict[str, Any]:
        """A deep copy of the config document, safe to modify."""
        return msgspec.json.decode(msgspec.json.encode(self.current.raw))

    def validate(self, raw: Mapping[str, Any]) -> LoadedConfig:
        """Validate a whole document without applying it; raises ``ConfigError``."""
        return validate_config(raw, self._schemas, ignored=self._ignored)

    async def replace(self, raw: Mapping[str, Any]) -> list[str]:
        """Validate ``raw``, write it atomically, make it current and tell the plugins.

        :returns: the top-level keys that changed (``gateway``, ``plugins.NAME``).
        :raises ConfigError: naming the key at fault; nothing is written then.
        """
        async with self._write_lock:
            loaded = self.validate(raw)
            await trio.to_thread.run_sync(write_config_atomically, self.path, loaded.raw)
            old, self.current = self.current, loaded
        changed = _changed_keys(old.raw, loaded.raw)
        if changed:
            self._on_change(changed)
        return changed


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    changed = []
    if old.get("gateway", {}) != new.get("gateway", {}):
        changed.append("gateway")
    old_plugins, new_plugins = old.get("plugins", {}), new.get("plugins", {})
    for name in sorted(set(old_plugins) | set(new_plugins)):
        if old_plugins.get(name) != new_plugins.get(name):
            changed.append(f"plugins.{name}")
    return changed


class Connections:
    """A read-only view of the handshaken connections."""

    def __init__(self, live: Mapping[str, Connection]) -> None:
        self._live = live

    def __len__(self) -> int:
        return len(self._live)

    def all(self) -> list[ConnectionInfo]:
        return [c.info for c in self._live.values()]

    def get(self, conn_id: str) -> ConnectionInfo | None:
        connection = self._live.get(conn_id)
        return connection.info if connection else None

    def close(self, conn_id: str, reason: str) -> bool:
        """Close a client's connection (1008 with ``reason``); used to revoke access."""
        connection = self._live.get(conn_id)
        if connection is None:
            return False
        connection.close_soon(1008, reason)
        return True


@dataclass(slots=True)
class Services:
    """Everything a handler or a background task may use.

    :ivar hook: the plugin manager's hook relay, to call hooks such as
        ``anima_model_providers`` or a plugin's own.
    :ivar nursery: the background nursery; tasks started here are cancelled at shutdown.
    """

    info: GatewayInfo
    config: ConfigService
    store: Store
    events: EventBus
    jobs: JobRegistry
    connections: Connections
    clock: Clock
    hook: pluggy.HookRelay
    nursery: trio.Nursery | None = None
    #: Each plugin's name and state, for status reporting.
    plugins: tuple[Any, ...] = ()
    _provided: dict[str, Any] = field(default_factory=dict)

    def provide(self, name: str, service: Any) -> None:
        """Offer an object to other plugins under ``name`` (call it from ``anima_startup``).

        This is how one plugin uses another's capability without importing it: the consumer
        looks the name up when it needs it, so either side can be disabled or replaced.
        """
        if name in self._provided:
            raise ValueError(f"service {name!r} is already provided")
        self._provided[name] = service

    def lookup(self, name: str) -> Any:
        """The object provided under ``name``; 503 when no enabled plugin provides it."""
        try:
            return self._provided[name]
        except KeyError:
            raise GatewayError(
                503, f"{name} is not available (the plugin providing it is not enabled)"
            ) from None

    def lookup_optional(self, name: str) -> Any | None:
        return self._provided.get(name)
