"""Who is connected, and what nodes and clients last said about themselves.

Entries are keyed by device id, else instance id, else connection id. Entries of clients
that left, and those made by ``system-event``, expire after a while; the table never holds
more than ``max_entries``, oldest dropped first, so a noisy reporter cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from kernel import ConnectionInfo, Payload

__all__ = ["PresenceEntry", "PresenceTable", "entry_for_connection"]


class PresenceEntry(Payload):
    key: str
    ts: int
    reason: str
    host: str | None = None
    ip: str | None = None
    version: str | None = None
    platform: str | None = None
    device_family: str | None = None
    model_identifier: str | None = None
    mode: str | None = None
    last_input_seconds: int | None = None
    text: str | None = None
    device_id: str | None = None
    instance_id: str | None = None
    conn_id: str | None = None
    roles: list[str] | None = None
    scopes: list[str] | None = None
    tags: list[str] | None = None


class PresenceTable:
    def __init__(self, *, ttl_ms: int, max_entries: int) -> None:
        self._entries: OrderedDict[str, PresenceEntry] = OrderedDict()
        self._ttl_ms = ttl_ms
        self._max_entries = max_entries
        #: Bumped on every change, so a client can tell which view is newer.
        self.version = 1

    def entries(self, now_ms: int) -> list[PresenceEntry]:
        self._expire(now_ms)
        return list(self._entries.values())

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - self._ttl_ms
        stale = [
            key
            for key, entry in self._entries.items()
            if entry.conn_id is None and entry.reason != "self" and entry.ts < horizon
        ]
        for key in stale:
            del self._entries[key]

    def upsert(self, entry: PresenceEntry) -> PresenceEntry:
        previous = self._entries.pop(entry.key, None)
        if previous is not None:
            # Fields the reporter did not send keep their last known value.
            merged = {
                **msgspec.structs.asdict(previous),
                **{k: v for k, v in msgspec.structs.asdict(entry).items() if v is not None},
            }
            entry = PresenceEntry(**merged)
        self._entries[entry.key] = entry
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        self.version += 1
        return entry

    def mark_disconnected(self, conn_id: str, now_ms: int) -> PresenceEntry | None:
        for key, entry in self._entries.items():
            if entry.conn_id == conn_id:
                left = msgspec.structs.replace(entry, conn_id=None, reason="disconnect", ts=now_ms)
                self._entries[key] = left
                self.version += 1
                return left
        return None


def entry_for_connection(info: ConnectionInfo, now_ms: int) -> PresenceEntry:
    client = info.client
    return PresenceEntry(
        key=info.device_id or client.instance_id or info.conn_id,
        ts=now_ms,
        reason="connect",
        ip=info.remote_ip,
        version=client.version,
        platform=client.platform,
        device_family=client.device_family,
        model_identifier=client.model_identifier,
        mode=client.mode,
        device_id=info.device_id,
        instance_id=client.instance_id,
        conn_id=info.conn_id,
        roles=[info.role],
        scopes=sorted(info.scopes),
    )
