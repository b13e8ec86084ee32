"""Every ``sessions.*`` method refuses bad input with a 400 naming the field, and a session
that does not exist with a 404, over a real socket; nothing is changed by a refused call."""

from __future__ import annotations

import base64

import pytest
from sessions_testkit import Running, call_error

from kernel import GatewayClient

MAIN = "agent:main:main"
KNOWN = "agent:main:known"
SUBAGENT = "agent:main:subagent:1"

PATH_KEYS = [
    "agent:main:../../etc",
    "agent:main:..",
    "agent:main:a/b",
    "agent:main:a\\b",
    "agent:main:nul\x00byte",
    "agent:main:esc\x1b",
    "agent:Bad Agent:x",
    "agent:main:",
    "not-a-key",
    "agent:main:" + "x" * 201,
]

KEYED_METHODS = [
    "sessions.patch",
    "sessions.reset",
    "sessions.delete",
    "sessions.compact",
    "sessions.usage.timeseries",
    "sessions.usage.logs",
]


def cursor_of(value: object) -> str:
    import json

    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


BAD_PARAMS = [
    # sessions.list
    ("sessions.list", {"limit": 0}, "limit"),
    ("sessions.list", {"limit": 501}, "limit"),
    ("sessions.list", {"limit": "10"}, "limit"),
    ("sessions.list", {"activeMinutes": 0}, "activeMinutes"),
    ("sessions.list", {"includeGlobal": "yes"}, "includeGlobal"),
    ("sessions.list", {"includeLastMessage": 1}, "includeLastMessage"),
    ("sessions.list", {"label": ""}, "label"),
    ("sessions.list", {"label": "x" * 65}, "label"),
    ("sessions.list", {"label": "   "}, "label"),
    ("sessions.list", {"agentId": "Bad Agent!"}, "agentId"),
    ("sessions.list", {"agentId": ""}, "agentId"),
    ("sessions.list", {"spawnedBy": "agent:main:../x"}, "spawnedBy"),
    ("sessions.list", {"search": 5}, "search"),
    ("sessions.list", {"search": "x" * 201}, "search"),
    ("sessions.list", {"cursor": "***"}, "cursor"),
    ("sessions.list", {"cursor": cursor_of({"not": "a pair"})}, "cursor"),
    ("sessions.list", {"cursor": cursor_of(["soon", MAIN])}, "cursor"),
    ("sessions.list", {"cursor": ""}, "cursor"),
    ("sessions.list", {"bogus": 1}, "bogus"),
    # sessions.preview
    ("sessions.preview", {}, "keys"),
    ("sessions.preview", {"keys": []}, "keys"),
    ("sessions.preview", {"keys": MAIN}, "keys"),
    ("sessions.preview", {"keys": [MAIN] * 65}, "keys"),
    ("sessions.preview", {"keys": [""]}, "keys.0"),
    ("sessions.preview", {"keys": [MAIN, "agent:main:../../etc"]}, "keys.1"),
    ("sessions.preview", {"keys": [MAIN, 7]}, "keys.1"),
    ("sessions.preview", {"keys": [MAIN], "limit": 0}, "limit"),
    ("sessions.preview", {"keys": [MAIN], "limit": 201}, "limit"),
    ("sessions.preview", {"keys": [MAIN], "maxChars": 19}, "maxChars"),
    ("sessions.preview", {"keys": [MAIN], "extra": True}, "extra"),
    # sessions.resolve
    ("sessions.resolve", {}, "key"),
    ("sessions.resolve", {"key": MAIN, "label": "x"}, "label"),
    ("sessions.resolve", {"sessionId": "a", "label": "x"}, "label"),
    ("sessions.resolve", {"key": MAIN, "sessionId": "a"}, "sessionId"),
    ("sessions.resolve", {"key": "agent:main:a/b"}, "key"),
    ("sessions.resolve", {"sessionId": ""}, "sessionId"),
    ("sessions.resolve", {"label": "x" * 65}, "label"),
    ("sessions.resolve", {"label": "x", "agentId": "NO WAY"}, "agentId"),
    ("sessions.resolve", {"label": "x", "spawnedBy": "agent:main:.."}, "spawnedBy"),
    ("sessions.resolve", {"key": MAIN, "includeGlobal": "no"}, "includeGlobal"),
    ("sessions.resolve", {"key": MAIN, "path": "/tmp"}, "path"),
    # sessions.patch
    ("sessions.patch", {}, "key"),
    ("sessions.patch", {"key": ""}, "key"),
    ("sessions.patch", {"key": 5}, "key"),
    ("sessions.patch", {"key": KNOWN, "thinkingLevel": "extreme"}, "thinkingLevel"),
    ("sessions.patch", {"key": KNOWN, "verboseLevel": "loud"}, "verboseLevel"),
    ("sessions.patch", {"key": KNOWN, "reasoningLevel": "full"}, "reasoningLevel"),
    ("sessions.patch", {"key": KNOWN, "responseUsage": "all"}, "responseUsage"),
    ("sessions.patch", {"key": KNOWN, "elevatedLevel": "root"}, "elevatedLevel"),
    ("sessions.patch", {"key": KNOWN, "execHost": "cloud"}, "execHost"),
    ("sessions.patch", {"key": KNOWN, "execSecurity": "none"}, "execSecurity"),
    ("sessions.patch", {"key": KNOWN, "execAsk": "never"}, "execAsk"),
    ("sessions.patch", {"key": KNOWN, "sendPolicy": "maybe"}, "sendPolicy"),
    ("sessions.patch", {"key": KNOWN, "groupActivation": "never"}, "groupActivation"),
    ("sessions.patch", {"key": KNOWN, "thinkingLevel": 3}, "thinkingLevel"),
    ("sessions.patch", {"key": KNOWN, "label": "x" * 65}, "label"),
    ("sessions.patch", {"key": KNOWN, "label": ""}, "label"),
    ("sessions.patch", {"key": KNOWN, "label": "  \t "}, "label"),
    ("sessions.patch", {"key": KNOWN, "label": "bell\x07"}, "label"),
    ("sessions.patch", {"key": KNOWN, "model": ""}, "model"),
    ("sessions.patch", {"key": KNOWN, "model": "   "}, "model"),
    ("sessions.patch", {"key": KNOWN, "model": "x" * 201}, "model"),
    ("sessions.patch", {"key": KNOWN, "execNode": "a\nb"}, "execNode"),
    ("sessions.patch", {"key": KNOWN, "spawnedBy": MAIN}, "spawnedBy"),
    ("sessions.patch", {"key": KNOWN, "spawnDepth": 1}, "spawnDepth"),
    ("sessions.patch", {"key": SUBAGENT, "spawnedBy": "agent:main:a\\b"}, "spawnedBy"),
    ("sessions.patch", {"key": SUBAGENT, "spawnDepth": -1}, "spawnDepth"),
    ("sessions.patch", {"key": SUBAGENT, "spawnDepth": "1"}, "spawnDepth"),
    ("sessions.patch", {"key": KNOWN, "path": "/etc/passwd"}, "path"),
    # sessions.reset
    ("sessions.reset", {}, "key"),
    ("sessions.reset", {"key": KNOWN, "reason": "later"}, "reason"),
    ("sessions.reset", {"key": KNOWN, "hard": True}, "hard"),
    # sessions.delete
    ("sessions.delete", {}, "key"),
    ("sessions.delete", {"key": KNOWN, "deleteTranscript": "yes"}, "deleteTranscript"),
    ("sessions.delete", {"key": MAIN}, "key"),
    ("sessions.delete", {"key": "main"}, "key"),
    ("sessions.delete", {"key": KNOWN, "force": True}, "force"),
    # sessions.compact
    ("sessions.compact", {}, "key"),
    ("sessions.compact", {"key": KNOWN, "maxLines": 0}, "maxLines"),
    ("sessions.compact", {"key": KNOWN, "maxLines": "400"}, "maxLines"),
    ("sessions.compact", {"key": KNOWN, "maxLines": 100_001}, "maxLines"),
    ("sessions.compact", {"key": KNOWN, "lines": 3}, "lines"),
    # sessions.usage
    ("sessions.usage", {"startDate": "2024-03-01"}, "endDate"),
    ("sessions.usage", {"endDate": "2024-03-01"}, "startDate"),
    ("sessions.usage", {"startDate": "2024-13-01", "endDate": "2024-12-01"}, "startDate"),
    ("sessions.usage", {"startDate": "2024/01/01", "endDate": "2024-01-02"}, "startDate"),
    ("sessions.usage", {"startDate": "2024-02-30", "endDate": "2024-03-01"}, "startDate"),
    ("sessions.usage", {"startDate": "2024-03-01", "endDate": "tomorrow"}, "endDate"),
    ("sessions.usage", {"startDate": "2024-03-01", "endDate": 20240302}, "endDate"),
    ("sessions.usage", {"startDate": "2024-03-02", "endDate": "2024-03-01"}, "endDate"),
    ("sessions.usage", {"startDate": "2022-01-01", "endDate": "2024-01-01"}, "endDate"),
    ("sessions.usage", {"limit": 0}, "limit"),
    ("sessions.usage", {"limit": 1001}, "limit"),
    ("sessions.usage", {"key": "agent:main:../x"}, "key"),
    ("sessions.usage", {"key": ""}, "key"),
    ("sessions.usage", {"includeContextWeight": "y"}, "includeContextWeight"),
    ("sessions.usage", {"days": 7}, "days"),
    # sessions.usage.timeseries
    ("sessions.usage.timeseries", {}, "key"),
    ("sessions.usage.timeseries", {"key": KNOWN, "startDate": "2024-01-01"}, "endDate"),
    ("sessions.usage.timeseries", {"key": KNOWN, "startDate": "x", "endDate": "y"}, "startDate"),
    (
        "sessions.usage.timeseries",
        {"key": KNOWN, "startDate": "2024-01-02", "endDate": "2024-01-01"},
        "endDate",
    ),
    ("sessions.usage.timeseries", {"key": KNOWN, "maxPoints": 201}, "maxPoints"),
    ("sessions.usage.timeseries", {"key": KNOWN, "maxPoints": 0}, "maxPoints"),
    ("sessions.usage.timeseries", {"key": KNOWN, "bucket": "1h"}, "bucket"),
    # sessions.usage.logs
    ("sessions.usage.logs", {}, "key"),
    ("sessions.usage.logs", {"key": KNOWN, "limit": 0}, "limit"),
    ("sessions.usage.logs", {"key": KNOWN, "limit": 1001}, "limit"),
    ("sessions.usage.logs", {"key": KNOWN, "limit": 2.5}, "limit"),
    ("sessions.usage.logs", {"key": KNOWN, "offset": 3}, "offset"),
]


@pytest.fixture
async def known(gw: Running) -> None:
    for key in (MAIN, KNOWN, SUBAGENT):
        await gw.sessions.append(key, {"role": "user", "text": "hello"})


async def _snapshot(gw: Running) -> list:
    def work(db):
        return [
            tuple(row)
            for table in ("session_entries", "session_messages", "session_archives")
            for row in db.execute(f"SELECT * FROM {table} ORDER BY rowid")
        ]

    return await gw.services.store.run(work)


@pytest.mark.parametrize(
    ("method", "params", "field"),
    BAD_PARAMS,
    ids=[f"{m}-{i}-{f}" for i, (m, _, f) in enumerate(BAD_PARAMS)],
)
async def test_bad_params_are_a_400_naming_the_field(
    gw: Running, admin: GatewayClient, known: None, method: str, params: dict, field: str
) -> None:
    before = await _snapshot(gw)
    error = await call_error(admin, method, params)
    assert error.code == 400, error
    assert error.reason == "INVALID_REQUEST"
    assert error.details == {"field": field}, error.message
    if not error.message.startswith("Cannot delete the main session"):  # upstream's words
        assert field.split(".")[0] in error.message
    assert await _snapshot(gw) == before


@pytest.mark.parametrize("method", [*KEYED_METHODS, "sessions.resolve"])
@pytest.mark.parametrize("bad_key", PATH_KEYS)
async def test_bad_keys_are_refused_by_every_keyed_method(
    gw: Running, admin: GatewayClient, method: str, bad_key: str
) -> None:
    error = await call_error(admin, method, {"key": bad_key})
    assert error.code == 400
    assert error.details == {"field": "key"}
    assert error.message.startswith("invalid key: ")


@pytest.mark.parametrize("bad_key", PATH_KEYS)
async def test_bad_keys_are_refused_by_preview_and_usage(
    admin: GatewayClient, bad_key: str
) -> None:
    error = await call_error(admin, "sessions.preview", {"keys": [bad_key]})
    assert error.code == 400 and error.details == {"field": "keys.0"}
    error = await call_error(admin, "sessions.usage", {"key": bad_key})
    assert error.code == 400 and error.details == {"field": "key"}


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("sessions.resolve", {"key": "agent:main:nobody"}),
        ("sessions.resolve", {"sessionId": "00000000-0000-4000-8000-000000000000"}),
        ("sessions.resolve", {"label": "Nobody"}),
        ("sessions.patch", {"key": "agent:main:nobody", "label": "x"}),
        ("sessions.reset", {"key": "agent:main:nobody"}),
        ("sessions.delete", {"key": "agent:main:nobody"}),
        ("sessions.compact", {"key": "agent:main:nobody"}),
        ("sessions.usage", {"key": "agent:main:nobody"}),
        ("sessions.usage.timeseries", {"key": "agent:main:nobody"}),
        ("sessions.usage.logs", {"key": "agent:main:nobody"}),
    ],
)
async def test_unknown_sessions_are_a_404(
    gw: Running, admin: GatewayClient, method: str, params: dict
) -> None:
    error = await call_error(admin, method, params)
    assert error.code == 404
    assert error.reason == "NOT_FOUND"
    assert "No session found" in error.message
    # A refused call does not create the session.
    assert await gw.sessions.get("agent:main:nobody") is None


async def test_params_that_are_not_an_object(admin: GatewayClient) -> None:
    for method in ("sessions.list", "sessions.patch", "sessions.usage"):
        error = await call_error(admin, method, ["agent:main:main"])
        assert error.code == 400
