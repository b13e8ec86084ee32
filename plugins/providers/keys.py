"""API keys for the model providers: several per provider, in the kernel's store.

Every change is written in one transaction before the in-memory copy changes, so what a
caller was told survives a killed process, and reads (one per run) never touch the disk.
Each provider has an active key; rotation moves it to the next enabled key in priority
order, wrapping around. Secrets leave this module only to go into a provider request, or
masked (``mask``) for an admin; nothing here logs them.

The secrets sit in the SQLite file in plain text, readable by whoever can read the state
directory, as the upstream gateway keeps them.
# TODO(secrets at rest): seal them with an OS keyring or a key derived from the gateway
# token once the gateway has a secret store.
"""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from kernel import Store, StoreError, StoreSchema, invalid_request

__all__ = ["KEY_ID_RE", "STORE_SCHEMA", "KeyEntry", "KeyStore", "check_secret", "mask"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_SECRET_CHARS = 4096
#: Longest error text kept on a key; provider messages are already short.
MAX_ERROR_CHARS = 300

STORE_SCHEMA = StoreSchema(
    owner="providers",
    migrations=(
        """
        CREATE TABLE provider_keys (
            key_id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            name TEXT NOT NULL,
            secret TEXT NOT NULL,
            enabled INTEGER NOT NULL,
            priority INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            last_error TEXT,
            last_error_at INTEGER
        );
        CREATE INDEX provider_keys_by_provider ON provider_keys (provider);
        CREATE TABLE provider_active_keys (
            provider TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            changed_at INTEGER NOT NULL
        );
        """,
    ),
)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    provider: str
    name: str
    secret: str
    enabled: bool
    priority: int
    created_at: int
    updated_at: int
    last_error: str | None = None
    last_error_at: int | None = None

    def order(self) -> tuple[int, int, str]:
        """Rotation order: lower priority number first, then older keys."""
        return (self.priority, self.created_at, self.key_id)


def mask(secret: str) -> str:
    """A key as an admin may see it: enough to recognise, never enough to use.

    Upstream shows the first 7 and last 4 characters of any key of 12 or more, which gives
    away most of a short key; here a key shows its ends only when it is long enough that
    they are a small part of it.
    """
    if len(secret) >= 24:
        return f"{secret[:7]}...{secret[-4:]}"
    if len(secret) >= 12:
        return f"...{secret[-4:]}"
    return "***"


def check_secret(secret: str) -> str:
    """The key as it will be stored, or a 400 naming ``apiKey``."""
    secret = secret.strip()
    if not secret:
        raise invalid_request("apiKey must not be empty", field="apiKey")
    if len(secret) > MAX_SECRET_CHARS:
        raise invalid_request(
            f"apiKey is longer than {MAX_SECRET_CHARS} characters", field="apiKey"
        )
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in secret):
        raise invalid_request(
            "apiKey must not contain spaces or control characters", field="apiKey"
        )
    if "..." in secret or secret == "***":
        # A client that echoes back what anima.providers.get showed would store the mask.
        raise invalid_request("apiKey looks like a masked key; send the whole key", field="apiKey")
    return secret


def _row_to_entry(row: sqlite3.Row) -> KeyEntry:
    return KeyEntry(
        key_id=row["key_id"],
        provider=row["provider"],
        name=row["name"],
        secret=row["secret"],
        enabled=bool(row["enabled"]),
        priority=row["priority"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_error=row["last_error"],
        last_error_at=row["last_error_at"],
    )


class KeyStore:
    """The keys of every provider, mirrored in memory from the store."""

    def __init__(self) -> None:
        self._store: Store | None = None
        self._keys: dict[str, KeyEntry] = {}
        self._active: dict[str, str] = {}

    def attach(self, store: Store) -> None:
        self._store = store

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._store is None:
            raise StoreError("the provider key store is not attached to a store yet")
        return await self._store.run(work)

    async def load(self) -> None:
        def read(db: sqlite3.Connection) -> tuple[list[KeyEntry], dict[str, str]]:
            keys = [_row_to_entry(r) for r in db.execute("SELECT * FROM provider_keys")]
            active = {
                r["provider"]: r["key_id"]
                for r in db.execute("SELECT provider, key_id FROM provider_active_keys")
            }
            return keys, active

        keys, active = await self._run(read)
        self._keys = {key.key_id: key for key in keys}
        self._active = active

    # -- reading ---------------------------------------------------------------------------

    def get(self, key_id: str) -> KeyEntry | None:
        return self._keys.get(key_id)

    def keys(self, provider: str) -> list[KeyEntry]:
        """The provider's keys in rotation order."""
        return sorted(
            (k for k in self._keys.values() if k.provider == provider), key=KeyEntry.order
        )

    def providers_with_keys(self) -> set[str]:
        return {key.provider for key in self._keys.values()}

    def active(self, provider: str) -> KeyEntry | None:
        """The key a run on ``provider`` uses: the chosen one if enabled, else the first."""
        chosen = self._keys.get(self._active.get(provider, ""))
        if chosen is not None and chosen.enabled and chosen.provider == provider:
            return chosen
        return next((k for k in self.keys(provider) if k.enabled), None)

    # -- changing --------------------------------------------------------------------------

    async def add(
        self,
        provider: str,
        secret: str,
        *,
        key_id: str | None,
        name: str | None,
        enabled: bool,
        priority: int | None,
        now_ms: int,
    ) -> KeyEntry:
        existing = self.keys(provider)
        if key_id is None:
            key_id = self._new_id(provider)
        if priority is None:
            # New keys go to the end of the rotation unless told otherwise.
            priority = max((k.priority for k in existing), default=-1) + 1
        entry = KeyEntry(
            key_id=key_id,
            provider=provider,
            name=name or f"{provider} key {len(existing) + 1}",
            secret=secret,
            enabled=enabled,
            priority=priority,
            created_at=now_ms,
            updated_at=now_ms,
        )

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO provider_keys (key_id, provider, name, secret, enabled, priority,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.key_id,
                    entry.provider,
                    entry.name,
                    entry.secret,
                    int(entry.enabled),
                    entry.priority,
                    entry.created_at,
                    entry.updated_at,
                ),
            )

        await self._run(insert)
        self._keys[entry.key_id] = entry
        return entry

    async def update(
        self,
        key_id: str,
        *,
        secret: str | None = None,
        name: str | None = None,
        enabled: bool | None = None,
        priority: int | None = None,
        now_ms: int,
    ) -> KeyEntry:
        entry = self._keys[key_id]
        changes: dict[str, object] = {"updated_at": now_ms}
        if secret is not None:
            # A new secret deserves a clean record: the old error was about the old key.
            changes.update(secret=secret, last_error=None, last_error_at=None)
        if name is not None:
            changes["name"] = name
        if enabled is not None:
            changes["enabled"] = enabled
        if priority is not None:
            changes["priority"] = priority
        updated = replace(entry, **changes)  # type: ignore[arg-type]

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE provider_keys SET name = ?, secret = ?, enabled = ?, priority = ?,"
                " updated_at = ?, last_error = ?, last_error_at = ? WHERE key_id = ?",
                (
                    updated.name,
                    updated.secret,
                    int(updated.enabled),
                    updated.priority,
                    updated.updated_at,
                    updated.last_error,
                    updated.last_error_at,
                    key_id,
                ),
            )

        await self._run(write)
        self._keys[key_id] = updated
        return updated

    async def remove(self, key_id: str) -> None:
        entry = self._keys[key_id]

        def delete(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM provider_keys WHERE key_id = ?", (key_id,))
            db.execute(
                "DELETE FROM provider_active_keys WHERE provider = ? AND key_id = ?",
                (entry.provider, key_id),
            )

        await self._run(delete)
        del self._keys[key_id]
        if self._active.get(entry.provider) == key_id:
            del self._active[entry.provider]

    async def activate(self, provider: str, key_id: str, *, now_ms: int) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO provider_active_keys (provider, key_id, changed_at) VALUES (?, ?, ?)"
                " ON CONFLICT (provider) DO UPDATE SET key_id = excluded.key_id,"
                " changed_at = excluded.changed_at",
                (provider, key_id, now_ms),
            )

        await self._run(write)
        self._active[provider] = key_id

    async def rotate(
        self, provider: str, *, now_ms: int, away_from: str | None = None
    ) -> tuple[KeyEntry | None, KeyEntry | None]:
        """Make the next enabled key active; return ``(previous, current)``.

        :param away_from: the key a failed run used. If another run has already rotated
            away from it, the current active key is kept, so two runs failing on the same
            key at once move one step, not two.
        """
        previous = self.active(provider)
        if away_from is not None and previous is not None and previous.key_id != away_from:
            return previous, previous
        enabled = [k for k in self.keys(provider) if k.enabled]
        if not enabled:
            return previous, None
        if previous is None:
            following = enabled[0]
        else:
            position = next((i for i, k in enumerate(enabled) if k.key_id == previous.key_id), -1)
            following = enabled[(position + 1) % len(enabled)]
        if previous is None or following.key_id != previous.key_id:
            await self.activate(provider, following.key_id, now_ms=now_ms)
        return previous, following

    async def record_error(self, key_id: str, message: str, *, now_ms: int) -> None:
        """Remember why a key last failed, for ``anima.providers.get``."""
        entry = self._keys.get(key_id)
        if entry is None:
            return
        text = message[:MAX_ERROR_CHARS]

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE provider_keys SET last_error = ?, last_error_at = ? WHERE key_id = ?",
                (text, now_ms, key_id),
            )

        await self._run(write)
        self._keys[key_id] = replace(entry, last_error=text, last_error_at=now_ms)

    def _new_id(self, provider: str) -> str:
        while True:
            key_id = f"{provider}-{secrets.token_hex(3)}"
            if key_id not in self._keys:
                return key_id
