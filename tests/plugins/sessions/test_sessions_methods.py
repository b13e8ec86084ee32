"""The ten ``sessions.*`` methods over real sockets: what each returns and what it changes.

Data is put in through the ``sessions`` service (as chat would), then read and changed over
the wire by an admin client while a read-only client watches ``sessions.changed``.
"""

from __future__ import annotations

import datetime
import sqlite3

import pytest
import trio
import trio.testing
from sessions_testkit import Running, call_error, next_event, running_gateway

from kernel import GatewayClient

MAIN = "agent:main:main"


async def seed(gw: Running, key: str, *texts: str) -> list[dict]:
    stored = []
    for index, text in enumerate(texts):
        role = "user" if index % 2 == 0 else "assistant"
        stored.append(await gw.sessions.append(key, {"role": role, "text": text}))
    return stored


async def set_updated_at(gw: Running, key: str, updated_at: int) -> None:
    def work(db: sqlite3.Connection) -> None:
        db.execute("UPDATE session_entries SET updated_at = ? WHERE key = ?", (updated_at, key))

    await gw.services.store.run(work)


# -- sessions.list ---------------------------------------------------------------------------


async def test_list_orders_filters_and_describes(gw: Running, reader: GatewayClient) -> None:
    await seed(gw, "agent:main:old", "first question about trains", "an answer")
    await seed(gw, "agent:main:new", "hello")
    await seed(gw, "agent:ops:discord:group:42", "group talk")
    await seed(gw, "global", "global note")
    await seed(gw, "agent:main:cron:nightly:run:7", "cron output")
    now = gw.services.clock.now_ms()
    await set_updated_at(gw, "agent:main:old", now - 3 * 3_600_000)

    listing = await reader.call("sessions.list")
    assert listing["store"] == "sqlite"
    assert listing["defaults"] == {"modelProvider": None, "model": None, "contextTokens": None}
    keys = [row["key"] for row in listing["sessions"]]
    # Most recent first; global and cron runs left out by default.
    assert keys[-1] == "agent:main:old"
    assert set(keys) == {"agent:main:old", "agent:main:new", "agent:ops:discord:group:42"}
    assert listing["count"] == 3
    assert "nextCursor" not in listing
    kinds = {row["key"]: row["kind"] for row in listing["sessions"]}
    assert kinds["agent:ops:discord:group:42"] == "group"
    assert kinds["agent:main:new"] == "direct"

    with_global = await reader.call("sessions.list", {"includeGlobal": True})
    assert "global" in [row["key"] for row in with_global["sessions"]]
    assert [r["kind"] for r in with_global["sessions"] if r["key"] == "global"] == ["global"]

    by_agent = await reader.call("sessions.list", {"agentId": "OPS"})
    assert [row["key"] for row in by_agent["sessions"]] == ["agent:ops:discord:group:42"]

    active = await reader.call("sessions.list", {"activeMinutes": 60})
    assert "agent:main:old" not in [row["key"] for row in active["sessions"]]

    found = await reader.call("sessions.list", {"search": "DISCORD"})
    assert [row["key"] for row in found["sessions"]] == ["agent:ops:discord:group:42"]
    # LIKE wildcards in the search are literal.
    assert (await reader.call("sessions.list", {"search": "%"}))["sessions"] == []

    detailed = await reader.call(
        "sessions.list", {"includeLastMessage": True, "includeDerivedTitles": True}
    )
    old = next(row for row in detailed["sessions"] if row["key"] == "agent:main:old")
    assert old["derivedTitle"] == "first question about trains"
    assert old["lastMessagePreview"] == "an answer"
    assert old["messageCount"] == 2
    plain = next(row for row in listing["sessions"] if row["key"] == "agent:main:old")
    assert "derivedTitle" not in plain and "lastMessagePreview" not in plain


async def test_list_label_filter(gw: Running, admin: GatewayClient) -> None:
    await seed(gw, "agent:main:a", "x")
    await seed(gw, "agent:main:b", "y")
    await admin.call("sessions.patch", {"key": "agent:main:b", "label": "Work"})
    found = await admin.call("sessions.list", {"label": "work"})
    assert [row["key"] for row in found["sessions"]] == ["agent:main:b"]
    assert found["sessions"][0]["label"] == "Work"


async def test_list_pages_with_a_cursor(gw: Running, reader: GatewayClient) -> None:
    keys = [f"agent:main:s{i}" for i in range(7)]
    for key in keys:
        await gw.sessions.ensure(key)
    # Equal timestamps for some, so that the cursor's tie-break on the key matters.
    for index, key in enumerate(keys):
        await set_updated_at(gw, key, 1_000_000 + index // 3)

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = await reader.call("sessions.list", params)
        pages += 1
        seen += [row["key"] for row in page["sessions"]]
        cursor = page.get("nextCursor")
        if cursor is None:
            break
    assert pages == 4
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen))
    stamps = [(-(1_000_000 + keys.index(k) // 3), k) for k in seen]
    assert stamps == sorted(stamps)


# -- sessions.preview ------------------------------------------------------------------------


async def test_preview_statuses_limits_and_clipping(gw: Running, reader: GatewayClient) -> None:
    await seed(gw, "agent:main:full", "one", "two", "three " + "x" * 100)
    await gw.sessions.ensure("agent:main:empty")
    await gw.sessions.append("agent:main:tools", {"role": "tool", "text": "ran ls"})

    result = await reader.call(
        "sessions.preview",
        {
            "keys": [
                "AGENT:main:full",
                "agent:main:full",
                "agent:main:empty",
                "agent:main:nope",
                "agent:main:tools",
            ],
            "limit": 2,
            "maxChars": 20,
        },
    )
    assert result["ts"] > 0
    previews = {p["key"]: p for p in result["previews"]}
    assert len(result["previews"]) == 4  # the repeated key is answered once
    full = previews["agent:main:full"]
    assert full["status"] == "ok"
    assert [item["role"] for item in full["items"]] == ["assistant", "user"]
    assert full["items"][0]["text"] == "two"
    assert len(full["items"][1]["text"]) == 20 and full["items"][1]["text"].endswith("…")
    assert previews["agent:main:empty"] == {
        "key": "agent:main:empty",
        "status": "empty",
        "items": [],
    }
    assert previews["agent:main:nope"]["status"] == "missing"
    assert previews["agent:main:tools"]["items"] == [{"role": "tool", "text": "ran ls"}]


# -- sessions.resolve ------------------------------------------------------------------------


async def test_resolve_by_key_session_id_and_label(gw: Running, admin: GatewayClient) -> None:
    entry = await gw.sessions.ensure("agent:main:chat")
    await admin.call("sessions.patch", {"key": "agent:main:chat", "label": "Daily"})
    assert await admin.call("sessions.resolve", {"key": "AGENT:MAIN:chat"}) == {
        "ok": True,
        "key": "agent:main:chat",
    }
    by_id = await admin.call("sessions.resolve", {"sessionId": entry["sessionId"]})
    assert by_id["key"] == "agent:main:chat"
    by_label = await admin.call("sessions.resolve", {"label": "daily", "agentId": "main"})
    assert by_label["key"] == "agent:main:chat"
    assert (
        await call_error(admin, "sessions.resolve", {"label": "daily", "agentId": "ops"})
    ).code == 404


async def test_resolve_leaves_global_out_unless_asked(gw: Running, admin: GatewayClient) -> None:
    await gw.sessions.ensure("global")
    await admin.call("sessions.patch", {"key": "global", "label": "Everyone"})
    assert (await call_error(admin, "sessions.resolve", {"label": "Everyone"})).code == 404
    found = await admin.call("sessions.resolve", {"label": "Everyone", "includeGlobal": True})
    assert found["key"] == "global"


# -- sessions.patch --------------------------------------------------------------------------


async def test_patch_sets_clears_and_announces(
    gw: Running, admin: GatewayClient, reader: GatewayClient
) -> None:
    await gw.sessions.ensure(MAIN)
    result = await admin.call(
        "sessions.patch",
        {
            "key": "main",
            "label": "  My   main ",
            "thinkingLevel": "high",
            "verboseLevel": "full",
            "reasoningLevel": "stream",
            "responseUsage": "tokens",
            "elevatedLevel": "ask",
            "execHost": "sandbox",
            "execSecurity": "allowlist",
            "execAsk": "on-miss",
            "execNode": "laptop",
            "model": "openai/gpt-4o",
            "sendPolicy": "deny",
            "groupActivation": "mention",
        },
    )
    assert result["ok"] is True and result["key"] == MAIN and result["store"] == "sqlite"
    entry = result["entry"]
    assert entry["label"] == "My main"
    assert entry["thinkingLevel"] == "high" and entry["execAsk"] == "on-miss"
    assert entry["model"] == "openai/gpt-4o"
    assert result["resolved"] == {"modelProvider": "openai", "model": "gpt-4o"}
    assert "label" in result["changed"] and "model" in result["changed"]

    event = await next_event(reader, "sessions.changed")
    assert event["payload"]["key"] == MAIN
    assert event["payload"]["action"] == "patched"
    assert event["payload"]["entry"]["thinkingLevel"] == "high"
    assert event["seq"] >= 1

    cleared = await admin.call(
        "sessions.patch", {"key": MAIN, "label": None, "thinkingLevel": None, "model": "gpt-4o"}
    )
    assert "label" not in cleared["entry"] and "thinkingLevel" not in cleared["entry"]
    assert cleared["entry"]["verboseLevel"] == "full"  # untouched fields stay
    assert cleared["resolved"] == {"model": "gpt-4o"}
    stored = await gw.sessions.get(MAIN)
    assert "label" not in stored and stored["execHost"] == "sandbox"

    unchanged = await admin.call("sessions.patch", {"key": MAIN, "verboseLevel": "full"})
    assert unchanged["changed"] == []


async def test_patch_label_is_unique(gw: Running, admin: GatewayClient) -> None:
    await gw.sessions.ensure("agent:main:a")
    await gw.sessions.ensure("agent:main:b")
    await admin.call("sessions.patch", {"key": "agent:main:a", "label": "Shared"})
    error = await call_error(admin, "sessions.patch", {"key": "agent:main:b", "label": "shared"})
    assert error.code == 409
    assert "agent:main:a" in error.message
    assert error.details["field"] == "label"
    # Setting a session's own label again is no conflict.
    await admin.call("sessions.patch", {"key": "agent:main:a", "label": "Shared"})
    # Once cleared, the label is free.
    await admin.call("sessions.patch", {"key": "agent:main:a", "label": None})
    await admin.call("sessions.patch", {"key": "agent:main:b", "label": "shared"})


async def test_patch_spawned_by_is_set_once_on_subagents(gw: Running, admin: GatewayClient) -> None:
    key = "agent:main:subagent:123"
    await gw.sessions.ensure(key)
    result = await admin.call(
        "sessions.patch", {"key": key, "spawnedBy": "AGENT:main:main", "spawnDepth": 1}
    )
    assert result["entry"]["spawnedBy"] == MAIN and result["entry"]["spawnDepth"] == 1
    error = await call_error(admin, "sessions.patch", {"key": key, "spawnedBy": "agent:main:x"})
    assert error.code == 400 and error.details == {"field": "spawnedBy"}
    listing = await admin.call("sessions.list", {"spawnedBy": MAIN})
    assert [row["key"] for row in listing["sessions"]] == [key]


# -- sessions.reset --------------------------------------------------------------------------


async def test_reset_archives_and_starts_afresh(
    gw: Running, admin: GatewayClient, reader: GatewayClient
) -> None:
    stored = await seed(gw, MAIN, "hello", "hi", "how are you")
    await gw.sessions.record_usage(
        MAIN,
        run_id="r1",
        provider="offline",
        model="echo",
        input_tokens=4,
        output_tokens=6,
        ts=gw.services.clock.now_ms(),
    )
    before = await gw.sessions.get(MAIN)

    result = await admin.call("sessions.reset", {"key": MAIN})
    assert result["ok"] is True and result["key"] == MAIN
    assert result["previousSessionId"] == before["sessionId"]
    assert result["entry"]["sessionId"] != before["sessionId"]
    assert result["entry"]["inputTokens"] == result["entry"]["outputTokens"] == 0
    assert result["entry"]["messageCount"] == 0
    archived = result["archived"]
    assert archived["sessionId"] == before["sessionId"]
    assert archived["messageCount"] == 3 and archived["reason"] == "reset"
    assert result["stoppedRuns"] == 0

    event = await next_event(reader, "sessions.changed")
    assert event["payload"]["action"] == "reset"
    assert event["payload"]["previousSessionId"] == before["sessionId"]

    # The new transcript is empty; the old one is kept in the archive under the old id.
    assert await gw.sessions.history(MAIN) == []
    preview = await reader.call("sessions.preview", {"keys": [MAIN]})
    assert preview["previews"][0]["status"] == "empty"
    assert await gw.sessions.archived_messages(archived["archiveId"]) == stored
    archives = await gw.sessions.archives(MAIN)
    assert [a["archiveId"] for a in archives] == [archived["archiveId"]]

    # Usage history survives a reset.
    logs = await admin.call("sessions.usage.logs", {"key": MAIN})
    assert [log["runId"] for log in logs["logs"]] == ["r1"]

    # A reset of an empty transcript archives nothing.
    again = await admin.call("sessions.reset", {"key": MAIN, "reason": "new"})
    assert again["archived"] is None


async def test_reset_and_delete_stop_the_sessions_runs(gw: Running, admin: GatewayClient) -> None:
    await gw.sessions.ensure(MAIN)
    await gw.sessions.ensure("agent:main:other")
    mine = gw.probe.start_run(MAIN, "run-1")
    also_mine = gw.probe.start_run("AGENT:main:main", "run-2")
    other = gw.probe.start_run("agent:main:other", "run-3")
    await trio.testing.wait_all_tasks_blocked()

    result = await admin.call("sessions.reset", {"key": MAIN})
    assert result["stoppedRuns"] == 2
    assert mine.state == also_mine.state == "cancelled"
    assert mine.cancel_reason == "session reset"
    assert other.state == "running"

    deleted = await admin.call("sessions.delete", {"key": "agent:main:other"})
    assert deleted["stoppedRuns"] == 1
    assert other.state == "cancelled" and other.cancel_reason == "session deleted"


async def test_reset_answers_503_while_a_run_will_not_stop(tmp_path) -> None:
    config = "[plugins.sessions]\nstopRunsTimeoutMs = 50\n"
    async with running_gateway(tmp_path, config=config) as gw, gw.client() as admin:
        await seed(gw, MAIN, "hello")
        job = gw.probe.start_run(MAIN, "stubborn", stubborn=True)
        await trio.testing.wait_all_tasks_blocked()
        error = await call_error(admin, "sessions.reset", {"key": MAIN})
        assert error.code == 503
        assert error.message == f"Session {MAIN} is still active; try again in a moment."
        # Nothing was reset.
        assert len(await gw.sessions.history(MAIN)) == 1
        gw.probe.release.set()
        with trio.fail_after(10):
            await job.done.wait()
        result = await admin.call("sessions.reset", {"key": MAIN})
        assert result["archived"]["messageCount"] == 1


# -- sessions.delete -------------------------------------------------------------------------


async def test_delete_archives_and_hides(
    gw: Running, admin: GatewayClient, reader: GatewayClient
) -> None:
    key = "agent:main:throwaway"
    stored = await seed(gw, key, "a", "b")
    await admin.call("sessions.patch", {"key": key, "label": "Temp"})
    await next_event(reader, "sessions.changed")

    result = await admin.call("sessions.delete", {"key": key})
    assert result["ok"] is True and result["deleted"] is True
    assert len(result["archived"]) == 1 and result["archivedMessages"] == 2
    event = await next_event(reader, "sessions.changed")
    assert event["payload"]["action"] == "deleted" and "entry" not in event["payload"]

    assert await gw.sessions.get(key) is None
    listing = await reader.call("sessions.list")
    assert key not in [row["key"] for row in listing["sessions"]]
    assert (await reader.call("sessions.preview", {"keys": [key]}))["previews"][0][
        "status"
    ] == "missing"
    # Archived, not destroyed.
    assert await gw.sessions.archived_messages(result["archived"][0]) == stored
    # The label is free again, and a new session under the key starts empty.
    assert (await gw.sessions.ensure(key))["messageCount"] == 0
    assert await gw.sessions.history(key) == []
    await admin.call("sessions.patch", {"key": key, "label": "Temp"})
    # Deleting again an unknown session is a 404.
    await admin.call("sessions.delete", {"key": key})
    assert (await call_error(admin, "sessions.delete", {"key": key})).code == 404


async def test_delete_without_archiving_leaves_rows_untouched(
    gw: Running, admin: GatewayClient
) -> None:
    key = "agent:main:keep-rows"
    await seed(gw, key, "a", "b", "c")
    result = await admin.call("sessions.delete", {"key": key, "deleteTranscript": False})
    assert result["archived"] == [] and result["archivedMessages"] == 0
    assert await gw.sessions.archives(key) == []

    def live_rows(db: sqlite3.Connection) -> int:
        return db.execute(
            "SELECT COUNT(*) FROM session_messages WHERE session_key = ? AND archive_id IS NULL",
            (key,),
        ).fetchone()[0]

    assert await gw.services.store.run(live_rows) == 3


async def test_the_main_session_cannot_be_deleted(gw: Running, admin: GatewayClient) -> None:
    await seed(gw, MAIN, "keep me")
    for key in (MAIN, "main", " Agent:Main:main "):
        error = await call_error(admin, "sessions.delete", {"key": key})
        assert error.code == 400
        assert error.message == f"Cannot delete the main session ({MAIN})."
        assert error.details == {"field": "key"}
    assert len(await gw.sessions.history(MAIN)) == 1


# -- sessions.compact ------------------------------------------------------------------------


async def test_compact_keeps_the_last_lines(
    gw: Running, admin: GatewayClient, reader: GatewayClient
) -> None:
    key = "agent:main:long"
    stored = await seed(gw, key, *[f"message {i}" for i in range(10)])
    result = await admin.call("sessions.compact", {"key": key, "maxLines": 3})
    assert result == {
        "ok": True,
        "key": key,
        "compacted": True,
        "kept": 3,
        "archived": 7,
        "firstKeptId": stored[7]["id"],
        "archiveId": result["archiveId"],
    }
    event = await next_event(reader, "sessions.changed")
    assert event["payload"]["action"] == "compacted"
    assert event["payload"]["entry"]["messageCount"] == 3

    assert await gw.sessions.history(key) == stored[7:]
    assert await gw.sessions.archived_messages(result["archiveId"]) == stored[:7]
    # The session id stays: compaction shortens, it does not start afresh.
    assert (await gw.sessions.get(key))["messageCount"] == 3

    again = await admin.call("sessions.compact", {"key": key, "maxLines": 3})
    assert again["compacted"] is False and again["kept"] == 3 and again["archived"] == 0
    assert again["firstKeptId"] == stored[7]["id"]

    # The default keeps 400 lines.
    default = await admin.call("sessions.compact", {"key": key})
    assert default["compacted"] is False and default["kept"] == 3


async def test_compact_of_an_empty_transcript(gw: Running, admin: GatewayClient) -> None:
    await gw.sessions.ensure("agent:main:empty")
    result = await admin.call("sessions.compact", {"key": "agent:main:empty"})
    assert result["compacted"] is False and result["reason"] == "no transcript"
    assert result["kept"] == 0


# -- sessions.usage, .timeseries, .logs ------------------------------------------------------


def day_ms(day: str, hour: int = 12) -> int:
    date = datetime.date.fromisoformat(day)
    moment = datetime.datetime(date.year, date.month, date.day, hour, tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


async def record(
    gw: Running, key: str, run: str, provider: str, model: str, tokens: tuple, ts: int
) -> None:
    await gw.sessions.record_usage(
        key,
        run_id=run,
        provider=provider,
        model=model,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        ts=ts,
    )


async def test_usage_aggregates_over_a_date_range(gw: Running, admin: GatewayClient) -> None:
    await record(gw, MAIN, "r1", "openai", "gpt", (10, 20), day_ms("2024-03-01"))
    await record(gw, MAIN, "r2", "anthropic", "claude", (1, 2), day_ms("2024-03-02"))
    await record(gw, "agent:ops:x", "r3", "openai", "gpt", (100, 0), day_ms("2024-03-02", 23))
    await record(gw, "agent:ops:x", "r4", "openai", "gpt", (5, 5), day_ms("2024-03-05"))
    await admin.call("sessions.patch", {"key": MAIN, "label": "Main"})

    usage = await admin.call("sessions.usage", {"startDate": "2024-03-01", "endDate": "2024-03-02"})
    assert (usage["startDate"], usage["endDate"]) == ("2024-03-01", "2024-03-02")
    assert usage["totals"] == {
        "runs": 3,
        "inputTokens": 111,
        "outputTokens": 22,
        "totalTokens": 133,
    }
    assert usage["sessionCount"] == 2
    assert [s["key"] for s in usage["sessions"]] == ["agent:ops:x", MAIN]
    main = usage["sessions"][1]
    assert main["label"] == "Main" and main["runs"] == 2 and main["totalTokens"] == 33
    by_model = {
        (m["provider"], m["model"]): m["totalTokens"] for m in usage["aggregates"]["byModel"]
    }
    assert by_model == {("openai", "gpt"): 130, ("anthropic", "claude"): 3}
    assert [p["provider"] for p in usage["aggregates"]["byProvider"]] == ["openai", "anthropic"]
    assert {a["agentId"]: a["runs"] for a in usage["aggregates"]["byAgent"]} == {
        "ops": 1,
        "main": 2,
    }
    assert [(d["date"], d["totalTokens"]) for d in usage["aggregates"]["daily"]] == [
        ("2024-03-01", 30),
        ("2024-03-02", 103),
    ]

    one = await admin.call(
        "sessions.usage",
        {"key": "agent:OPS:x", "startDate": "2024-03-01", "endDate": "2024-03-31", "limit": 1},
    )
    assert one["key"] == "agent:ops:x"
    assert one["totals"]["runs"] == 2 and len(one["sessions"]) == 1

    # Without dates: the last 30 days, which holds none of the 2024 rows.
    recent = await admin.call("sessions.usage")
    assert recent["totals"]["runs"] == 0 and recent["sessions"] == []
    today = datetime.datetime.now(datetime.UTC).date()
    assert recent["endDate"] == today.isoformat()
    assert recent["startDate"] == (today - datetime.timedelta(days=29)).isoformat()


async def test_usage_timeseries(gw: Running, admin: GatewayClient) -> None:
    for index in range(5):
        await record(gw, MAIN, f"r{index}", "openai", "gpt", (index, 1), 1_000 + index)
    series = await admin.call("sessions.usage.timeseries", {"key": MAIN})
    assert series["key"] == MAIN and series["sessionId"]
    assert series["bucketMs"] is None
    assert [p["ts"] for p in series["points"]] == [1000, 1001, 1002, 1003, 1004]
    assert [p["cumulativeTokens"] for p in series["points"]] == [1, 3, 6, 10, 15]

    for index in range(450):
        await record(
            gw,
            "agent:main:busy",
            f"b{index}",
            "openai",
            "gpt",
            (1, 1),
            day_ms("2024-05-01") + index * 60_000,
        )
    busy = await admin.call("sessions.usage.timeseries", {"key": "agent:main:busy"})
    assert 0 < len(busy["points"]) <= 200
    assert sum(p["runs"] for p in busy["points"]) == 450
    assert busy["points"][-1]["cumulativeTokens"] == 900
    assert [p["ts"] for p in busy["points"]] == sorted(p["ts"] for p in busy["points"])

    few = await admin.call("sessions.usage.timeseries", {"key": "agent:main:busy", "maxPoints": 10})
    assert len(few["points"]) <= 10 and sum(p["runs"] for p in few["points"]) == 450

    ranged = await admin.call(
        "sessions.usage.timeseries",
        {"key": "agent:main:busy", "startDate": "2024-05-02", "endDate": "2024-05-03"},
    )
    assert ranged["points"] == [] and ranged["startDate"] == "2024-05-02"

    # A known session without usage has an empty series.
    await gw.sessions.ensure("agent:main:quiet")
    quiet = await admin.call("sessions.usage.timeseries", {"key": "agent:main:quiet"})
    assert quiet["points"] == []


async def test_usage_logs_newest_first(gw: Running, admin: GatewayClient) -> None:
    for index in range(5):
        await record(gw, MAIN, f"r{index}", "openai", "gpt", (index, 2), 10_000 + index)
    logs = await admin.call("sessions.usage.logs", {"key": MAIN})
    assert [log["runId"] for log in logs["logs"]] == ["r4", "r3", "r2", "r1", "r0"]
    first = logs["logs"][0]
    assert first["totalTokens"] == 6 and first["provider"] == "openai" and first["sessionId"]
    limited = await admin.call("sessions.usage.logs", {"key": MAIN, "limit": 2})
    assert [log["runId"] for log in limited["logs"]] == ["r4", "r3"]


async def test_usage_of_a_deleted_session_is_still_reported(
    gw: Running, admin: GatewayClient
) -> None:
    key = "agent:main:gone"
    await record(gw, key, "r1", "openai", "gpt", (3, 3), 5_000)
    await admin.call("sessions.delete", {"key": key})
    logs = await admin.call("sessions.usage.logs", {"key": key})
    assert [log["runId"] for log in logs["logs"]] == ["r1"]


# -- advertising and scopes ------------------------------------------------------------------


async def test_advertised_methods_and_events(admin: GatewayClient, reader: GatewayClient) -> None:
    methods = set(admin.hello["features"]["methods"])
    assert {
        "sessions.list",
        "sessions.preview",
        "sessions.patch",
        "sessions.reset",
        "sessions.delete",
        "sessions.compact",
    } <= methods
    assert (
        not {
            "sessions.resolve",
            "sessions.usage",
            "sessions.usage.timeseries",
            "sessions.usage.logs",
        }
        & methods
    )
    assert "sessions.changed" in reader.hello["features"]["events"]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("sessions.resolve", {"key": MAIN}),
        ("sessions.patch", {"key": MAIN, "label": "x"}),
        ("sessions.reset", {"key": MAIN}),
        ("sessions.delete", {"key": "agent:main:x"}),
        ("sessions.compact", {"key": MAIN}),
        ("sessions.usage", {}),
        ("sessions.usage.timeseries", {"key": MAIN}),
        ("sessions.usage.logs", {"key": MAIN}),
    ],
)
async def test_admin_methods_refuse_a_reader(
    gw: Running, reader: GatewayClient, method: str, params: dict
) -> None:
    await gw.sessions.ensure(MAIN)
    error = await call_error(reader, method, params)
    assert error.code == 403
    assert "operator.admin" in error.message
