"""The sessions plugin's tables and the row-level SQL both its halves share.

``MIGRATIONS`` owns four tables: ``session_entries`` (one row per session key: its current
``session_id``, settings, counters), ``session_messages`` (every transcript message ever
written; ``archive_id`` is NULL while the message belongs to the current transcript),
``session_archives`` (what ``reset``, ``delete`` and ``compact`` moved out of the way, and
why) and ``session_usage`` (one row per run). Every function taking ``db`` runs inside
``kernel.Store.run``, in the store's worker thread and transaction.
"""

# TODO(retention): archived messages are kept forever; add a configurable retention sweep
# (age or count per session) once operators ask for one.

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import uuid
from collections.abc import Mapping
from typing import Any

from kernel import GatewayError, invalid_request, not_found

from . import usage as usage_sql
from .keys import agent_id_of, session_kind

__all__ = [
    "HISTORY_MAX",
    "MESSAGE_TEXT_FIELDS",
    "MIGRATIONS",
    "ROLES",
    "SCHEMA_OWNER",
    "SETTING_FIELDS",
    "USAGE_ROWS_MAX",
    "archive_from_row",
    "archive_live",
    "clip",
    "decode_cursor",
    "encode_cursor",
    "ensure_row",
    "entry_from_row",
    "entry_row",
    "escape_like",
    "first_user_text",
    "insert_archive",
    "last_text",
    "live_messages",
    "message_from_row",
    "new_id",
    "require_known",
    "validated_message",
]

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
MESSAGE_TEXT_FIELDS = {
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
TITLE_CHARS = 60
LAST_MESSAGE_CHARS = 120


def new_id() -> str:
    return str(uuid.uuid4())


# -- SQL helpers (run in the store's worker thread) ------------------------------------------


def entry_row(db: sqlite3.Connection, key: str) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM session_entries WHERE key = ?", (key,)).fetchone()


def ensure_row(db: sqlite3.Connection, key: str, now: int) -> sqlite3.Row:
    row = entry_row(db, key)
    if row is not None:
        return row
    db.execute(
        "INSERT INTO session_entries (key, session_id, agent_id, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (key, new_id(), agent_id_of(key), now, now),
    )
    row = entry_row(db, key)
    assert row is not None
    return row


def require_known(db: sqlite3.Connection, key: str) -> sqlite3.Row | None:
    """The entry of ``key``; 404 unless it exists or once had usage recorded."""
    row = entry_row(db, key)
    if row is None and not usage_sql.has_rows(db, key):
        raise not_found(f"No session found: {key}", details={"key": key})
    return row


def insert_archive(
    db: sqlite3.Connection, archive_id: str, row: sqlite3.Row, reason: str, now: int, count: int
) -> None:
    db.execute(
        "INSERT INTO session_archives (archive_id, session_key, session_id, reason,"
        " archived_at, message_count) VALUES (?, ?, ?, ?, ?, ?)",
        (archive_id, row["key"], row["session_id"], reason, now, count),
    )


def archive_live(
    db: sqlite3.Connection, row: sqlite3.Row, reason: str, now: int
) -> dict[str, Any] | None:
    """Move the whole current transcript of ``row`` into a new archive (None if empty)."""
    live = db.execute(
        "SELECT COUNT(*) FROM session_messages WHERE session_id = ? AND archive_id IS NULL",
        (row["session_id"],),
    ).fetchone()[0]
    if live == 0:
        return None
    archive_id = new_id()
    insert_archive(db, archive_id, row, reason, now, live)
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


def live_messages(db: sqlite3.Connection, session_id: str, limit: int) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT * FROM session_messages WHERE session_id = ? AND archive_id IS NULL"
        " ORDER BY seq DESC LIMIT ?",
        (session_id, limit),
    ).fetchall()
    return [message_from_row(row) for row in reversed(rows)]


def first_user_text(db: sqlite3.Connection, session_id: str) -> str | None:
    row = db.execute(
        "SELECT text FROM session_messages WHERE session_id = ? AND archive_id IS NULL"
        " AND role = 'user' ORDER BY seq LIMIT 1",
        (session_id,),
    ).fetchone()
    return row[0] if row else None


def last_text(db: sqlite3.Connection, session_id: str) -> str | None:
    row = db.execute(
        "SELECT text FROM session_messages WHERE session_id = ? AND archive_id IS NULL"
        " AND role IN ('user', 'assistant') ORDER BY seq DESC LIMIT 1",
        (session_id,),
    ).fetchone()
    return row[0] if row else None


# -- conversions -----------------------------------------------------------------------------


def entry_from_row(row: sqlite3.Row) -> dict[str, Any]:
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


def message_from_row(row: sqlite3.Row) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": row["message_id"],
        "role": row["role"],
        "text": row["text"],
        "ts": row["ts"],
    }
    for name, column in MESSAGE_TEXT_FIELDS.items():
        if row[column] is not None:
            message[name] = row[column]
    if row["input_tokens"] is not None or row["output_tokens"] is not None:
        message["usage"] = {
            "inputTokens": row["input_tokens"] or 0,
            "outputTokens": row["output_tokens"] or 0,
        }
    return message


def archive_from_row(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "archiveId": row["archive_id"],
        "sessionKey": row["session_key"],
        "sessionId": row["session_id"],
        "reason": row["reason"],
        "archivedAt": row["archived_at"],
        "messageCount": row["message_count"],
    }


def validated_message(message: Mapping[str, Any]) -> dict[str, Any]:
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
    for name in MESSAGE_TEXT_FIELDS:
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


def clip(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def encode_cursor(updated_at: int, key: str) -> str:
    raw = json.dumps([updated_at, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
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
