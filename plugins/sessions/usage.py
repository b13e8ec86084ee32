"""Usage queries over ``session_usage``: rows, per-session and per-model sums, time series.

Plain functions of a ``sqlite3.Connection``, called inside ``Store.run`` by ``SessionStore``.
The sums are done by SQLite (``GROUP BY`` over the ``ts`` indexes), so a result's size is
bounded by its groups, never by the number of runs recorded.
"""

from __future__ import annotations

import sqlite3
from typing import Any

__all__ = ["MAX_GROUPS", "has_rows", "logs", "rows", "summarize", "timeseries"]

#: Most rows any one aggregate list (byModel, byProvider, byAgent) holds.
MAX_GROUPS = 200


def _range(start_ms: int | None, end_ms: int | None, key: str | None) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if start_ms is not None:
        where.append("ts >= ?")
        args.append(start_ms)
    if end_ms is not None:
        where.append("ts < ?")
        args.append(end_ms)
    if key is not None:
        where.append("session_key = ?")
        args.append(key)
    return (" WHERE " + " AND ".join(where)) if where else "", args


def _row(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "sessionKey": row["session_key"],
        "runId": row["run_id"],
        "provider": row["provider"],
        "model": row["model"],
        "inputTokens": row["input_tokens"],
        "outputTokens": row["output_tokens"],
        "ts": row["ts"],
    }


def _sums(row: sqlite3.Row) -> dict[str, int]:
    input_tokens, output_tokens = row["input_tokens"] or 0, row["output_tokens"] or 0
    return {
        "runs": row["runs"],
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "totalTokens": input_tokens + output_tokens,
    }


_SUMS = "COUNT(*) AS runs, SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens"


def has_rows(db: sqlite3.Connection, key: str) -> bool:
    return (
        db.execute("SELECT 1 FROM session_usage WHERE session_key = ? LIMIT 1", (key,)).fetchone()
        is not None
    )


def rows(
    db: sqlite3.Connection, *, start_ms: int, end_ms: int, key: str | None, limit: int
) -> list[dict[str, Any]]:
    where, args = _range(start_ms, end_ms, key)
    found = db.execute(
        f"SELECT * FROM session_usage{where} ORDER BY ts, id LIMIT ?", (*args, limit)
    ).fetchall()
    return [_row(row) for row in found]


def summarize(
    db: sqlite3.Connection, *, start_ms: int, end_ms: int, key: str | None, limit: int
) -> dict[str, Any]:
    """Totals, the top ``limit`` sessions, and sums by model, provider, agent and UTC day."""
    where, args = _range(start_ms, end_ms, key)
    totals = db.execute(
        f"SELECT {_SUMS}, COUNT(DISTINCT session_key) AS sessions FROM session_usage{where}",
        args,
    ).fetchone()

    sessions = []
    for row in db.execute(
        "SELECT s.*, e.session_id AS current_session_id, e.label AS label FROM ("
        f" SELECT session_key, {_SUMS}, MIN(ts) AS first_ts, MAX(ts) AS last_ts"
        f" FROM session_usage{where} GROUP BY session_key"
        " ORDER BY SUM(input_tokens + output_tokens) DESC, session_key LIMIT ?"
        ") AS s LEFT JOIN session_entries AS e ON e.key = s.session_key"
        " ORDER BY s.input_tokens + s.output_tokens DESC, s.session_key",
        (*args, limit),
    ):
        item: dict[str, Any] = {"key": row["session_key"], **_sums(row)}
        item["firstTs"], item["lastTs"] = row["first_ts"], row["last_ts"]
        if row["current_session_id"] is not None:
            item["sessionId"] = row["current_session_id"]
        if row["label"] is not None:
            item["label"] = row["label"]
        sessions.append(item)

    def grouped(columns: str) -> list[sqlite3.Row]:
        return db.execute(
            f"SELECT {columns}, {_SUMS} FROM session_usage{where} GROUP BY {columns}"
            f" ORDER BY SUM(input_tokens + output_tokens) DESC, {columns} LIMIT ?",
            (*args, MAX_GROUPS),
        ).fetchall()

    by_model = [
        {"provider": r["provider"], "model": r["model"], **_sums(r)}
        for r in grouped("provider, model")
    ]
    by_provider = [{"provider": r["provider"], **_sums(r)} for r in grouped("provider")]
    by_agent = [{"agentId": r["agent_id"] or None, **_sums(r)} for r in grouped("agent_id")]
    daily = [
        {"date": r["day"], **_sums(r)}
        for r in db.execute(
            f"SELECT strftime('%Y-%m-%d', ts / 1000, 'unixepoch') AS day, {_SUMS}"
            f" FROM session_usage{where} GROUP BY day ORDER BY day",
            args,
        )
    ]
    return {
        "sessions": sessions,
        "sessionCount": totals["sessions"],
        "totals": _sums(totals),
        "aggregates": {
            "byModel": by_model,
            "byProvider": by_provider,
            "byAgent": by_agent,
            "daily": daily,
        },
    }


def timeseries(
    db: sqlite3.Connection,
    *,
    key: str,
    start_ms: int | None,
    end_ms: int | None,
    max_points: int,
) -> dict[str, Any]:
    """At most ``max_points`` points; past that, runs are summed into equal time buckets."""
    where, args = _range(start_ms, end_ms, key)
    span = db.execute(
        f"SELECT MIN(ts) AS first, MAX(ts) AS last, COUNT(*) AS n FROM session_usage{where}",
        args,
    ).fetchone()
    result: dict[str, Any] = {"key": key, "points": [], "bucketMs": None}
    if span["n"] == 0:
        return result

    if span["n"] <= max_points:
        found = db.execute(
            "SELECT ts AS point_ts, 1 AS runs, input_tokens, output_tokens"
            f" FROM session_usage{where} ORDER BY ts, id",
            args,
        ).fetchall()
    else:
        # Ceiling division, so that (last - first) // width < max_points.
        width = -(-(span["last"] - span["first"] + 1) // max_points)
        result["bucketMs"] = width
        found = db.execute(
            f"SELECT ? + ((ts - ?) / ?) * ? AS point_ts, {_SUMS} FROM session_usage{where}"
            " GROUP BY (ts - ?) / ? ORDER BY 1",
            (span["first"], span["first"], width, width, *args, span["first"], width),
        ).fetchall()

    cumulative = 0
    for row in found:
        point = {"ts": row["point_ts"], **_sums(row)}
        cumulative += point["totalTokens"]
        point["cumulativeTokens"] = cumulative
        result["points"].append(point)
    return result


def logs(db: sqlite3.Connection, *, key: str, limit: int) -> list[dict[str, Any]]:
    """The most recent ``limit`` usage rows of ``key``, newest first."""
    found = db.execute(
        "SELECT * FROM session_usage WHERE session_key = ? ORDER BY ts DESC, id DESC LIMIT ?",
        (key, limit),
    ).fetchall()
    entries = []
    for row in found:
        entry = _row(row)
        entry["totalTokens"] = entry["inputTokens"] + entry["outputTokens"]
        if row["session_id"] is not None:
            entry["sessionId"] = row["session_id"]
        entries.append(entry)
    return entries
