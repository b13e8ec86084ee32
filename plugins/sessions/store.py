"""The ``sessions`` service: session entries, transcripts, archives and usage rows in SQLite.

``SessionStore`` is what the plugin hands other plugins through
``services.provide("sessions", ...)``: chat appends the turns it streams, providers read
usage (the operations only the wire methods need are in ``admin.py``; the tables and shared
row helpers in ``rows.py``). Everything goes through
``kernel.Store.run``: the SQL runs in a worker thread inside one transaction, so each call
either happens completely or not at all, and a call that returned has reached the disk.

Values in and out are plain dicts and lists with camelCase keys, so that no plugin needs this
module's types.

Transcripts are never destroyed by this plugin: ``sessions.reset``, ``sessions.delete`` and
``sessions.compact`` move messages into an archive (``session_archives`` plus an
``archive_id`` on each message row), where ``archives`` and ``archived_messages`` below still
find them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from kernel import Store, invalid_request

from . import usage as usage_sql
from .keys import DEFAULT_MAIN_KEY, MAIN_KEY_RE, agent_id_of, canonical_key
from .rows import (
    HISTORY_MAX,
    MESSAGE_TEXT_FIELDS,
    USAGE_ROWS_MAX,
    archive_from_row,
    ensure_row,
    entry_from_row,
    entry_row,
    live_messages,
    message_from_row,
    new_id,
    validated_message,
)

__all__ = ["SessionStore"]


class SessionStore:
    """Session entries, transcripts and usage; the object provided as ``"sessions"``.

    :param store: the kernel's store.
    :param clock: anything with ``now_ms()`` (the kernel's ``services.clock``).
    :param main_key: the main session, which ``main`` stands for and which cannot be deleted.
    """

    #: The shape of a canonical key (``canonical_key`` is the authority).
    MAIN_KEY_RE = MAIN_KEY_RE

    def __init__(self, store: Store, clock: Any, *, main_key: str = DEFAULT_MAIN_KEY) -> None:
        self._store = store
        self._clock = clock
        self.main_key = canonical_key(main_key, field="mainKey")

    # -- the service contract --------------------------------------------------------------

    def canonical_key(self, key: str, *, field: str = "sessionKey") -> str:
        """Validate and canonicalise a session key; 400 ``invalid <field>: ...`` otherwise."""
        return canonical_key(key, field=field, main_key=self.main_key)

    async def ensure(self, key: str) -> dict[str, Any]:
        """The session entry, created (with a new ``sessionId``) if missing."""
        canonical = self.canonical_key(key)
        now = self._clock.now_ms()
        return await self._store.run(lambda db: entry_from_row(ensure_row(db, canonical, now)))

    async def get(self, key: str) -> dict[str, Any] | None:
        canonical = self.canonical_key(key)

        def work(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = entry_row(db, canonical)
            return entry_from_row(row) if row else None

        return await self._store.run(work)

    async def append(self, key: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Append one message to the session's current transcript (creating the session).

        Keys of ``message`` other than the documented ones are ignored. Durable once it
        returns.

        :returns: the stored message, with ``id`` and ``ts``.
        :raises GatewayError: 400 naming ``message.<field>`` for a malformed message.
        """
        canonical = self.canonical_key(key)
        fields = validated_message(message)
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> dict[str, Any]:
            row = ensure_row(db, canonical, now)
            message_id = new_id()
            usage = fields.pop("usage", None) or {}
            db.execute(
                "INSERT INTO session_messages (message_id, session_key, session_id, role, text,"
                " ts, run_id, provider, model, stop_reason, label, input_tokens, output_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message_id,
                    canonical,
                    row["session_id"],
                    fields["role"],
                    fields["text"],
                    now,
                    *(fields.get(name) for name in MESSAGE_TEXT_FIELDS),
                    usage.get("inputTokens"),
                    usage.get("outputTokens"),
                ),
            )
            db.execute(
                "UPDATE session_entries SET updated_at = MAX(updated_at, ?),"
                " message_count = message_count + 1,"
                " last_provider = COALESCE(?, last_provider),"
                " last_model = COALESCE(?, last_model) WHERE key = ?",
                (now, fields.get("provider"), fields.get("model"), canonical),
            )
            stored = {"id": message_id, **fields, "ts": now}
            if usage:
                stored["usage"] = usage
            return stored

        return await self._store.run(work)

    async def history(self, key: str, limit: int = 200) -> list[dict[str, Any]]:
        """The last ``limit`` messages of the current transcript, oldest first."""
        canonical = self.canonical_key(key)
        limit = max(0, min(int(limit), HISTORY_MAX))

        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            row = entry_row(db, canonical)
            if row is None or limit == 0:
                return []
            return live_messages(db, row["session_id"], limit)

        return await self._store.run(work)

    async def record_usage(
        self,
        key: str,
        *,
        run_id: str,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        ts: int,
    ) -> None:
        """One usage row per run (a repeat for the same run replaces it); the tokens are
        added to the session entry's counters."""
        canonical = self.canonical_key(key)
        for name, value in (("runId", run_id), ("provider", provider), ("model", model)):
            if not isinstance(value, str) or not value:
                raise invalid_request(
                    f"invalid usage: {name} must be a non-empty string", field=name
                )
        for name, value in (
            ("inputTokens", input_tokens),
            ("outputTokens", output_tokens),
            ("ts", ts),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise invalid_request(f"invalid usage: {name} must be an integer >= 0", field=name)
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> None:
            row = ensure_row(db, canonical, now)
            previous = db.execute(
                "SELECT id, input_tokens, output_tokens FROM session_usage"
                " WHERE session_key = ? AND run_id = ?",
                (canonical, run_id),
            ).fetchone()
            if previous is None:
                db.execute(
                    "INSERT INTO session_usage (session_key, session_id, agent_id, run_id,"
                    " provider, model, input_tokens, output_tokens, ts)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        canonical,
                        row["session_id"],
                        agent_id_of(canonical),
                        run_id,
                        provider,
                        model,
                        input_tokens,
                        output_tokens,
                        ts,
                    ),
                )
                added_in, added_out = input_tokens, output_tokens
            else:
                db.execute(
                    "UPDATE session_usage SET provider = ?, model = ?, input_tokens = ?,"
                    " output_tokens = ?, ts = ? WHERE id = ?",
                    (provider, model, input_tokens, output_tokens, ts, previous["id"]),
                )
                added_in = input_tokens - previous["input_tokens"]
                added_out = output_tokens - previous["output_tokens"]
            db.execute(
                "UPDATE session_entries SET input_tokens = MAX(0, input_tokens + ?),"
                " output_tokens = MAX(0, output_tokens + ?), last_provider = ?,"
                " last_model = ? WHERE key = ?",
                (added_in, added_out, provider, model, canonical),
            )

        await self._store.run(work)

    async def usage_rows(
        self, *, start_ms: int, end_ms: int, key: str | None = None, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        """Usage rows with ``start_ms <= ts < end_ms``, oldest first."""
        canonical = self.canonical_key(key) if key is not None else None
        limit = max(0, min(int(limit), USAGE_ROWS_MAX))
        return await self._store.run(
            lambda db: usage_sql.rows(
                db, start_ms=start_ms, end_ms=end_ms, key=canonical, limit=limit
            )
        )

    # -- additions: archives ---------------------------------------------------------------

    async def archives(self, key: str) -> list[dict[str, Any]]:
        """Every archive of a session key, oldest first:
        ``{archiveId, sessionKey, sessionId, reason, archivedAt, messageCount}``."""
        canonical = self.canonical_key(key)

        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT * FROM session_archives WHERE session_key = ? ORDER BY archived_at, rowid",
                (canonical,),
            ).fetchall()
            return [archive_from_row(row) for row in rows]

        return await self._store.run(work)

    async def archived_messages(self, archive_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """The first ``limit`` messages of one archive, oldest first ([] if unknown)."""
        limit = max(0, min(int(limit), HISTORY_MAX))

        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT * FROM session_messages WHERE archive_id = ? ORDER BY seq LIMIT ?",
                (archive_id, limit),
            ).fetchall()
            return [message_from_row(row) for row in rows]

        return await self._store.run(work)
