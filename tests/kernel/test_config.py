"""The config file: validated whole at start-up, replaced atomically, and the shared token."""

from __future__ import annotations

import stat
import tomllib
from typing import Annotated

import msgspec
import pytest
import trio

from kernel import (
    READ,
    ConfigError,
    ConfigSection,
    Gateway,
    GatewayStartupError,
    MethodSpec,
    hookimpl,
    open_client,
    open_gateway,
)


def gateway_url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}"


class WatcherConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    level: Annotated[int, msgspec.Meta(ge=0, le=9)] = 1


class WatcherPlugin:
    """Has a section, and records every ``anima_config_changed`` it is told of."""

    def __init__(self) -> None:
        self.changes: list[list[str]] = []
        self.services = None

    @hookimpl
    def anima_config_section(self):
        return ConfigSection(WatcherConfig)

    @hookimpl
    def anima_methods(self):
        return [MethodSpec("watcher.level", self.level, READ)]

    @hookimpl
    def anima_startup(self, services):
        self.services = services

    @hookimpl
    def anima_config_changed(self, services, changed):
        self.changes.append(list(changed))

    async def level(self, call, params):
        return {"level": call.services.config.section("watcher").level}


@pytest.fixture
def watcher() -> WatcherPlugin:
    return WatcherPlugin()


# -- start-up validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        ('[gateway]\nport = "18789"\n', "gateway.port"),
        ("[gateway]\nport = 70000\n", "gateway.port"),
        ("[gateway]\nbogus = 1\n", "gateway.bogus"),
        ("[gateway.limits]\nmaxPayload = 0\n", "gateway.limits.maxPayload"),
        ("[gateway.limits]\ntickIntervalMsec = 5\n", "gateway.limits.tickIntervalMsec"),
        ('[gateway.auth]\nmode = "open"\n', "gateway.auth.mode"),
        ("telemetry = true\n", "telemetry"),
        ("[extras]\nx = 1\n", "extras"),
    ],
)
async def test_bad_config_stops_start_up_naming_the_key(start_gateway, text, key_path):
    with pytest.raises(GatewayStartupError) as failed:
        async with start_gateway(config=text, use_entry_points=False):
            pytest.fail("the gateway must not start")
    assert str(failed.value).startswith(f"{key_path}:")


async def test_config_that_is_not_toml_names_the_file(start_gateway, state_dir):
    with pytest.raises(GatewayStartupError, match="not valid TOML") as failed:
        async with start_gateway(config="[gateway\nport = 1\n", use_entry_points=False):
            pytest.fail("the gateway must not start")
    assert str(state_dir / "config.toml") in str(failed.value)


async def test_unknown_top_level_key_says_what_is_expected(start_gateway):
    with pytest.raises(GatewayStartupError, match="unknown key") as failed:
        async with start_gateway(config="colour = 'red'\n", use_entry_points=False):
            pytest.fail("the gateway must not start")
    assert "colour" in str(failed.value)


async def test_config_path_elsewhere_is_used(tmp_path, state_dir, gateway_token):
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text("[gateway.limits]\ntickIntervalMs = 4321\n")
    async with open_gateway(
        state_dir=state_dir, config_path=elsewhere, use_entry_points=False, host="127.0.0.1", port=0
    ) as gateway:
        assert gateway.config.gateway.limits.tick_interval_ms == 4321
        async with open_client(gateway_url(gateway), token=gateway_token) as client:
            assert client.hello["policy"]["tickIntervalMs"] == 4321


def test_state_dir_defaults_to_anima_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ANIMA_STATE_DIR", str(tmp_path))
    gateway = Gateway()
    assert gateway.state_dir == tmp_path
    assert gateway.config_path == tmp_path / "config.toml"


def test_state_dir_defaults_to_dot_anima_in_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ANIMA_STATE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    gateway = Gateway()
    assert gateway.state_dir == tmp_path / ".anima"
    assert gateway.config_path == tmp_path / ".anima" / "config.toml"


# -- services.config.replace ----------------------------------------------------------------------


async def test_replace_validates_writes_atomically_and_tells_the_plugins(
    start_gateway, state_dir, watcher, connect
):
    async with start_gateway(plugins={"watcher": watcher}, use_entry_points=False) as gateway:
        config = gateway.services.config
        document = config.raw()
        document.setdefault("plugins", {})["watcher"] = {"level": 7}

        changed = await config.replace(document)

        assert changed == ["plugins.watcher"]
        assert watcher.changes == [["plugins.watcher"]]
        path = state_dir / "config.toml"
        assert tomllib.loads(path.read_text()) == {"plugins": {"watcher": {"level": 7}}}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # No temporary file left behind.
        assert not [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")]
        assert config.section("watcher") == WatcherConfig(level=7)
        async with connect(gateway) as client:
            assert await client.call("watcher.level") == {"level": 7}


async def test_replace_with_a_bad_document_writes_nothing(start_gateway, state_dir, watcher):
    original = "[plugins.watcher]\nlevel = 2\n"
    async with start_gateway(
        plugins={"watcher": watcher}, use_entry_points=False, config=original
    ) as gateway:
        config = gateway.services.config
        for bad, key_path in [
            ({"plugins": {"watcher": {"level": 99}}}, "plugins.watcher.level"),
            ({"plugins": {"watcher": {"volume": 1}}}, "plugins.watcher.volume"),
            ({"gateway": {"port": "x"}}, "gateway.port"),
            ({"surprise": {}}, "surprise"),
        ]:
            with pytest.raises(ConfigError) as failed:
                await config.replace(bad)
            assert str(failed.value).startswith(key_path)
        assert (state_dir / "config.toml").read_text() == original
        assert config.section("watcher") == WatcherConfig(level=2)
        assert watcher.changes == []


async def test_replace_reports_gateway_changes_and_ignores_no_change(start_gateway, watcher):
    async with start_gateway(plugins={"watcher": watcher}, use_entry_points=False) as gateway:
        config = gateway.services.config
        assert await config.replace(config.raw()) == []
        document = config.raw()
        document["gateway"] = {"limits": {"tickIntervalMs": 9_000}}
        assert await config.replace(document) == ["gateway"]
    assert watcher.changes == [["gateway"]]


async def test_replaced_limits_are_what_new_clients_are_told_and_get(
    start_gateway, connect, raw_connect
):
    async with start_gateway(use_entry_points=False) as gateway:
        async with connect(gateway) as before:
            assert before.hello["policy"]["tickIntervalMs"] == 30_000
            config = gateway.services.config
            document = config.raw()
            document["gateway"] = {"limits": {"tickIntervalMs": 50, "maxPayload": 64 * 1024}}
            assert await config.replace(document) == ["gateway"]
            # The 30 s period in progress was dropped for the new one.
            with trio.fail_after(10):
                await before.next_event("tick")

        async with raw_connect(gateway, scopes=["operator.read"]) as after:
            assert after.hello["policy"]["tickIntervalMs"] == 50
            assert after.hello["policy"]["maxPayload"] == 64 * 1024
            with trio.fail_after(10):
                await after.event("tick")
                await after.request("big", "no.such.method", {"pad": "x" * 70_000})
                closed = await after.closed()
            assert closed.code == 1009


# -- the shared token -----------------------------------------------------------------------------


async def test_token_is_generated_at_first_start_owner_only_and_reused(
    start_gateway, state_dir, monkeypatch
):
    monkeypatch.delenv("ANIMA_GATEWAY_TOKEN")
    token_file = state_dir / "gateway.token"
    async with start_gateway(use_entry_points=False) as gateway:
        assert gateway.auth.token_generated is True
        assert gateway.auth.token_file == token_file
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        async with open_client(gateway_url(gateway), token=token) as client:
            assert client.hello["auth"]["role"] == "operator"

    async with start_gateway(use_entry_points=False) as again:
        assert again.auth.token_generated is False
        assert token_file.read_text().strip() == token
        async with open_client(gateway_url(again), token=token):
            pass


async def test_env_token_wins_and_no_file_is_made(start_gateway, state_dir, gateway_token):
    async with start_gateway(use_entry_points=False) as gateway:
        assert gateway.auth.token == gateway_token
        assert gateway.auth.token_file is None
    assert not (state_dir / "gateway.token").exists()


async def test_token_from_the_config_file(start_gateway, monkeypatch):
    monkeypatch.delenv("ANIMA_GATEWAY_TOKEN")
    config = '[gateway.auth]\ntoken = "from-the-file"\n'
    async with (
        start_gateway(use_entry_points=False, config=config) as gateway,
        open_client(gateway_url(gateway), token="from-the-file") as client,
    ):
        assert client.hello["auth"]["method"] == "token"
