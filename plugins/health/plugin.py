"""The Health & Status plugin.

The heartbeat is a real periodic task: each beat checks the store round trip and the event
loop's responsiveness, records the outcome for ``last-heartbeat``, emits ``heartbeat`` and
refreshes the cached health summary, which ``health`` then answers from memory. A change in
what the summary says (not merely its timestamp) is announced as ``health.changed``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Annotated, Any, Literal

import msgspec
import trio

from kernel import (
    ADMIN,
    READ,
    Call,
    ConfigSection,
    ConnectionInfo,
    EventSpec,
    MethodSpec,
    Params,
    Payload,
    Services,
    hookimpl,
    invalid_request,
)

from .presence import PresenceEntry, PresenceTable, entry_for_connection

__all__ = ["HealthPlugin"]

logger = logging.getLogger(__name__)

MIN_HEARTBEAT_MS = 1_000


class HealthConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    heartbeat_enabled: bool = True
    heartbeat_interval_ms: Annotated[int, msgspec.Meta(ge=MIN_HEARTBEAT_MS)] = 60_000
    presence_ttl_ms: Annotated[int, msgspec.Meta(ge=1_000)] = 300_000
    max_presence_entries: Annotated[int, msgspec.Meta(ge=1)] = 200
    max_system_events: Annotated[int, msgspec.Meta(ge=1)] = 100


class HealthParams(Params):
    probe: bool = False


class SetHeartbeatsParams(Params):
    enabled: bool | None = None
    interval_ms: Annotated[int, msgspec.Meta(ge=MIN_HEARTBEAT_MS)] | None = None


class SystemEventParams(Params):
    text: str
    device_id: str | None = None
    instance_id: str | None = None
    host: str | None = None
    ip: str | None = None
    mode: str | None = None
    version: str | None = None
    platform: str | None = None
    device_family: str | None = None
    model_identifier: str | None = None
    last_input_seconds: Annotated[int, msgspec.Meta(ge=0)] | None = None
    reason: str | None = None
    roles: list[str] | None = None
    scopes: list[str] | None = None
    tags: list[str] | None = None


class HeartbeatEvent(Payload):
    ts: int
    status: Literal["ok", "failed"]
    duration_ms: float
    store_latency_ms: float | None = None
    loop_lag_ms: float | None = None
    reason: str | None = None


class SystemEvent(Payload):
    ts: int
    text: str
    source: str | None = None


class HealthPlugin:
    """Health, status, heartbeat and presence; one instance per gateway."""

    def __init__(self) -> None:
        self.config = HealthConfig()
        self.services: Services | None = None
        self.last_beat: HeartbeatEvent | None = None
        self.summary: dict[str, Any] = {}
        self.health_version = 1
        self.presence = PresenceTable(ttl_ms=300_000, max_entries=200)
        self.system_events: deque[SystemEvent] = deque(maxlen=100)
        self._beat_now = trio.Event()
        self._enabled = True
        self._interval_ms = 60_000

    # -- declarations ----------------------------------------------------------------------

    @hookimpl
    def anima_config_section(self) -> ConfigSection:
        return ConfigSection(HealthConfig)

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [
            MethodSpec("health", self.health, READ, HealthParams, description="health summary"),
            MethodSpec("status", self.status, READ, description="gateway status", quick=True),
            MethodSpec("last-heartbeat", self.last_heartbeat, READ, quick=True),
            MethodSpec("system-presence", self.system_presence, READ, quick=True),
            MethodSpec("set-heartbeats", self.set_heartbeats, ADMIN, SetHeartbeatsParams),
            MethodSpec("system-event", self.system_event, ADMIN, SystemEventParams),
        ]

    @hookimpl
    def anima_events(self) -> list[EventSpec]:
        return [
            EventSpec("health.changed", READ, description="the health summary changed"),
            EventSpec("presence.changed", READ, droppable=True, description="presence delta"),
            EventSpec("heartbeat", READ, droppable=True, description="a heartbeat ran"),
        ]

    # -- lifecycle -------------------------------------------------------------------------

    @hookimpl
    def anima_startup(self, services: Services, nursery: trio.Nursery) -> None:
        self.services = services
        self._apply_config(services.config.section("health"))
        now = services.clock.now_ms()
        self.presence.upsert(
            PresenceEntry(
                key=f"gateway:{services.info.host}",
                ts=now,
                reason="self",
                host=services.info.host,
                version=services.info.version,
                mode="gateway",
            )
        )
        self.summary = self._build_summary(None, 0.0)
        nursery.start_soon(self._heartbeat_loop)

    def _apply_config(self, config: HealthConfig) -> None:
        self.config = config
        self._enabled = config.heartbeat_enabled
        self._interval_ms = config.heartbeat_interval_ms
        self.presence._ttl_ms = config.presence_ttl_ms
        self.presence._max_entries = config.max_presence_entries
        self.system_events = deque(self.system_events, maxlen=config.max_system_events)

    @hookimpl
    def anima_config_changed(self, services: Services, changed: list[str]) -> None:
        if "plugins.health" in changed:
            self._apply_config(services.config.section("health"))
            # Refresh now: a disabled heartbeat never beats, so no beat would announce it.
            self._refresh(self.last_beat)
            self._beat_now.set()

    @hookimpl
    def anima_client_connected(self, services: Services, connection: ConnectionInfo) -> None:
        if connection.client.mode == "cli":
            # One-shot CLI calls would flood presence with entries that vanish at once.
            return
        entry = self.presence.upsert(entry_for_connection(connection, services.clock.now_ms()))
        self._announce_presence(services, "upsert", entry)

    @hookimpl
    def anima_client_disconnected(self, services: Services, connection: ConnectionInfo) -> None:
        entry = self.presence.mark_disconnected(connection.conn_id, services.clock.now_ms())
        if entry is not None:
            self._announce_presence(services, "upsert", entry)

    @hookimpl
    def anima_hello_snapshot(self, services: Services, connection: ConnectionInfo) -> dict:
        return {
            "presence": self.presence.entries(services.clock.now_ms()),
            "health": self.summary,
            "stateVersion": {"presence": self.presence.version, "health": self.health_version},
        }

    def _announce_presence(self, services: Services, action: str, entry: PresenceEntry) -> None:
        services.events.emit(
            "presence.changed",
            {"action": action, "entry": entry, "stateVersion": self.presence.version},
        )

    # -- heartbeat -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            if self._enabled:
                await self._beat()
            with trio.move_on_after(self._interval_ms / 1000):
                await self._beat_now.wait()
            self._beat_now = trio.Event()

    async def _beat(self) -> None:
        assert self.services is not None
        services = self.services
        started = time.perf_counter()

        store_latency: float | None = None
        reason: str | None = None
        try:
            with trio.fail_after(5):
                store_started = time.perf_counter()
                await services.store.run(lambda db: db.execute("SELECT 1").fetchone())
                store_latency = round((time.perf_counter() - store_started) * 1000, 3)
        except Exception as exc:
            reason = f"store check failed: {exc or type(exc).__name__}"

        lag_started = time.perf_counter()
        await trio.sleep(0)
        loop_lag = round((time.perf_counter() - lag_started) * 1000, 3)

        beat = HeartbeatEvent(
            ts=services.clock.now_ms(),
            status="failed" if reason else "ok",
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            store_latency_ms=store_latency,
            loop_lag_ms=loop_lag,
            reason=reason,
        )
        self.last_beat = beat
        services.events.emit("heartbeat", beat)
        self._refresh(beat)

    def _refresh(self, beat: HeartbeatEvent | None, duration_ms: float = 0.0) -> None:
        assert self.services is not None
        summary = self._build_summary(beat, duration_ms)
        if _comparable(summary) != _comparable(self.summary):
            self.health_version += 1
            self.summary = summary
            self.services.events.emit(
                "health.changed", {**summary, "stateVersion": self.health_version}
            )
        else:
            self.summary = summary

    def _build_summary(self, beat: HeartbeatEvent | None, duration_ms: float) -> dict[str, Any]:
        assert self.services is not None
        services = self.services
        store_ok = beat is None or beat.status == "ok"
        return {
            "ok": store_ok,
            "ts": services.clock.now_ms(),
            "durationMs": duration_ms,
            "version": services.info.version,
            "uptimeMs": services.clock.now_ms() - services.info.started_at_ms,
            "heartbeat": {
                "enabled": self._enabled,
                "intervalMs": self._interval_ms,
                "lastBeatAt": beat.ts if beat else None,
                "lastStatus": beat.status if beat else None,
            },
            "store": {
                "ok": store_ok,
                "latencyMs": beat.store_latency_ms if beat else None,
                "error": beat.reason if beat else None,
            },
            "connections": _connection_counts(services),
            "plugins": _plugin_counts(services),
        }

    # -- methods ---------------------------------------------------------------------------

    async def health(self, call: Call, params: HealthParams) -> dict[str, Any]:
        if params.probe:
            started = time.perf_counter()
            await self._beat()
            self.summary["durationMs"] = round((time.perf_counter() - started) * 1000, 3)
        # Connection counts change with every client; they are read live, which is cheap,
        # rather than making every connect a health change. Plugin states too: the summary
        # made at start-up may predate another plugin's failing start.
        return {
            **self.summary,
            "connections": _connection_counts(call.services),
            "plugins": _plugin_counts(call.services),
        }

    async def status(self, call: Call, params: Any) -> dict[str, Any]:
        services = call.services
        connections = services.connections.all()
        result: dict[str, Any] = {
            "version": services.info.version,
            "uptimeMs": services.clock.now_ms() - services.info.started_at_ms,
            "ok": self.summary.get("ok", True),
            "heartbeat": self.summary.get("heartbeat"),
            "connections": {
                "total": len(connections),
                "nodes": sum(1 for c in connections if c.role == "node"),
            },
            "plugins": [{"name": p.name, "state": p.state} for p in services.plugins],
            "presenceCount": len(self.presence.entries(services.clock.now_ms())),
            "queuedSystemEvents": len(self.system_events),
        }
        if ADMIN not in call.connection.scopes:
            result["redacted"] = True
            return result

        result["stateDir"] = str(services.info.state_dir)
        result["configPath"] = str(services.info.config_path)
        result["host"] = services.info.host
        result["plugins"] = [
            {"name": p.name, "version": p.version, "state": p.state, "error": p.error}
            for p in services.plugins
        ]
        result["clients"] = [
            {
                "connId": c.conn_id,
                "clientId": c.client.id,
                "mode": c.client.mode,
                "role": c.role,
                "scopes": sorted(c.scopes),
                "remoteIp": c.remote_ip,
                "local": c.is_local,
                "authMethod": c.auth_method,
                "deviceId": c.device_id,
                "connectedAtMs": c.connected_at_ms,
            }
            for c in connections
        ]
        result["systemEvents"] = list(self.system_events)
        return result

    async def last_heartbeat(self, call: Call, params: Any) -> HeartbeatEvent | None:
        return self.last_beat

    async def system_presence(self, call: Call, params: Any) -> list[PresenceEntry]:
        return self.presence.entries(call.services.clock.now_ms())

    async def set_heartbeats(self, call: Call, params: SetHeartbeatsParams) -> dict[str, Any]:
        if params.enabled is None and params.interval_ms is None:
            raise invalid_request(
                "invalid set-heartbeats params: give enabled, intervalMs or both", field="enabled"
            )
        if params.enabled is not None:
            self._enabled = params.enabled
        if params.interval_ms is not None:
            self._interval_ms = params.interval_ms
        # Refresh now: a disabled heartbeat never beats, so no beat would announce it.
        self._refresh(self.last_beat)
        self._beat_now.set()
        return {"ok": True, "enabled": self._enabled, "intervalMs": self._interval_ms}

    async def system_event(self, call: Call, params: SystemEventParams) -> dict[str, Any]:
        text = params.text.strip()
        if not text:
            raise invalid_request(
                "invalid system-event params: text must not be blank", field="text"
            )
        now = call.services.clock.now_ms()
        self.system_events.append(SystemEvent(ts=now, text=text, source=call.connection.conn_id))

        key = params.device_id or params.instance_id or params.host
        if key:
            fields = msgspec.structs.asdict(params)
            fields.pop("text")
            fields["reason"] = fields.get("reason") or "system-event"
            entry = self.presence.upsert(PresenceEntry(key=key, ts=now, text=text, **fields))
            self._announce_presence(call.services, "upsert", entry)
        return {"ok": True}


def _connection_counts(services: Services) -> dict[str, int]:
    connections = services.connections.all()
    nodes = sum(1 for c in connections if c.role == "node")
    return {"total": len(connections), "operators": len(connections) - nodes, "nodes": nodes}


def _plugin_counts(services: Services) -> dict[str, Any]:
    return {
        "loaded": sum(1 for p in services.plugins if p.state == "loaded"),
        "failed": sorted(p.name for p in services.plugins if p.state == "failed"),
    }


def _comparable(summary: dict[str, Any]) -> tuple:
    if not summary:
        return ()
    return (
        summary["ok"],
        summary["heartbeat"]["enabled"],
        summary["heartbeat"]["intervalMs"],
        summary["heartbeat"]["lastStatus"],
        summary["store"]["ok"],
        summary["plugins"]["failed"],
    )
