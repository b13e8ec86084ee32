"""Finding and loading plugins: entry points, ``enabled = false``, clashes, failures, config.

A fresh plugin manager per gateway; plugin objects handed over directly where the test needs
its own, and the built-in health plugin through the ``anima.plugins`` entry-point group.
"""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

import msgspec
import pytest
import trio

from kernel import (
    READ,
    ConfigSection,
    EventSpec,
    Gateway,
    GatewayError,
    GatewayStartupError,
    MethodSpec,
    hookimpl,
)
from kernel.plugins import ENTRY_POINT_GROUP

pytestmark = pytest.mark.usefixtures("gateway_token")

HEALTH_METHODS = {
    "health",
    "status",
    "last-heartbeat",
    "system-presence",
    "set-heartbeats",
    "system-event",
}


async def _answer(call, params):
    return {"from": call.method}


class MethodPlugin:
    """Serves the method names it is given."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.started = False

    @hookimpl
    def anima_methods(self):
        return [MethodSpec(name, _answer, READ) for name in self.names]

    @hookimpl
    def anima_startup(self):
        self.started = True


class EventPlugin:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def anima_events(self):
        return [EventSpec(self.name, READ)]


class FailingStartup(MethodPlugin):
    @hookimpl
    def anima_startup(self):
        raise RuntimeError("cannot reach its back end")


class BackgroundWork(MethodPlugin):
    """Starts a task that runs until it is cancelled; ``fail`` then makes start-up raise."""

    def __init__(self, name: str, *, fail: bool) -> None:
        super().__init__(name)
        self.fail = fail
        self.task_running = False
        self.task_ended = False

    @hookimpl
    def anima_startup(self, nursery):
        nursery.start_soon(self._work)
        if self.fail:
            raise RuntimeError("gave up half-way")

    async def _work(self) -> None:
        self.task_running = True
        try:
            await trio.sleep_forever()
        finally:
            self.task_running, self.task_ended = False, True


class FailingDeclaration:
    @hookimpl
    def anima_methods(self):
        raise ValueError("declaration bug")


class AsyncHook:
    @hookimpl
    async def anima_methods(self):
        return [MethodSpec("async.method", _answer, READ)]


class ProbeConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    greeting: str = "hello"
    retries: Annotated[int, msgspec.Meta(ge=0)] = 3


class ConfiguredPlugin(MethodPlugin):
    def __init__(self) -> None:
        super().__init__("probe.ping")
        self.section = None

    @hookimpl
    def anima_config_section(self):
        return ConfigSection(ProbeConfig)

    @hookimpl
    def anima_startup(self, services):
        self.section = services.config.section("probe")


def _prepared(state_dir, **kwargs) -> Gateway:
    gateway = Gateway(state_dir=state_dir, port=0, **kwargs)
    gateway.prepare()
    return gateway


def _info(gateway: Gateway, name: str):
    (info,) = [info for info in gateway.plugin_infos if info.name == name]
    return info


# -- entry points -------------------------------------------------------------------------------


def test_entry_points_find_the_built_in_health_plugin(state_dir):
    gateway = _prepared(state_dir)
    info = _info(gateway, "health")
    assert info.state == "loaded" and info.enabled
    assert info.source == "entry point plugins.health:HealthPlugin"
    assert set(info.methods) >= HEALTH_METHODS
    assert {"health.changed", "presence.changed"} <= set(info.events)
    assert set(gateway.methods) >= HEALTH_METHODS


def test_without_entry_points_only_the_plugins_handed_over_load(state_dir):
    gateway = _prepared(state_dir, use_entry_points=False, plugins={"mine": MethodPlugin("a.b")})
    assert [info.name for info in gateway.plugin_infos] == ["mine"]
    assert _info(gateway, "mine").source == "embedded"
    assert set(gateway.methods) == {"a.b"}


async def test_entry_point_plugin_serves_over_a_socket(gateway, connect):
    async with connect(gateway) as client:
        assert (await client.call("health"))["ok"] is True


async def test_disabled_plugin_is_not_loaded_and_its_methods_are_404(start_gateway, raw_connect):
    async with start_gateway(config="[plugins.health]\nenabled = false\n") as gateway:
        info = _info(gateway, "health")
        assert info.state == "disabled" and not info.enabled
        assert "health" not in gateway.methods
        async with raw_connect(gateway) as raw:
            response = await raw.call("h", "health")
            assert "health" not in raw.hello["features"]["methods"]
    assert response["error"]["code"] == 404


def _with_entry_point(monkeypatch, name: str, value: str) -> None:
    """Add an entry point to the ``anima.plugins`` group, as an installed distribution would."""
    installed = metadata.entry_points
    extra = metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)

    def entry_points(**selection):
        found = list(installed(**selection))
        return [*found, extra] if selection.get("group") == ENTRY_POINT_GROUP else found

    monkeypatch.setattr(metadata, "entry_points", entry_points)


def test_enabled_false_blocks_a_plugin_before_it_is_imported(state_dir, monkeypatch):
    # Importing this entry point fails, so it can only be "disabled" if never imported.
    _with_entry_point(monkeypatch, "ghost", "no_such_module_for_anima_tests:Plugin")
    loaded = _prepared(state_dir)
    assert _info(loaded, "ghost").state == "failed"
    assert "no_such_module_for_anima_tests" in _info(loaded, "ghost").error

    (state_dir / "config.toml").write_text("[plugins.ghost]\nenabled = false\n")
    blocked = _prepared(state_dir)
    info = _info(blocked, "ghost")
    assert (info.state, info.enabled, info.error) == ("disabled", False, None)
    assert blocked.manager.is_blocked("ghost")
    assert _info(blocked, "health").state == "loaded"


def test_a_plugin_named_like_an_installed_one_is_refused(state_dir):
    with pytest.raises(GatewayStartupError, match="two plugins are named 'health'"):
        _prepared(state_dir, plugins={"health": MethodPlugin("x.y")})


# -- clashes ------------------------------------------------------------------------------------


def test_two_plugins_registering_one_method_stop_start_up_naming_both(state_dir):
    plugins = {"first": MethodPlugin("same.name"), "second": MethodPlugin("same.name")}
    with pytest.raises(GatewayStartupError) as failed:
        _prepared(state_dir, use_entry_points=False, plugins=plugins)
    message = str(failed.value)
    assert "same.name" in message
    assert "first" in message and "second" in message


async def test_method_clash_stops_open_gateway_too(start_gateway):
    plugins = {"mine": MethodPlugin("health")}
    with pytest.raises(GatewayStartupError, match=r"health.*mine|mine.*health"):
        async with start_gateway(plugins=plugins):
            pytest.fail("the gateway must not start")


def test_two_plugins_declaring_one_event_stop_start_up(state_dir):
    plugins = {"one": EventPlugin("same.event"), "two": EventPlugin("same.event")}
    with pytest.raises(GatewayStartupError, match=r"same\.event") as failed:
        _prepared(state_dir, use_entry_points=False, plugins=plugins)
    assert "one" in str(failed.value) and "two" in str(failed.value)


def test_a_plugin_may_not_claim_a_kernel_event_or_connect(state_dir):
    with pytest.raises(GatewayStartupError, match="tick"):
        _prepared(state_dir, use_entry_points=False, plugins={"x": EventPlugin("tick")})
    with pytest.raises(GatewayStartupError, match="connect"):
        _prepared(state_dir, use_entry_points=False, plugins={"x": MethodPlugin("connect")})


# -- failures -----------------------------------------------------------------------------------


async def test_plugin_whose_startup_raises_is_left_out_and_the_rest_starts(start_gateway, connect):
    fine = MethodPlugin("fine.ping")
    plugins = {"flaky": FailingStartup("flaky.ping"), "fine": fine}
    async with start_gateway(plugins=plugins) as gateway:
        info = _info(gateway, "flaky")
        assert info.state == "failed"
        assert "cannot reach its back end" in info.error
        assert fine.started
        async with connect(gateway) as client:
            assert await client.call("fine.ping") == {"from": "fine.ping"}
            assert (await client.call("health"))["plugins"]["failed"] == ["flaky"]
            with pytest.raises(GatewayError) as missing:
                await client.call("flaky.ping")
    assert missing.value.code == 404


async def test_tasks_of_a_plugin_left_out_end_and_the_others_run_on(start_gateway, connect):
    flaky = BackgroundWork("flaky.ping", fail=True)
    steady = BackgroundWork("steady.ping", fail=False)
    async with start_gateway(plugins={"flaky": flaky, "steady": steady}) as gateway:
        async with connect(gateway) as client:
            # One round trip: every task started at start-up has had its turn by now.
            assert await client.call("steady.ping") == {"from": "steady.ping"}
        assert _info(gateway, "flaky").state == "failed"
        assert flaky.task_ended and not flaky.task_running
        assert steady.task_running and not steady.task_ended
    assert steady.task_ended


async def test_required_plugin_whose_startup_raises_stops_start_up(start_gateway):
    plugins = {"flaky": FailingStartup("flaky.ping")}
    with pytest.raises(GatewayStartupError, match="required plugin flaky"):
        async with start_gateway(plugins=plugins, config="[plugins.flaky]\nrequired = true\n"):
            pytest.fail("the gateway must not start")


def test_plugin_whose_declaration_raises_is_left_out(state_dir):
    plugins = {"broken": FailingDeclaration(), "fine": MethodPlugin("fine.ping")}
    gateway = _prepared(state_dir, use_entry_points=False, plugins=plugins)
    assert _info(gateway, "broken").state == "failed"
    assert "declaration bug" in _info(gateway, "broken").error
    assert set(gateway.methods) == {"fine.ping"}


def test_async_hookimpl_is_refused_at_load(state_dir):
    plugins = {"eager": AsyncHook(), "fine": MethodPlugin("fine.ping")}
    gateway = _prepared(state_dir, use_entry_points=False, plugins=plugins)
    info = _info(gateway, "eager")
    assert info.state == "failed"
    assert "anima_methods is async" in info.error
    assert "async.method" not in gateway.methods


def test_async_hookimpl_of_a_required_plugin_stops_start_up(state_dir):
    (state_dir / "config.toml").write_text("[plugins.eager]\nrequired = true\n")
    with pytest.raises(GatewayStartupError, match="eager"):
        _prepared(state_dir, use_entry_points=False, plugins={"eager": AsyncHook()})


def test_required_plugin_that_is_not_installed_stops_start_up(state_dir):
    (state_dir / "config.toml").write_text("[plugins.ghost]\nrequired = true\n")
    with pytest.raises(GatewayStartupError, match="ghost"):
        _prepared(state_dir, use_entry_points=False)


# -- a plugin's config section ------------------------------------------------------------------


async def test_plugin_section_is_decoded_and_handed_to_the_plugin(start_gateway):
    plugin = ConfiguredPlugin()
    config = '[plugins.probe]\nrequired = true\ngreeting = "bonjour"\nretries = 5\n'
    async with start_gateway(plugins={"probe": plugin}, config=config) as gateway:
        assert plugin.section == ProbeConfig(greeting="bonjour", retries=5)
        assert gateway.services.config.section("probe") == plugin.section


async def test_plugin_section_defaults_apply_when_the_file_is_silent(start_gateway):
    plugin = ConfiguredPlugin()
    async with start_gateway(plugins={"probe": plugin}, use_entry_points=False):
        assert plugin.section == ProbeConfig()


@pytest.mark.parametrize(
    ("table", "key_path"),
    [
        ("retries = -1", "plugins.probe.retries"),
        ('retries = "many"', "plugins.probe.retries"),
        ("greeting = 3", "plugins.probe.greeting"),
        ('colour = "red"', "plugins.probe.colour"),
    ],
)
def test_bad_plugin_section_stops_start_up_naming_the_key(state_dir, table, key_path):
    (state_dir / "config.toml").write_text(f"[plugins.probe]\n{table}\n")
    with pytest.raises(GatewayStartupError) as failed:
        _prepared(state_dir, use_entry_points=False, plugins={"probe": ConfiguredPlugin()})
    assert str(failed.value).startswith(key_path)


def test_keys_for_a_plugin_without_a_section_are_refused(state_dir):
    (state_dir / "config.toml").write_text("[plugins.plain]\nspeed = 3\n")
    with pytest.raises(GatewayStartupError, match=r"plugins\.plain\.speed: unknown key"):
        _prepared(state_dir, use_entry_points=False, plugins={"plain": MethodPlugin("p.q")})


def test_section_for_a_plugin_that_is_not_installed_is_refused(state_dir):
    (state_dir / "config.toml").write_text("[plugins.nosuch]\nspeed = 3\n")
    with pytest.raises(GatewayStartupError, match=r"plugins\.nosuch"):
        _prepared(state_dir, use_entry_points=False)


@pytest.mark.parametrize(
    ("table", "key_path"),
    [('enabled = "no"', "plugins.probe.enabled"), ("required = 1", "plugins.probe.required")],
)
def test_kernel_keys_of_a_plugin_table_are_checked(state_dir, table, key_path):
    (state_dir / "config.toml").write_text(f"[plugins.probe]\n{table}\n")
    with pytest.raises(GatewayStartupError, match=key_path):
        _prepared(state_dir, use_entry_points=False, plugins={"probe": ConfiguredPlugin()})


def test_each_gateway_gets_its_own_instance_of_a_plugin_class(state_dir, tmp_path):
    first = _prepared(state_dir, use_entry_points=False, plugins={"m": ConfiguredPlugin})
    second = _prepared(tmp_path, use_entry_points=False, plugins={"m": ConfiguredPlugin})
    assert first.manager.get_plugin("m") is not second.manager.get_plugin("m")
    assert isinstance(first.manager.get_plugin("m"), ConfiguredPlugin)
