"""The Health & Status plugin over real sockets: every method, its events and its config."""

from __future__ import annotations

import pytest
import trio

from kernel import ADMIN, READ, GatewayError, GatewayStartupError
from plugins.health import HealthPlugin

pytestmark = pytest.mark.usefixtures("gateway_token")


@pytest.fixture
def health_config() -> dict | None:
    return None


@pytest.fixture
async def gateway(start_gateway, health_config):
    config = {"plugins": {"health": health_config}} if health_config else None
    async with start_gateway(
        plugins={"health": HealthPlugin}, use_entry_points=False, config=config
    ) as running:
        yield running


async def _error(client, method, params=None) -> GatewayError:
    with pytest.raises(GatewayError) as failed:
        await client.call(method, params)
    return failed.value


async def _first_beat(client) -> dict:
    with trio.fail_after(5):
        while (beat := await client.call("last-heartbeat")) is None:
            await trio.sleep(0.01)
    return beat


# -- health -------------------------------------------------------------------------------------


@pytest.mark.parametrize("health_config", [{"heartbeatEnabled": False}])
async def test_health_answers_from_cache_unless_probed(gateway, connect):
    async with connect(gateway, scopes=[READ]) as client:
        first = await client.call("health")
        await trio.sleep(0.01)
        second = await client.call("health")
        assert first["ts"] == second["ts"]
        assert first["ok"] is True
        assert first["heartbeat"]["enabled"] is False
        assert first["connections"] == {"total": 1, "operators": 1, "nodes": 0}
        assert await client.call("last-heartbeat") is None

        probed = await client.call("health", {"probe": True})
        assert probed["ts"] > first["ts"]
        assert probed["store"]["ok"] is True
        assert probed["heartbeat"]["lastStatus"] == "ok"
        # The probe refreshed the cache that later calls answer from.
        assert (await client.call("health"))["ts"] == probed["ts"]
        assert (await client.call("last-heartbeat"))["status"] == "ok"


async def test_health_counts_connections_live(gateway, connect):
    async with connect(gateway) as client:
        async with connect(gateway, role="node", scopes=[], mode="node"):
            counts = (await client.call("health"))["connections"]
            assert counts == {"total": 2, "operators": 1, "nodes": 1}
        await _wait_connections(gateway, 1)
        assert (await client.call("health"))["connections"]["total"] == 1


async def _wait_connections(gateway, count: int) -> None:
    with trio.fail_after(5):
        while len(gateway.connections) != count:
            await trio.sleep(0.01)


async def test_hello_snapshot_carries_health_and_presence(gateway, connect):
    async with connect(gateway, scopes=[READ]) as client:
        snapshot = client.hello["snapshot"]
        health = await client.call("health")
    assert snapshot["health"]["version"] == health["version"]
    assert set(snapshot["stateVersion"]) == {"presence", "health"}
    assert [e["reason"] for e in snapshot["presence"] if e["mode"] == "gateway"] == ["self"]


# -- status -------------------------------------------------------------------------------------


async def test_status_is_redacted_for_non_admin_and_full_for_admin(gateway, connect, state_dir):
    async with (
        connect(gateway, scopes=[READ]) as reader,
        connect(gateway, scopes=[ADMIN]) as admin,
    ):
        redacted = await reader.call("status")
        full = await admin.call("status")
        conn_ids = {reader.hello["server"]["connId"], admin.hello["server"]["connId"]}

    assert redacted["redacted"] is True
    for secret in ("stateDir", "configPath", "host", "clients", "systemEvents"):
        assert secret not in redacted
    assert redacted["plugins"] == [{"name": "health", "state": "loaded"}]
    assert redacted["connections"] == {"total": 2, "nodes": 0}

    assert "redacted" not in full
    assert full["stateDir"] == str(state_dir)
    assert full["configPath"] == str(state_dir / "config.toml")
    assert {c["connId"] for c in full["clients"]} == conn_ids
    assert {tuple(c["scopes"]) for c in full["clients"]} == {(READ,), (ADMIN,)}
    assert full["plugins"][0]["name"] == "health" and "version" in full["plugins"][0]


# -- heartbeats ---------------------------------------------------------------------------------


async def test_last_heartbeat_reports_real_beats_at_the_interval_set(gateway, connect):
    async with connect(gateway, scopes=[ADMIN]) as client:
        first = await _first_beat(client)
        assert first["status"] == "ok"
        assert first["storeLatencyMs"] >= 0

        answer = await client.call("set-heartbeats", {"intervalMs": 1000})
        assert answer == {"ok": True, "enabled": True, "intervalMs": 1000}
        with trio.fail_after(10):
            # The change beats at once, then every second (not every minute, the default).
            changed = await client.next_event("heartbeat")
            if changed["payload"] == first:
                changed = await client.next_event("heartbeat")
            following = await client.next_event("heartbeat")
        assert changed["payload"]["ts"] >= first["ts"]
        # A second apart, give or take the rounding to milliseconds.
        assert following["payload"]["ts"] - changed["payload"]["ts"] >= 900
        assert await client.call("last-heartbeat") == following["payload"]
        health = await client.call("health")
        assert health["heartbeat"]["intervalMs"] == 1000
        assert health["heartbeat"]["lastBeatAt"] == following["payload"]["ts"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "enabled"),
        ({"intervalMs": 999}, "intervalMs"),
        ({"intervalMs": 0}, "intervalMs"),
        ({"intervalMs": "1000"}, "intervalMs"),
        ({"enabled": "no"}, "enabled"),
        ({"every": 5}, "every"),
    ],
)
async def test_set_heartbeats_refuses_bad_input(gateway, connect, params, field):
    async with connect(gateway) as client:
        error = await _error(client, "set-heartbeats", params)
    assert error.code == 400
    assert field in error.message
    assert error.details == {"field": field}


async def test_set_heartbeats_needs_admin(gateway, connect):
    async with connect(gateway, scopes=["operator.write"]) as client:
        error = await _error(client, "set-heartbeats", {"enabled": False})
    assert error.code == 403
    assert ADMIN in error.message


async def test_disabling_and_enabling_the_heartbeat_emits_health_changed(gateway, connect):
    async with (
        connect(gateway, scopes=[READ]) as reader,
        connect(gateway, scopes=[ADMIN]) as admin,
    ):
        await _first_beat(admin)
        with trio.fail_after(5):
            await admin.call("set-heartbeats", {"enabled": False})
            # (The first beat's own health.changed may still be on its way; skip it.)
            off = await _health_changed(reader, enabled=False)
            assert (await reader.call("health"))["heartbeat"]["enabled"] is False

            await admin.call("set-heartbeats", {"enabled": True})
            on = await _health_changed(reader, enabled=True)
        assert on["payload"]["stateVersion"] > off["payload"]["stateVersion"]


async def _health_changed(client, *, enabled: bool) -> dict:
    while True:
        event = await client.next_event("health.changed")
        if event["payload"]["heartbeat"]["enabled"] is enabled:
            return event


@pytest.mark.parametrize("health_config", [{"heartbeatEnabled": False}])
async def test_no_beats_while_disabled(gateway, connect):
    async with connect(gateway) as client:
        await client.call("set-heartbeats", {"intervalMs": 1000})
        await trio.sleep(0.1)
        assert await client.call("last-heartbeat") is None
        assert not [e for e in client.events_nowait() if e["event"] == "heartbeat"]


# -- presence -----------------------------------------------------------------------------------


async def test_system_presence_lists_the_gateway_and_connected_clients(gateway, connect):
    async with (
        connect(gateway, scopes=[READ], mode="cli") as cli,
        connect(gateway, scopes=[READ], client_id="test", mode="test") as app,
    ):
        app_id = app.hello["server"]["connId"]
        cli_id = cli.hello["server"]["connId"]
        presence = await cli.call("system-presence")
    (gateway_entry,) = [e for e in presence if e["mode"] == "gateway"]
    assert gateway_entry["reason"] == "self"
    (app_entry,) = [e for e in presence if e.get("connId") == app_id]
    assert app_entry["reason"] == "connect"
    assert app_entry["mode"] == "test"
    assert app_entry["scopes"] == [READ]
    # One-shot CLI connections are not presence.
    assert not [e for e in presence if e.get("connId") == cli_id]


async def test_presence_changed_on_connect_and_disconnect(gateway, connect):
    async with connect(gateway, scopes=[READ]) as watcher:
        async with connect(gateway, scopes=[READ], mode="test") as app:
            app_id = app.hello["server"]["connId"]
            joined = await watcher.next_event("presence.changed")
        left = await watcher.next_event("presence.changed")
        presence = await watcher.call("system-presence")
    assert joined["payload"]["entry"]["connId"] == app_id
    assert joined["payload"]["entry"]["reason"] == "connect"
    assert left["payload"]["entry"]["reason"] == "disconnect"
    assert left["payload"]["stateVersion"] > joined["payload"]["stateVersion"]
    assert [e["reason"] for e in presence if e["key"] == app_id] == ["disconnect"]


# -- system-event -------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{"text": "   "}, {"text": ""}, {}])
async def test_system_event_needs_text(gateway, connect, params):
    async with connect(gateway) as client:
        error = await _error(client, "system-event", params)
    assert error.code == 400
    assert "text" in error.message
    assert error.details == {"field": "text"}


async def test_system_event_with_a_device_updates_presence_for_readers(gateway, connect):
    async with (
        connect(gateway, scopes=[READ]) as reader,
        connect(gateway, scopes=[ADMIN]) as admin,
    ):
        answer = await admin.call(
            "system-event",
            {"text": "Node: kitchen tablet woke", "deviceId": "dev-1", "platform": "android"},
        )
        assert answer == {"ok": True}
        changed = await reader.next_event("presence.changed")
        presence = await reader.call("system-presence")
        status = await admin.call("status")

    entry = changed["payload"]["entry"]
    assert entry["deviceId"] == "dev-1"
    assert entry["text"] == "Node: kitchen tablet woke"
    assert entry["platform"] == "android"
    assert entry["reason"] == "system-event"
    assert [e["key"] for e in presence if e.get("deviceId") == "dev-1"] == ["dev-1"]
    assert [e["text"] for e in status["systemEvents"]] == ["Node: kitchen tablet woke"]
    assert status["queuedSystemEvents"] == 1


async def test_system_event_without_presence_fields_emits_no_presence(gateway, connect):
    async with (
        connect(gateway, scopes=[READ]) as reader,
        connect(gateway, scopes=[ADMIN]) as admin,
    ):
        await admin.call("system-event", {"text": "backup finished"})
        await reader.call("health")
        assert not [e for e in reader.events_nowait() if e["event"] == "presence.changed"]
        assert (await admin.call("status"))["queuedSystemEvents"] == 1


async def test_system_event_needs_admin(gateway, connect):
    async with connect(gateway, scopes=[READ, "operator.write"]) as client:
        error = await _error(client, "system-event", {"text": "hi"})
    assert error.code == 403


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key_path"),
    [
        ({"heartbeatIntervalMs": 10}, "plugins.health.heartbeatIntervalMs"),
        ({"heartbeatEnabled": "yes"}, "plugins.health.heartbeatEnabled"),
        ({"beatsPerMinute": 1}, "plugins.health.beatsPerMinute"),
    ],
)
async def test_bad_health_config_stops_start_up(start_gateway, section, key_path):
    with pytest.raises(GatewayStartupError) as failed:
        async with start_gateway(
            plugins={"health": HealthPlugin},
            use_entry_points=False,
            config={"plugins": {"health": section}},
        ):
            pytest.fail("the gateway must not start")
    assert str(failed.value).startswith(key_path)


async def test_config_change_reaches_the_heartbeat(gateway, connect):
    async with connect(gateway, scopes=[READ]) as client:
        config = gateway.services.config
        document = config.raw()
        document["plugins"] = {"health": {"heartbeatEnabled": False}}
        assert await config.replace(document) == ["plugins.health"]
        with trio.fail_after(5):
            while (await client.call("health"))["heartbeat"]["enabled"]:
                await trio.sleep(0.01)
