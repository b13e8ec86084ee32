"""The ``sessions`` service: session entries, transcripts, archives and usage rows in SQLite.

``SessionStore`` is what the plugin hands other plugins through
``services.provide("sessions", ...)`` (chat appends the turns it streams, providers read
usage), and what the plugin's own methods use. Everything goes through
``kernel.Store.run``: the SQL runs in a worker thread inside one transaction, so each call
either happens completely or not at all, and a call that returned has reached the disk.

Values in and out are plain dicts and lists with camelCase keys, so that no plugin needs this
module's types.

Transcripts are never destroyed by the methods of this plugin: ``reset``, ``delete`` and
``compact`` move messages into an archive (``session_archives`` plus an ``archive_id`` on
each message row), where ``archives`` and ``archived_messages`` still find them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from kernel import GatewayError, Store, conflict, invalid_request, not_found

from . import usage as usage_sql
from .keys import (
    DEFAULT_MAIN_KEY,
    GLOBAL_KEY,
    MAIN_KEY_RE,
    agent_id_of,
    canonical_key,
    session_kind,
)

__all__ = ["MIGRATIONS", "SCHEMA_OWNER", "SessionStore"]

logger = logging.getLogger(__name__)

SCHEMA_OWNER = "sessions"

#: Released migrations; never edit one, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE session_entries (
        key TEXT PRIMARY KEY,
        session_id TEXT NOT NULL UNIQUE,
        agent_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        label TEXT,
        spawned_by TEXT,
        spawn_depth INTEGER,
        settings TEXT NOT NULL DEFAULT '{}',
        last_provider TEXT,
        last_model TEXT,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        message_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX session_entries_label
        ON session_entries (label COLLATE NOCASE) WHERE label IS NOT NULL;
    CREATE INDEX session_entries_updated ON session_entries (updated_at DESC, key);
    CREATE INDEX session_entries_agent ON session_entries (agent_id, updated_at);

    CREATE TABLE session_archives (
        archive_id TEXT PRIMARY KEY,
        session_key TEXT NOT NULL,
        session_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        archived_at INTEGER NOT NULL,
        message_count INTEGER NOT NULL
    );
    CREATE INDEX session_archives_key ON session_archives (session_key, archived_at);

    CREATE TABLE session_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL UNIQUE,
        session_key TEXT NOT NULL,
        session_id TEXT NOT NULL,
        role TEXT NOT NULL,
        text TEXT NOT NULL,
        ts INTEGER NOT NULL,
        run_id TEXT,
        provider TEXT,
        model TEXT,
        stop_reason TEXT,
        label TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        archive_id TEXT REFERENCES session_archives (archive_id)
    );
    CREATE INDEX session_messages_transcript
        ON session_messages (session_id, archive_id, seq);
    CREATE INDEX session_messages_key_ts ON session_messages (session_key, ts);
    CREATE INDEX session_messages_archive ON session_messages (archive_id, seq);

    CREATE TABLE session_usage (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_key TEXT NOT NULL,
        session_id TEXT,
        agent_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        UNIQUE (session_key, run_id)
    );
    CREATE INDEX session_usage_ts ON session_usage (ts);
    CREATE INDEX session_usage_key_ts ON session_usage (session_key, ts);
    """,
)

#: Roles a transcript message may have.
ROLES = ("user", "assistant", "system", "tool")
#: Optional string fields of a message: wire name -> column.
_MESSAGE_TEXT_FIELDS = {
    "runId": "run_id",
    "provider": "provider",
    "model": "model",
    "stopReason": "stop_reason",
    "label": "label",
}
HISTORY_MAX = 10_000
USAGE_ROWS_MAX = 100_000
#: Patch fields kept in the ``settings`` JSON column (the others have columns of their own).
SETTING_FIELDS = (
    "thinkingLevel",
    "verboseLevel",
    "reasoningLevel",
    "responseUsage",
    "elevatedLevel",
    "execHost",
    "execSecurity",
    "execAsk",
    "execNode",
    "model",
    "sendPolicy",
    "groupActivation",
)
_TITLE_CHARS = 60
_LAST_MESSAGE_CHARS = 120


def _new_id() -> str:
    return str(uuid.uuid4())


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
        return await self._store.run(lambda db: _entry(_ensure_row(db, canonical, now)))

    async def get(self, key: str) -> dict[str, Any] | None:
        canonical = self.canonical_key(key)

        def work(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = _entry_row(db, canonical)
            return _entry(row) if row else None

        return await self._store.run(work)

    async def append(self, key: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Append one message to the session's current transcript (creating the session).

        Keys of ``message`` other than the documented ones are ignored. Durable once it
        returns.

        :returns: the stored message, with ``id`` and ``ts``.
        :raises GatewayError: 400 naming ``message.<field>`` for a malformed message.
        """
        canonical = self.canonical_key(key)
        fields = _validated_message(message)
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> dict[str, Any]:
            row = _ensure_row(db, canonical, now)
            message_id = _new_id()
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
                    *(fields.get(name) for name in _MESSAGE_TEXT_FIELDS),
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
            row = _entry_row(db, canonical)
            if row is None or limit == 0:
                return []
            return _live_messages(db, row["session_id"], limit)

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
            row = _ensure_row(db, canonical, now)
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
            return [_archive(row) for row in rows]

        return await self._store.run(work)

    async def archived_messages(self, archive_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """The first ``limit`` messages of one archive, oldest first ([] if unknown)."""
        limit = max(0, min(int(limit), HISTORY_MAX))

        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT * FROM session_messages WHERE archive_id = ? ORDER BY seq LIMIT ?",
                (archive_id, limit),
            ).fetchall()
            return [_message(row) for row in rows]

        return await self._store.run(work)

    # -- what the wire methods use ---------------------------------------------------------

    async def list_entries(
        self,
        *,
        limit: int,
        cursor: str | None = None,
        active_minutes: int | None = None,
        include_global: bool = False,
        label: str | None = None,
        agent_id: str | None = None,
        spawned_by: str | None = None,
        search: str | None = None,
        include_last_message: bool = False,
        include_derived_titles: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of session rows, most recently updated first, and the next cursor."""
        after = _decode_cursor(cursor) if cursor else None
        now = self._clock.now_ms()
        where: list[str] = ["key NOT GLOB 'agent:*:cron:*:run:*'"]
        args: list[Any] = []
        if not include_global:
            where.append("key != ?")
            args.append(GLOBAL_KEY)
        if active_minutes is not None:
            where.append("updated_at >= ?")
            args.append(now - active_minutes * 60_000)
        if label is not None:
            where.append("label = ? COLLATE NOCASE")
            args.append(label)
        if agent_id is not None:
            where.append("agent_id = ?")
            args.append(agent_id)
        if spawned_by is not None:
            where.append("spawned_by = ?")
            args.append(spawned_by)
        if search:
            pattern = "%" + _escape_like(search) + "%"
            where.append("(key LIKE ? ESCAPE '\\' OR label LIKE ? ESCAPE '\\')")
            args += [pattern, pattern]
        if after is not None:
            where.append("(updated_at < ? OR (updated_at = ? AND key > ?))")
            args += [after[0], after[0], after[1]]
        sql = (
            "SELECT * FROM session_entries WHERE "
            + " AND ".join(where)
            + " ORDER BY updated_at DESC, key LIMIT ?"
        )

        def work(db: sqlite3.Connection) -> tuple[list[dict[str, Any]], str | None]:
            rows = db.execute(sql, (*args, limit + 1)).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            entries = []
            for row in rows:
                entry = _entry(row)
                if include_derived_titles:
                    title = _first_user_text(db, row["session_id"])
                    if title:
                        entry["derivedTitle"] = _clip(title, _TITLE_CHARS)
                if include_last_message:
                    last = _last_text(db, row["session_id"])
                    if last:
                        entry["lastMessagePreview"] = _clip(last, _LAST_MESSAGE_CHARS)
                entries.append(entry)
            next_cursor = _encode_cursor(rows[-1]["updated_at"], rows[-1]["key"]) if more else None
            return entries, next_cursor

        return await self._store.run(work)

    async def preview(
        self, keys: Sequence[str], *, limit: int, max_chars: int
    ) -> list[dict[str, Any]]:
        """``{key, status: ok|empty|missing, items: [{role, text}]}`` per canonical key."""

        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            previews = []
            for key in keys:
                row = _entry_row(db, key)
                if row is None:
                    previews.append({"key": key, "status": "missing", "items": []})
                    continue
                messages = _live_messages(db, row["session_id"], limit)
                items = [
                    {
                        "role": m["role"] if m["role"] in ROLES else "other",
                        "text": _clip(m["text"], max_chars),
                    }
                    for m in messages
                ]
                previews.append({"key": key, "status": "ok" if items else "empty", "items": items})
            return previews

        return await self._store.run(work)

    async def resolve(
        self,
        *,
        key: str | None = None,
        session_id: str | None = None,
        label: str | None = None,
        agent_id: str | None = None,
        spawned_by: str | None = None,
        include_global: bool = False,
    ) -> str:
        """The canonical key of an existing session found by key, sessionId or label."""

        def work(db: sqlite3.Connection) -> str:
            if key is not None:
                row = _entry_row(db, key)
                if row is None:
                    raise not_found(f"No session found: {key}", details={"key": key})
                return row["key"]
            where, args = [], []
            if session_id is not None:
                where.append("session_id = ?")
                args.append(session_id)
                what = f"sessionId {session_id}"
            else:
                where.append("label = ? COLLATE NOCASE")
                args.append(label)
                what = f"label {label}"
            if agent_id is not None:
                where.append("agent_id = ?")
                args.append(agent_id)
            if spawned_by is not None:
                where.append("spawned_by = ?")
                args.append(spawned_by)
            if not include_global:
                where.append("key != ?")
                args.append(GLOBAL_KEY)
            rows = db.execute(
                "SELECT key FROM session_entries WHERE " + " AND ".join(where) + " LIMIT 2",
                args,
            ).fetchall()
            if not rows:
                raise not_found(f"No session found: {what}")
            if len(rows) > 1:
                raise conflict(f"Multiple sessions found for {what}")
            return rows[0]["key"]

        return await self._store.run(work)

    async def patch(self, key: str, changes: Mapping[str, Any]) -> tuple[dict[str, Any], list]:
        """Apply ``changes`` (wire names; ``None`` clears) to an existing session.

        :returns: the new entry and the names of the fields that changed.
        :raises GatewayError: 404 unknown session, 409 label taken, 400 set-once field.
        """
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> tuple[dict[str, Any], list[str]]:
            row = _entry_row(db, key)
            if row is None:
                raise not_found(f"No session found: {key}", details={"key": key})
            settings = json.loads(row["settings"])
            columns: dict[str, Any] = {}
            changed: list[str] = []

            if "label" in changes and changes["label"] != row["label"]:
                new_label = changes["label"]
                if new_label is not None:
                    holder = db.execute(
                        "SELECT key FROM session_entries"
                        " WHERE label = ? COLLATE NOCASE AND key != ?",
                        (new_label, key),
                    ).fetchone()
                    if holder is not None:
                        raise conflict(
                            f"label {new_label!r} is already used by session {holder['key']}",
                            details={"field": "label", "key": holder["key"]},
                        )
                columns["label"] = new_label
                changed.append("label")
            for name, column in (("spawnedBy", "spawned_by"), ("spawnDepth", "spawn_depth")):
                if name in changes and changes[name] != row[column]:
                    if row[column] is not None:
                        raise invalid_request(
                            f"{name} is already set for {key} and cannot be changed",
                            field=name,
                        )
                    columns[column] = changes[name]
                    changed.append(name)
            for name in SETTING_FIELDS:
                if name not in changes or settings.get(name) == changes[name]:
                    continue
                if changes[name] is None:
                    settings.pop(name, None)
                else:
                    settings[name] = changes[name]
                changed.append(name)

            if changed:
                columns["settings"] = json.dumps(settings, sort_keys=True)
                columns["updated_at"] = max(row["updated_at"], now)
                assignments = ", ".join(f"{column} = ?" for column in columns)
                db.execute(
                    f"UPDATE session_entries SET {assignments} WHERE key = ?",
                    (*columns.values(), key),
                )
            return _entry(_entry_row(db, key)), changed

        return await self._store.run(work)

    async def reset(
        self, key: str, *, reason: str = "reset"
    ) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
        """Give the session a new ``sessionId``, zero its counters and archive its transcript.

        :returns: the new entry, the previous session id, and the archive made (``None`` when
            the transcript was empty).
        """
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
            row = _entry_row(db, key)
            if row is None:
                raise not_found(f"No session found: {key}", details={"key": key})
            archive = _archive_live(db, row, reason, now)
            db.execute(
                "UPDATE session_entries SET session_id = ?, updated_at = MAX(updated_at, ?),"
                " input_tokens = 0, output_tokens = 0, message_count = 0 WHERE key = ?",
                (_new_id(), now, key),
            )
            return _entry(_entry_row(db, key)), row["session_id"], archive

        return await self._store.run(work)

    async def delete(self, key: str, *, archive_transcript: bool = True) -> dict[str, Any] | None:
        """Remove the session entry; archive its transcript unless told not to.

        :returns: the archive made, or ``None`` (empty transcript, or not archived).
        """
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = _entry_row(db, key)
            if row is None:
                raise not_found(f"No session found: {key}", details={"key": key})
            archive = _archive_live(db, row, "deleted", now) if archive_transcript else None
            db.execute("DELETE FROM session_entries WHERE key = ?", (key,))
            return archive

        return await self._store.run(work)

    async def compact(self, key: str, *, max_lines: int) -> dict[str, Any]:
        """Keep the last ``max_lines`` messages of the current transcript, archive the rest.

        :returns: ``{compacted, kept, archived, firstKeptId?, archiveId?, reason?, entry}``.
        """
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> dict[str, Any]:
            row = _entry_row(db, key)
            if row is None:
                raise not_found(f"No session found: {key}", details={"key": key})
            session_id = row["session_id"]
            live = db.execute(
                "SELECT COUNT(*) FROM session_messages WHERE session_id = ? AND archive_id IS NULL",
                (session_id,),
            ).fetchone()[0]
            if live == 0:
                return {
                    "compacted": False,
                    "reason": "no transcript",
                    "kept": 0,
                    "archived": 0,
                    "entry": _entry(row),
                }
            first_kept = db.execute(
                "SELECT seq, message_id FROM session_messages"
                " WHERE session_id = ? AND archive_id IS NULL"
                " ORDER BY seq DESC LIMIT 1 OFFSET ?",
                (session_id, min(max_lines, live) - 1),
            ).fetchone()
            result: dict[str, Any] = {"firstKeptId": first_kept["message_id"]}
            if live <= max_lines:
                return {
                    **result,
                    "compacted": False,
                    "reason": "within limit",
                    "kept": live,
                    "archived": 0,
                    "entry": _entry(row),
                }
            archive_id = _new_id()
            moved = live - max_lines
            _insert_archive(db, archive_id, row, "compacted", now, moved)
            db.execute(
                "UPDATE session_messages SET archive_id = ?"
                " WHERE session_id = ? AND archive_id IS NULL AND seq < ?",
                (archive_id, session_id, first_kept["seq"]),
            )
            db.execute(
                "UPDATE session_entries SET message_count = ? WHERE key = ?", (max_lines, key)
            )
            return {
                **result,
                "compacted": True,
                "kept": max_lines,
                "archived": moved,
                "archiveId": archive_id,
                "entry": _entry(_entry_row(db, key)),
            }

        return await self._store.run(work)

    async def usage_summary(
        self, *, start_ms: int, end_ms: int, key: str | None, limit: int
    ) -> dict[str, Any]:
        def work(db: sqlite3.Connection) -> dict[str, Any]:
            if key is not None:
                _require_known(db, key)
            return usage_sql.summarize(db, start_ms=start_ms, end_ms=end_ms, key=key, limit=limit)

        return await self._store.run(work)

    async def usage_timeseries(
        self, key: str, *, start_ms: int | None, end_ms: int | None, max_points: int
    ) -> dict[str, Any]:
        def work(db: sqlite3.Connection) -> dict[str, Any]:
            row = _require_known(db, key)
            series = usage_sql.timeseries(
                db, key=key, start_ms=start_ms, end_ms=end_ms, max_points=max_points
            )
            if row is not None:
                series["sessionId"] = row["session_id"]
            return series

        return await self._store.run(work)

    async def usage_logs(self, key: str, *, limit: int) -> list[dict[str, Any]]:
        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            _require_known(db, key)
            return usage_sql.logs(db, key=key, limit=limit)

        return await self._store.run(work)


# -- SQL helpers (run in the store's worker thread) ------------------------------------------


def _entry_row(db: sqlite3.Connection, key: str) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM session_entries WHERE key = ?", (key,)).fetchone()


def _ensure_row(db: sqlite3.Connection, key: str, now: int) -> sqlite3.Row:
    row = _entry_row(db, key)
    if row is not None:
        return row
    db.execute(
        "INSERT INTO session_entries (key, session_id, agent_id, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (key, _new_id(), agent_id_of(key), now, now),
    )
    row = _entry_row(db, key)
    assert row is not None
    return row


def _require_known(db: sqlite3.Connection, key: str) -> sqlite3.Row | None:
    """The entry of ``key``; 404 unless it exists or once had usage recorded."""
    row = _entry_row(db, key)
    if row is None and not usage_sql.has_rows(db, key):
        raise not_found(f"No session found: {key}", details={"key": key})
    return row


def _insert_archive(
    db: sqlite3.Connection, archive_id: str, row: sqlite3.Row, reason: str, now: int, count: int
) -> None:
    db.execute(
        "INSERT INTO session_archives (archive_id, session_key, session_id, reason,"
        " archived_at, message_count) VALUES (?, ?, ?, ?, ?, ?)",
        (archive_id, row["key"], row["session_id"], reason, now, count),
    )


def _archive_live(
    db: sqlite3.Connection, row: sqlite3.Row, reason: str, now: int
) -> dict[str, Any] | None:
    """Move the whole current transcript of ``row`` into a new archive (None if empty)."""
    live = db.execute(
        "SELECT COUNT(*) FROM session_messages WHERE session_id = ? AND archive_id IS NULL",
        (row["session_id"],),
    ).fetchone()[0]
    if live == 0:
        return None
    archive_id = _new_id()
    _insert_archive(db, archive_id, row, reason, now, live)
    db.execute(
        "UPDATE session_messages SET archive_id = ? WHERE session_id = ? AND archive_id IS NULL",
        (archive_id, row["session_id"]),
    )
    return {
        "archiveId": archive_id,
        "sessionKey": row["key"],
        "sessionId": row["session_id"],
        "reason": reason,
        "archivedAt": now,
        "messageCount": live,
    }


def _live_messages(db: sqlite3.Connection, session_id: str, limit: int) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT * FROM session_messages WHERE session_id = ? AND archive_id IS NULL"
        " ORDER BY seq DESC LIMIT ?",
        (session_id, limit),
    ).fetchall()
    return [_message(row) for row in reversed(rows)]


def _first_user_text(db: sqlite3.Connection, session_id: str) -> str | None:
    row = db.execute(
        "SELECT text FROM session_messages WHERE session_id = ? AND archive_id IS NULL"
        " AND role = 'user' ORDER BY seq LIMIT 1",
        (session_id,),
    ).fetchone()
    return row[0] if row else None


def _last_text(db: sqlite3.Connection, session_id: str) -> str | None:
    row = db.execute(
        "SELECT text FROM session_messages WHERE session_id = ? AND archive_id IS NULL"
        " AND role IN ('user', 'assistant') ORDER BY seq DESC LIMIT 1",
        (session_id,),
    ).fetchone()
    return row[0] if row else None


# -- conversions -----------------------------------------------------------------------------


def _entry(row: sqlite3.Row) -> dict[str, Any]:
    key = row["key"]
    entry: dict[str, Any] = {
        "key": key,
        "kind": session_kind(key),
        "sessionId": row["session_id"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }
    if row["agent_id"]:
        entry["agentId"] = row["agent_id"]
    if row["label"] is not None:
        entry["label"] = row["label"]
    entry.update(json.loads(row["settings"]))
    if row["spawned_by"] is not None:
        entry["spawnedBy"] = row["spawned_by"]
    if row["spawn_depth"] is not None:
        entry["spawnDepth"] = row["spawn_depth"]
    if row["last_provider"] is not None:
        entry["lastModelProvider"] = row["last_provider"]
    if row["last_model"] is not None:
        entry["lastModel"] = row["last_model"]
    entry["inputTokens"] = row["input_tokens"]
    entry["outputTokens"] = row["output_tokens"]
    entry["totalTokens"] = row["input_tokens"] + row["output_tokens"]
    entry["messageCount"] = row["message_count"]
    return entry


def _message(row: sqlite3.Row) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": row["message_id"],
        "role": row["role"],
        "text": row["text"],
        "ts": row["ts"],
    }
    for name, column in _MESSAGE_TEXT_FIELDS.items():
        if row[column] is not None:
            message[name] = row[column]
    if row["input_tokens"] is not None or row["output_tokens"] is not None:
        message["usage"] = {
            "inputTokens": row["input_tokens"] or 0,
            "outputTokens": row["output_tokens"] or 0,
        }
    return message


def _archive(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "archiveId": row["archive_id"],
        "sessionKey": row["session_key"],
        "sessionId": row["session_id"],
        "reason": row["reason"],
        "archivedAt": row["archived_at"],
        "messageCount": row["message_count"],
    }


def _validated_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """The documented fields of ``message``, checked; 400 naming ``message.<field>``."""
    if not isinstance(message, Mapping):
        raise invalid_request("invalid message: expected an object", field="message")
    role = message.get("role")
    if role not in ROLES:
        raise invalid_request(
            f"invalid message.role: expected one of {', '.join(ROLES)}, got {role!r}",
            field="message.role",
        )
    text = message.get("text")
    if not isinstance(text, str):
        raise invalid_request("invalid message.text: expected a string", field="message.text")
    if "\x00" in text:
        raise invalid_request("invalid message.text: NUL byte in text", field="message.text")
    fields: dict[str, Any] = {"role": role, "text": text}
    for name in _MESSAGE_TEXT_FIELDS:
        value = message.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise invalid_request(
                f"invalid message.{name}: expected a string", field=f"message.{name}"
            )
        fields[name] = value
    usage = message.get("usage")
    if usage is not None:
        if not isinstance(usage, Mapping):
            raise invalid_request(
                "invalid message.usage: expected an object", field="message.usage"
            )
        checked = {}
        for name in ("inputTokens", "outputTokens"):
            value = usage.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise invalid_request(
                    f"invalid message.usage.{name}: expected an integer >= 0",
                    field=f"message.usage.{name}",
                )
            checked[name] = value
        fields["usage"] = checked
    return fields


def _clip(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _encode_cursor(updated_at: int, key: str) -> str:
    raw = json.dumps([updated_at, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        updated_at, key = json.loads(raw)
        if isinstance(updated_at, bool) or not isinstance(updated_at, int):
            raise ValueError("bad timestamp")
        if not isinstance(key, str):
            raise ValueError("bad key")
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise GatewayError(
            400,
            "invalid sessions.list params: cursor is not one this gateway handed out",
            details={"field": "cursor"},
        ) from exc
    return updated_at, key
