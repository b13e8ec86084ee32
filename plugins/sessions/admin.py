"""What only the ``sessions.*`` methods do: list, preview, resolve, patch, reset, delete,
compact and the usage reports.

``SessionAdmin`` is kept apart from ``SessionStore`` (the service other plugins get) so
that the service stays the small contract they rely on. Each method is one transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from kernel import Store, conflict, invalid_request, not_found

from . import usage as usage_sql
from .keys import GLOBAL_KEY
from .rows import (
    LAST_MESSAGE_CHARS,
    ROLES,
    SETTING_FIELDS,
    TITLE_CHARS,
    archive_live,
    clip,
    decode_cursor,
    encode_cursor,
    entry_from_row,
    entry_row,
    escape_like,
    first_user_text,
    insert_archive,
    last_text,
    live_messages,
    new_id,
    require_known,
)

__all__ = ["SessionAdmin"]


class SessionAdmin:
    """The session operations behind the wire methods.

    :param store: the kernel's store.
    :param clock: anything with ``now_ms()`` (the kernel's ``services.clock``).
    """

    def __init__(self, store: Store, clock: Any) -> None:
        self._store = store
        self._clock = clock

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
        after = decode_cursor(cursor) if cursor else None
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
            pattern = "%" + escape_like(search) + "%"
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
                entry = entry_from_row(row)
                if include_derived_titles:
                    title = first_user_text(db, row["session_id"])
                    if title:
                        entry["derivedTitle"] = clip(title, TITLE_CHARS)
                if include_last_message:
                    last = last_text(db, row["session_id"])
                    if last:
                        entry["lastMessagePreview"] = clip(last, LAST_MESSAGE_CHARS)
                entries.append(entry)
            next_cursor = encode_cursor(rows[-1]["updated_at"], rows[-1]["key"]) if more else None
            return entries, next_cursor

        return await self._store.run(work)

    async def preview(
        self, keys: Sequence[str], *, limit: int, max_chars: int
    ) -> list[dict[str, Any]]:
        """``{key, status: ok|empty|missing, items: [{role, text}]}`` per canonical key."""

        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            previews = []
            for key in keys:
                row = entry_row(db, key)
                if row is None:
                    previews.append({"key": key, "status": "missing", "items": []})
                    continue
                messages = live_messages(db, row["session_id"], limit)
                items = [
                    {
                        "role": m["role"] if m["role"] in ROLES else "other",
                        "text": clip(m["text"], max_chars),
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
                row = entry_row(db, key)
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
            row = entry_row(db, key)
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
            return entry_from_row(entry_row(db, key)), changed

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
            row = entry_row(db, key)
            if row is None:
                raise not_found(f"No session found: {key}", details={"key": key})
            archive = archive_live(db, row, reason, now)
            db.execute(
                "UPDATE session_entries SET session_id = ?, updated_at = MAX(updated_at, ?),"
                " input_tokens = 0, output_tokens = 0, message_count = 0 WHERE key = ?",
                (new_id(), now, key),
            )
            return entry_from_row(entry_row(db, key)), row["session_id"], archive

        return await self._store.run(work)

    async def delete(self, key: str, *, archive_transcript: bool = True) -> dict[str, Any] | None:
        """Remove the session entry; archive its transcript unless told not to.

        :returns: the archive made, or ``None`` (empty transcript, or not archived).
        """
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = entry_row(db, key)
            if row is None:
                raise not_found(f"No session found: {key}", details={"key": key})
            archive = archive_live(db, row, "deleted", now) if archive_transcript else None
            db.execute("DELETE FROM session_entries WHERE key = ?", (key,))
            return archive

        return await self._store.run(work)

    async def compact(self, key: str, *, max_lines: int) -> dict[str, Any]:
        """Keep the last ``max_lines`` messages of the current transcript, archive the rest.

        :returns: ``{compacted, kept, archived, firstKeptId?, archiveId?, reason?, entry}``.
        """
        now = self._clock.now_ms()

        def work(db: sqlite3.Connection) -> dict[str, Any]:
            row = entry_row(db, key)
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
                    "entry": entry_from_row(row),
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
                    "kept": live,
                    "archived": 0,
                    "entry": entry_from_row(row),
                }
            archive_id = new_id()
            moved = live - max_lines
            insert_archive(db, archive_id, row, "compacted", now, moved)
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
                "entry": entry_from_row(entry_row(db, key)),
            }

        return await self._store.run(work)

    async def usage_summary(
        self, *, start_ms: int, end_ms: int, key: str | None, limit: int
    ) -> dict[str, Any]:
        def work(db: sqlite3.Connection) -> dict[str, Any]:
            if key is not None:
                require_known(db, key)
            return usage_sql.summarize(db, start_ms=start_ms, end_ms=end_ms, key=key, limit=limit)

        return await self._store.run(work)

    async def usage_timeseries(
        self, key: str, *, start_ms: int | None, end_ms: int | None, max_points: int
    ) -> dict[str, Any]:
        def work(db: sqlite3.Connection) -> dict[str, Any]:
            row = require_known(db, key)
            series = usage_sql.timeseries(
                db, key=key, start_ms=start_ms, end_ms=end_ms, max_points=max_points
            )
            if row is not None:
                series["sessionId"] = row["session_id"]
            return series

        return await self._store.run(work)

    async def usage_logs(self, key: str, *, limit: int) -> list[dict[str, Any]]:
        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            require_known(db, key)
            return usage_sql.logs(db, key=key, limit=limit)

        return await self._store.run(work)
