"""The contract between the kernel and its plugins.

Every hook is named ``anima_*`` and is synchronous: a hook declares (methods, events, config,
tables) or reacts (start-up, connections, shutdown) and returns at once. Work that takes time
goes into the async handlers a hook returns, or into tasks started on the nursery handed to
``anima_startup``. pluggy never awaits, so an ``async def`` hook implementation would be a
bug; the kernel refuses such plugins at load time.

A plugin is any object (usually a module or a class instance) with methods marked
``@kernel.hookimpl``. It is found through the entry-point group ``anima.plugins`` or handed
to the kernel directly when embedding. Hook implementations may take any subset of a spec's
arguments, by name.

The plugin author guide, ``docs/plugins.md``, documents every hook below; a test fails when
one is missing there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import trio

    from .connection import ConnectionInfo
    from .providers import ModelProvider
    from .services import Services
    from .specs import ConfigSection, EventSpec, MethodSpec, StoreSchema

PROJECT = "anima"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------
# Declarations: called once, while the kernel builds its tables, before anything is served.
# ---------------------------------------------------------------------------------------------


@hookspec
def anima_methods() -> Sequence[MethodSpec]:
    """Declare the RPC methods this plugin serves.

    Called once at start-up. Two plugins declaring the same method name stop start-up with an
    error naming both plugins.

    :returns: the plugin's ``MethodSpec`` list (empty when it serves none).
    """


@hookspec
def anima_events() -> Sequence[EventSpec]:
    """Declare the event types this plugin emits, with the scope needed to receive each.

    Called once at start-up. Emitting an undeclared event is an error, so that what a client
    may see is always written down. ``hello-ok.features.events`` lists the declared events a
    connecting client may receive.

    :returns: the plugin's ``EventSpec`` list.
    """


@hookspec
def anima_config_section() -> ConfigSection | None:
    """Declare the msgspec Struct for this plugin's ``[plugins.NAME]`` config table.

    Called once at start-up, before the config file is validated, and the section is read
    back through ``services.config.section(NAME)``. A plugin without config returns ``None``
    (or does not implement the hook); then any key but ``enabled``/``required`` in its table
    is an error.

    :returns: a ``ConfigSection`` or ``None``.
    """


@hookspec
def anima_store_schema() -> StoreSchema | None:
    """Declare the SQLite tables this plugin owns, as a list of migrations.

    Called once at start-up; missing migrations are applied, each in its own transaction,
    before ``anima_startup``.

    :returns: a ``StoreSchema`` or ``None``.
    """


@hookspec
def anima_model_providers() -> Sequence[ModelProvider]:
    """Contribute model back ends (``kernel.providers.ModelProvider``).

    Called whenever a plugin that runs agent turns looks providers up (through
    ``services.hook.anima_model_providers()``), so an implementation should return objects it
    already holds rather than build new ones.

    :returns: the providers this plugin offers.
    """


@hookspec
def anima_providers(category: str) -> Sequence[Any]:
    """Contribute back ends for a category other than models (``"tts"``, ``"channel"``...).

    The plugin that owns ``category`` defines what the objects must look like and documents
    it; the kernel only carries the call.

    :param category: the kind of back end asked for.
    :returns: the back ends this plugin offers for ``category`` (empty for others).
    """


@hookspec
def anima_add_hookspecs(plugin_manager: pluggy.PluginManager) -> None:
    """Add hook specifications of the plugin's own, for other plugins to implement.

    Called right after the plugin is registered, like pytest's ``pytest_addhooks``: call
    ``plugin_manager.add_hookspecs(your_spec_module)``.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle: start-up, config changes, shutdown.
# ---------------------------------------------------------------------------------------------


@hookspec
def anima_startup(services: Services, nursery: trio.Nursery) -> None:
    """The gateway is about to accept connections.

    Start background work (schedulers, heartbeats, watchers) with ``nursery.start_soon``; the
    nursery lives until shutdown and is cancelled then. A plugin whose start-up raises is
    reported and left out, unless its config marks it ``required``, and the tasks it started
    are cancelled.

    :param services: the kernel's services (config, store, events, jobs, connections, clock).
    :param nursery: this plugin's own nursery for background tasks.
    """


@hookspec
def anima_config_changed(services: Services, changed: Sequence[str]) -> None:
    """The config was replaced by ``services.config.replace`` (``config.set`` and friends).

    The new config was validated and written before this is called.

    :param changed: the top-level keys that differ (``"gateway"``, ``"plugins.tts"``...).
    """


@hookspec
def anima_shutdown(services: Services) -> None:
    """The gateway is stopping: clients got ``shutdown``; in-flight requests had their grace.

    Release what the plugin holds (HTTP clients, files). Background tasks are cancelled
    after this returns.
    """


# ---------------------------------------------------------------------------------------------
# Connections.
# ---------------------------------------------------------------------------------------------


@hookspec
def anima_client_connected(services: Services, connection: ConnectionInfo) -> None:
    """A client finished the handshake; called before its ``hello-ok`` is sent."""


@hookspec
def anima_client_disconnected(services: Services, connection: ConnectionInfo) -> None:
    """A client's socket closed, for whatever reason."""


@hookspec
def anima_hello_snapshot(services: Services, connection: ConnectionInfo) -> dict[str, Any] | None:
    """Contribute keys to the ``hello-ok.snapshot`` of a connecting client.

    Called once per handshake, on the event loop: answer from memory. Keys from all plugins
    are merged; a key contributed twice is an error in the log and the first one wins.

    :returns: a dict of JSON-encodable values, or ``None``.
    """
