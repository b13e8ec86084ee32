"""Finding plugins, loading them, and building the kernel's tables from their declarations.

Plugins come from the entry-point group ``anima.plugins`` (built-in and third-party alike)
and from objects an embedding host hands over. A plugin disabled in config is blocked by
name before it is imported. A plugin that fails to import or to declare is reported and
left out, unless config marks it required; two plugins claiming one method or event name
stop start-up with an error naming both.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import msgspec
import pluggy

from . import hookspecs
from .specs import PAIRING, ConfigSection, EventSpec, MethodSpec, StoreSchema

__all__ = [
    "ENTRY_POINT_GROUP",
    "KERNEL_EVENTS",
    "PluginInfo",
    "PluginLoadError",
    "PluginTables",
    "build_tables",
    "create_plugin_manager",
    "load_plugins",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "anima.plugins"

#: Events the kernel itself emits. ``connect.challenge`` precedes the handshake and carries
#: no seq; it is listed so that clients see it in ``features.events``. Pairing happens in the
#: handshake, so its two events are the kernel's too (``kernel.devices``), whichever plugin
#: serves the ``device.pair.*`` methods.
KERNEL_EVENTS = (
    EventSpec("connect.challenge", scope=None, description="nonce to sign, before connect"),
    EventSpec("tick", scope=None, droppable=True, description="keepalive"),
    EventSpec("shutdown", scope=None, description="the gateway is stopping"),
    EventSpec(
        "device.pair.requested",
        scope=PAIRING,
        droppable=True,
        description="a remote device asks to be paired",
    ),
    EventSpec(
        "device.pair.resolved",
        scope=PAIRING,
        droppable=True,
        description="a pairing request was approved or rejected",
    ),
)
RESERVED_METHODS = frozenset({"connect"})


class PluginLoadError(Exception):
    """Start-up cannot go on: a required plugin failed, or two plugins clash."""


@dataclass
class PluginInfo:
    """What ``anima-gateway plugins`` and ``status`` report about one plugin."""

    name: str
    version: str
    enabled: bool
    state: str = "loaded"  # loaded | disabled | failed
    error: str | None = None
    methods: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    source: str = "entry point"


def create_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager with the kernel's hook specifications and nothing registered."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def _async_hookimpls(plugin: object) -> list[str]:
    return [
        name
        for name, value in inspect.getmembers(plugin)
        if name.startswith("anima_") and inspect.iscoroutinefunction(value)
    ]


def _register(manager: pluggy.PluginManager, plugin: object, name: str) -> None:
    bad = _async_hookimpls(plugin)
    if bad:
        raise PluginLoadError(
            f"plugin {name}: hook {bad[0]} is async; hooks must be plain functions that"
            " return declarations (put async work in handlers or startup tasks)"
        )
    manager.register(plugin, name=name)
    add_hookspecs = getattr(plugin, "anima_add_hookspecs", None)
    if add_hookspecs is not None:
        add_hookspecs(plugin_manager=manager)


def load_plugins(
    manager: pluggy.PluginManager,
    *,
    disabled: Iterable[str] = (),
    required: Iterable[str] = (),
    extra: Mapping[str, object] | None = None,
    use_entry_points: bool = True,
) -> list[PluginInfo]:
    """Register plugins from entry points and ``extra``; return what happened to each.

    :param disabled: names blocked before anything is imported.
    :param required: names whose failure stops start-up.
    :param extra: plugin objects by name, as an embedding host hands them over.
    """
    disabled, required = set(disabled), set(required)
    infos: list[PluginInfo] = []

    candidates: list[tuple[str, str, Any]] = []
    if use_entry_points:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            version = entry.dist.version if entry.dist else "unknown"
            candidates.append((entry.name, version, entry))
    for name, plugin in (extra or {}).items():
        candidates.append((name, getattr(plugin, "__version__", "embedded"), plugin))

    seen: set[str] = set()
    for name, version, source in candidates:
        is_entry = isinstance(source, metadata.EntryPoint)
        info = PluginInfo(name, version, enabled=name not in disabled)
        info.source = f"entry point {source.value}" if is_entry else "embedded"
        infos.append(info)
        if name in seen:
            raise PluginLoadError(f"two plugins are named {name!r}; rename one of them")
        seen.add(name)
        if name in disabled:
            manager.set_blocked(name)
            info.state = "disabled"
            continue
        try:
            plugin = source.load() if is_entry else source
            if isinstance(plugin, type):
                # A class is a plugin factory: each gateway gets its own instance, so two
                # gateways in one process (tests, embedding hosts) never share state.
                plugin = plugin()
            _register(manager, plugin, name)
        except Exception as exc:
            info.state, info.error = "failed", f"{type(exc).__name__}: {exc}"
            if name in required:
                raise PluginLoadError(f"required plugin {name} failed to load: {exc}") from exc
            logger.error("plugin %s failed to load and is left out: %s", name, exc)

    missing = sorted(required - seen)
    if missing:
        raise PluginLoadError(f"required plugin {missing[0]} is not installed")
    return infos


@dataclass
class PluginTables:
    """The kernel's dispatch tables, built once from the plugins' declarations."""

    methods: dict[str, MethodSpec] = field(default_factory=dict)
    method_owner: dict[str, str] = field(default_factory=dict)
    events: dict[str, EventSpec] = field(default_factory=dict)
    event_owner: dict[str, str] = field(default_factory=dict)
    schemas: dict[str, type[msgspec.Struct] | None] = field(default_factory=dict)
    store_schemas: dict[str, StoreSchema] = field(default_factory=dict)
    #: Plugins left out after they failed; their config tables are not checked.
    failed: set[str] = field(default_factory=set)

    def drop_plugin(self, name: str) -> None:
        """Forget everything a plugin declared (it failed to declare, migrate or start)."""
        self.failed.add(name)
        self.schemas.pop(name, None)
        for table, owners in ((self.methods, self.method_owner), (self.events, self.event_owner)):
            for key in [k for k, owner in owners.items() if owner == name]:
                del table[key], owners[key]
        self.store_schemas.pop(name, None)


def build_tables(
    manager: pluggy.PluginManager,
    infos: Sequence[PluginInfo],
    *,
    required: Iterable[str] = (),
) -> PluginTables:
    """Collect every loaded plugin's declarations; refuse clashes, name both sides."""
    required = set(required)
    by_name = {info.name: info for info in infos}
    tables = PluginTables()
    for spec in KERNEL_EVENTS:
        tables.events[spec.name] = spec
        tables.event_owner[spec.name] = "kernel"

    def fail(plugin: str, hook: str, exc: Exception) -> None:
        if plugin in required:
            raise PluginLoadError(f"required plugin {plugin}: {hook} failed: {exc}") from exc
        logger.error("plugin %s left out: %s failed: %s", plugin, hook, exc)
        info = by_name.get(plugin)
        if info:
            info.state, info.error = "failed", f"{hook}: {exc}"
        manager.unregister(name=plugin)
        tables.drop_plugin(plugin)

    for plugin_name in [name for name, _ in manager.list_name_plugin()]:
        tables.schemas.setdefault(plugin_name, None)

    for hook, kind in (("anima_methods", MethodSpec), ("anima_events", EventSpec)):
        for plugin, declared in _safe_declarations(manager, hook, fail):
            for spec in declared or ():
                if not isinstance(spec, kind):
                    fail(plugin, hook, TypeError(f"expected {kind.__name__}, got {spec!r}"))
                    break
                _claim(tables, plugin, spec)

    for plugin, section in _safe_declarations(manager, "anima_config_section", fail):
        if section is not None:
            if not isinstance(section, ConfigSection):
                fail(plugin, "anima_config_section", TypeError("expected a ConfigSection"))
                continue
            tables.schemas[plugin] = section.schema

    for plugin, schema in _safe_declarations(manager, "anima_store_schema", fail):
        if schema is not None:
            tables.store_schemas[plugin] = schema

    for plugin in tables.schemas:
        info = by_name.get(plugin)
        if info:
            info.methods = sorted(m for m, o in tables.method_owner.items() if o == plugin)
            info.events = sorted(e for e, o in tables.event_owner.items() if o == plugin)
    return tables


def _safe_declarations(manager: pluggy.PluginManager, hook: str, fail: Any) -> list[Any]:
    results = []
    for impl in getattr(manager.hook, hook).get_hookimpls():
        try:
            results.append((impl.plugin_name, impl.function()))
        except Exception as exc:
            fail(impl.plugin_name, hook, exc)
    return results


def _claim(tables: PluginTables, plugin: str, spec: MethodSpec | EventSpec) -> None:
    if isinstance(spec, MethodSpec):
        table, owners, what = tables.methods, tables.method_owner, "method"
        if spec.name in RESERVED_METHODS:
            raise PluginLoadError(f"plugin {plugin}: method {spec.name!r} is the kernel's")
    else:
        table, owners, what = tables.events, tables.event_owner, "event"
    other = owners.get(spec.name)
    if other is not None:
        raise PluginLoadError(
            f"{what} {spec.name!r} is registered by both plugin {other} and plugin {plugin}"
        )
    table[spec.name] = spec  # type: ignore[index]
    owners[spec.name] = plugin
