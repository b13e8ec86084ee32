"""The gateway: loads plugins and config, opens the store, serves WebSockets, shuts down.

``Gateway.serve`` is the one entry point; the CLI and embedding hosts both use it (through
``serve_gateway`` or ``open_gateway`` in ``kernel.embed``). It reports readiness through
``task_status`` once the listening port is known, so port 0 works.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import pluggy
import trio

from .auth import SharedSecretAuth, build_rate_limiter
from .config import (
    ConfigError,
    LoadedConfig,
    default_state_dir,
    plugin_flags,
    read_config_document,
    validate_config,
)
from .connection import CLOSE_RESTART, Connection
from .devices import DEVICES_SCHEMA, DeviceRegistry
from .events import EventBus
from .handshake import run_handshake
from .idempotency import IdempotencyCache
from .jobs import JobRegistry
from .locality import parse_trusted_proxies, resolve_client
from .plugins import (
    PluginInfo,
    PluginLoadError,
    PluginTables,
    build_tables,
    create_plugin_manager,
    load_plugins,
)
from .services import Clock, ConfigService, Connections, GatewayInfo, Services
from .specs import EventSpec, MethodSpec, event_allowed
from .store import Store
from .websocket import ServerWebSocket

__all__ = ["Gateway", "GatewayStartupError", "gateway_version"]

logger = logging.getLogger(__name__)

DATABASE_NAME = "gateway.sqlite3"
CONFIG_NAME = "config.toml"


class GatewayStartupError(Exception):
    """The gateway cannot start; the message says why and what to change."""


def gateway_version() -> str:
    if os.environ.get("ANIMA_VERSION"):
        return os.environ["ANIMA_VERSION"]
    try:
        return metadata.version("anima-gateway")
    except metadata.PackageNotFoundError:
        return "dev"


class Gateway:
    """One gateway instance.

    :param state_dir: where the config, token and database live (default ``$ANIMA_STATE_DIR``
        or ``~/.anima``).
    :param config_path: the config file (default ``<state_dir>/config.toml``).
    :param plugins: plugin objects by name, registered in addition to (or, with
        ``use_entry_points=False``, instead of) the installed ones.
    :param host: overrides ``gateway.host``.
    :param port: overrides ``gateway.port``; 0 picks a free port.
    """

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        config_path: Path | None = None,
        plugins: Mapping[str, object] | None = None,
        use_entry_points: bool = True,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.config_path = Path(config_path) if config_path else self.state_dir / CONFIG_NAME
        self._extra_plugins = dict(plugins or {})
        self._use_entry_points = use_entry_points
        self._host_override = host
        self._port_override = port

        self.hostname = socket.gethostname()
        self.port: int | None = None
        self.plugin_infos: list[PluginInfo] = []
        self.methods: dict[str, MethodSpec] = {}
        self.events: dict[str, EventSpec] = {}
        self.idempotency = IdempotencyCache()
        self.connections: dict[str, Connection] = {}
        self._allowed_events_cache: dict[tuple[str, frozenset[str]], frozenset[str]] = {}

        self._stop_requested = trio.Event()
        self._stop_reason = "gateway stopping"
        self._restart_expected_ms: int | None = None
        self._stopping = False
        self._manager: pluggy.PluginManager | None = None
        self._tick_rescheduled = trio.Event()

    # -- start-up --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Load plugins and validate the config; raise ``GatewayStartupError`` if unusable.

        Separate from ``serve`` so that ``anima-gateway plugins`` can inspect without serving.
        """
        try:
            raw = read_config_document(self.config_path)
            disabled, required = plugin_flags(raw)
            manager = create_plugin_manager()
            self.plugin_infos = load_plugins(
                manager,
                disabled=disabled,
                required=required,
                extra=self._extra_plugins,
                use_entry_points=self._use_entry_points,
            )
            tables = build_tables(manager, self.plugin_infos, required=required)
            tables.failed.update(i.name for i in self.plugin_infos if i.state == "failed")
            loaded = validate_config(raw, tables.schemas, ignored=tables.failed)
        except (ConfigError, PluginLoadError) as exc:
            raise GatewayStartupError(str(exc)) from exc

        loaded = self._apply_overrides(loaded)
        self._manager, self._tables, self._loaded = manager, tables, loaded
        self.methods, self.events = tables.methods, tables.events

    def _apply_overrides(self, loaded: LoadedConfig) -> LoadedConfig:
        changes: dict[str, Any] = {}
        if self._host_override is not None:
            changes["host"] = self._host_override
        if self._port_override is not None:
            changes["port"] = self._port_override
        if changes:
            loaded.gateway = msgspec.structs.replace(loaded.gateway, **changes)
        return loaded

    @property
    def config(self) -> LoadedConfig:
        """The config in force: once serving, the services' (it may be replaced); after
        ``prepare`` alone, the one validated at start-up with the overrides applied."""
        services = getattr(self, "services", None)
        if services is not None:
            return services.config.current
        assert self._manager is not None, "prepare() first"
        return self._loaded

    @property
    def manager(self) -> pluggy.PluginManager:
        assert self._manager is not None, "prepare() first"
        return self._manager

    async def _open_services(self) -> None:
        from .auth import StartupRefused

        gateway_config = self._loaded.gateway
        try:
            self.auth = SharedSecretAuth(gateway_config, self.state_dir)
            self.rate_limiter = build_rate_limiter(gateway_config.auth.rate_limit)
            self.trusted_proxies = parse_trusted_proxies(gateway_config.trusted_proxies)
        except (StartupRefused, ValueError) as exc:
            raise GatewayStartupError(str(exc)) from exc

        store = Store(self.state_dir / DATABASE_NAME)
        await store.open()
        try:
            # Pairing is the kernel's own: its tables are migrated like a plugin's, first.
            await store.migrate(DEVICES_SCHEMA.owner, DEVICES_SCHEMA.migrations)
        except Exception as exc:
            await store.aclose()
            raise GatewayStartupError(f"kernel device tables: {exc}") from exc
        tables: PluginTables = self._tables
        for owner, schema in list(tables.store_schemas.items()):
            try:
                await store.migrate(schema.owner or owner, schema.migrations)
            except Exception as exc:
                if owner in self._loaded.required:
                    await store.aclose()
                    raise GatewayStartupError(f"plugin {owner}: {exc}") from exc
                logger.error("plugin %s left out: its store migration failed: %s", owner, exc)
                self._leave_out(owner, f"store migration: {exc}")

        self.jobs = JobRegistry()
        self.services = Services(
            info=GatewayInfo(
                version=gateway_version(),
                state_dir=self.state_dir,
                config_path=self.config_path,
                started_at_ms=Clock().now_ms(),
                host=self.hostname,
            ),
            config=ConfigService(
                self.config_path,
                self._loaded,
                tables.schemas,
                self._config_changed,
                ignored=tables.failed,
            ),
            store=store,
            events=EventBus(tables.events, self.connections),
            jobs=self.jobs,
            connections=Connections(self.connections),
            clock=Clock(),
            hook=self.manager.hook,
            plugins=tuple(self.plugin_infos),
        )
        # The handshake pairs devices through this registry; plugins (the devices plugin,
        # a third party's replacement) reach it as the "devices" service. The clock is
        # looked up on each call, so a clock replaced on the services is followed.
        self.devices = DeviceRegistry(
            store, lambda: self.services.clock.now_ms(), self.services.events.emit
        )
        self.services.provide("devices", self.devices)

    async def _start_plugins(self, background: trio.Nursery) -> GatewayStartupError | None:
        """Run every ``anima_startup``; return the error when a required plugin fails.

        Each plugin gets a nursery of its own inside ``background``, so that the tasks a
        plugin started before its start-up raised end with it when it is left out.

        Returned rather than raised: raised inside the background nursery it would reach the
        caller wrapped in an exception group instead of as the ``GatewayStartupError`` it is.
        """
        required = self._loaded.required
        for impl in self.manager.hook.anima_startup.get_hookimpls():
            nursery: trio.Nursery = await background.start(_nursery_until_cancelled)
            try:
                impl.function(**_subset(impl, services=self.services, nursery=nursery))
            except Exception as exc:
                nursery.cancel_scope.cancel()
                if impl.plugin_name in required:
                    error = GatewayStartupError(
                        f"required plugin {impl.plugin_name} failed to start: {exc}"
                    )
                    error.__cause__ = exc
                    return error
                logger.exception("plugin %s failed to start and is left out", impl.plugin_name)
                self._leave_out(impl.plugin_name, f"anima_startup: {exc}")
        return None

    def _leave_out(self, plugin: str, error: str) -> None:
        for info in self.plugin_infos:
            if info.name == plugin:
                info.state, info.error = "failed", error
        self._tables.drop_plugin(plugin)
        if self.manager.get_plugin(plugin) is not None:
            self.manager.unregister(name=plugin)

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED):
        """Run until ``request_shutdown`` is called or the surrounding scope is cancelled.

        :raises GatewayStartupError: before ``task_status.started``, when the config, a
            plugin, the store or the listening address is unusable.
        """
        if self._manager is None:
            self.prepare()
        await self._open_services()
        host, port = self._loaded.gateway.host, self._loaded.gateway.port
        failure: GatewayStartupError | None = None
        try:
            # Start-up errors are raised outside every nursery, so that callers get the
            # GatewayStartupError itself rather than one buried in nested exception groups.
            try:
                listeners = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise GatewayStartupError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from exc
            async with trio.open_nursery() as background:
                self.services.nursery = background
                self.jobs.attach(background)
                failure = await self._start_plugins(background)
                if failure is None:
                    background.start_soon(self._tick_loop)
                    await self._serve_clients(listeners, task_status)
                    self.call_each("anima_shutdown", services=self.services)
                else:
                    for listener in listeners:
                        await listener.aclose()
                background.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.services.store.aclose()
        if failure is not None:
            raise failure

    async def _serve_clients(
        self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[Gateway]
    ) -> None:
        async with trio.open_nursery() as handlers:
            await handlers.start(
                partial(trio.serve_listeners, self._handle, listeners, handler_nursery=handlers)
            )
            self.port = listeners[0].socket.getsockname()[1]
            logger.info(
                "gateway listening",
                extra={"host": self._loaded.gateway.host, "port": self.port},
            )
            task_status.started(self)
            await self._stop_requested.wait()
            await self._drain()
            handlers.cancel_scope.cancel()

    def request_shutdown(
        self, reason: str = "gateway stopping", restart_expected_ms: int | None = None
    ) -> None:
        """Ask for a graceful stop: ``shutdown`` event, grace period, close 1012."""
        self._stop_reason = reason
        self._restart_expected_ms = restart_expected_ms
        self._stop_requested.set()

    async def _drain(self) -> None:
        self._stopping = True
        payload: dict[str, Any] = {"reason": self._stop_reason}
        if self._restart_expected_ms is not None:
            payload["restartExpectedMs"] = self._restart_expected_ms
        self.services.events.emit("shutdown", payload)

        grace_s = self.config.gateway.limits.shutdown_grace_ms / 1000
        with trio.move_on_after(grace_s):
            for connection in list(self.connections.values()):
                await connection.idle.wait()
        for connection in list(self.connections.values()):
            connection.close_soon(CLOSE_RESTART, "service restart", flush=True)
        with trio.move_on_after(2):
            while self.connections:
                await trio.sleep(0.01)

    async def _tick_loop(self) -> None:
        """A tick every ``tickIntervalMs``; a changed interval starts a new period at once,
        so that what new clients read in ``hello-ok.policy`` is what they get."""
        while True:
            interval_s = self.config.gateway.limits.tick_interval_ms / 1000
            self._tick_rescheduled = trio.Event()
            with trio.move_on_after(interval_s):
                await self._tick_rescheduled.wait()
                continue
            self.services.events.emit("tick", {"ts": self.services.clock.now_ms()})

    async def _handle(self, stream: trio.SocketStream) -> None:
        # An exception escaping here would cancel the server's handler nursery and with it
        # every other client; one broken connection must stay one broken connection.
        try:
            await self._serve_stream(stream)
        except Exception:
            logger.exception("connection handler failed")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        # The limits in force now (config may have been replaced since start-up): the same
        # ones this client's hello-ok will report.
        limits = self.config.gateway.limits
        ws = ServerWebSocket(stream, max_message_size=limits.max_payload)
        with trio.move_on_after(limits.handshake_timeout_ms / 1000):
            upgrade = await ws.read_upgrade()
        if upgrade is None:
            return
        if self._stopping or len(self.connections) >= limits.max_connections:
            await ws.reject(503, b"gateway unavailable")
            return
        client = resolve_client(upgrade.peer_ip, upgrade.headers, self.trusted_proxies)
        await ws.accept()
        connection = await run_handshake(self, ws, client, upgrade.headers)
        if connection is None:
            return
        try:
            await connection.run()
        finally:
            self.forget(connection)

    # -- connections -----------------------------------------------------------------------

    def register(self, connection: Connection) -> None:
        self.connections[connection.info.conn_id] = connection
        self.call_each("anima_client_connected", services=self.services, connection=connection.info)

    def forget(self, connection: Connection) -> None:
        if self.connections.pop(connection.info.conn_id, None) is None:
            return
        self.jobs.cancel_owned_by(connection.info.conn_id)
        self.call_each(
            "anima_client_disconnected", services=self.services, connection=connection.info
        )

    def events_allowed(self, role: str, scopes: frozenset[str]) -> frozenset[str]:
        """The events a client of this role and scopes may receive, one shared set per kind.

        Thousands of connections hold only a handful of distinct sets, so they share them.
        """
        key = (role, scopes)
        allowed = self._allowed_events_cache.get(key)
        if allowed is None:
            allowed = frozenset(
                name
                for name, spec in self.events.items()
                if event_allowed(role, scopes, spec.scope)
            )
            if len(self._allowed_events_cache) < 1024:
                self._allowed_events_cache[key] = allowed
        return allowed

    def snapshot_for(self, info: Any) -> dict[str, Any]:
        snapshot: dict[str, Any] = {}
        for plugin, contribution in self.call_each(
            "anima_hello_snapshot", services=self.services, connection=info
        ):
            for key, value in (contribution or {}).items():
                if key in snapshot:
                    logger.error("plugin %s: snapshot key %r is taken", plugin, key)
                    continue
                snapshot[key] = value
        snapshot["uptimeMs"] = self.services.clock.now_ms() - self.services.info.started_at_ms
        snapshot["authMode"] = self.auth.mode
        return snapshot

    def _config_changed(self, changed: list[str]) -> None:
        if "gateway" in changed:
            self._tick_rescheduled.set()
        self.call_each("anima_config_changed", services=self.services, changed=changed)

    def call_each(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call a hook plugin by plugin, so one plugin's exception spares the others."""
        results = []
        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            try:
                results.append((impl.plugin_name, impl.function(**_subset(impl, **kwargs))))
            except Exception:
                logger.exception("plugin %s: %s raised", impl.plugin_name, hook)
        return results


async def _nursery_until_cancelled(
    *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
) -> None:
    """Hand out a nursery that stays open, with or without tasks, until it is cancelled."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


def _subset(impl: Any, **kwargs: Any) -> dict[str, Any]:
    return {name: kwargs[name] for name in impl.argnames if name in kwargs}
