"""The ``sessions`` service contract (notes/sessions-service.md), called the way chat and
providers call it: looked up from the kernel's services of a running gateway."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sessions_testkit import Running

from kernel import GatewayError
from plugins.sessions.keys import MAIN_KEY_RE, canonical_key


@pytest.mark.parametrize(
    ("given_key", "canonical"),
    [
        ("agent:main:main", "agent:main:main"),
        ("  agent:main:main\n", "agent:main:main"),
        ("AGENT:Main:Discord:Group:42", "agent:main:Discord:Group:42"),
        ("agent:ops-2_b:chat with spaces", "agent:ops-2_b:chat with spaces"),
        ("agent:main:a:b:c", "agent:main:a:b:c"),
        ("global", "global"),
        ("GLOBAL", "global"),
        ("main", "agent:main:main"),
        ("agent:main:cafe\u0301", "agent:main:caf\u00e9"),
    ],
)
def test_canonical_key_accepts_and_canonicalises(given_key: str, canonical: str) -> None:
    assert canonical_key(given_key) == canonical
    assert MAIN_KEY_RE.match(canonical)


@pytest.mark.parametrize(
    "bad_key",
    [
        "",
        "   ",
        "agent:main:../../etc",
        "agent:main:..",
        "agent:main:a/b",
        "agent:main:a\\b",
        "agent:main:/etc/passwd",
        "agent:main:x\x00y",
        "\x00",
        "agent:main:\x1b[31m",
        "agent:main:bell\x07",
        "agent:main:del\x7f",
        "agent:main:\u202eevil",
        "agent:main:zero\u200bwidth",
        "agent:main:",
        "agent::x",
        "agent:Bad Agent:x",
        "agent:-lead:x",
        "agent:" + "a" * 65 + ":x",
        "agent:main:" + "x" * 201,
        "agent:main",
        "session-42",
        "unknown",
        "x" * 5000,
    ],
)
def test_canonical_key_refuses(bad_key: str) -> None:
    with pytest.raises(GatewayError) as caught:
        canonical_key(bad_key)
    assert caught.value.code == 400
    assert caught.value.message.startswith("invalid sessionKey: ")
    assert caught.value.details == {"field": "sessionKey"}


@given(st.text(max_size=300))
def test_canonical_key_is_idempotent_and_never_lets_path_characters_through(text: str) -> None:
    try:
        canonical = canonical_key(text)
    except GatewayError as error:
        assert error.code == 400
        return
    assert canonical_key(canonical) == canonical
    assert MAIN_KEY_RE.match(canonical)
    assert "/" not in canonical and "\\" not in canonical and ".." not in canonical
    assert "\x00" not in canonical


async def test_the_service_is_provided_and_validates_keys(gw: Running) -> None:
    sessions = gw.services.lookup("sessions")
    assert sessions.canonical_key("AGENT:Main:x") == "agent:main:x"
    for bad in ("agent:main:../../etc", "agent:main:a\x00b"):
        with pytest.raises(GatewayError) as caught:
            await sessions.append(bad, {"role": "user", "text": "hi"})
        assert caught.value.code == 400
        assert caught.value.details == {"field": "sessionKey"}
        with pytest.raises(GatewayError):
            await sessions.ensure(bad)
        with pytest.raises(GatewayError):
            await sessions.history(bad)


async def test_ensure_creates_once_and_get(gw: Running) -> None:
    sessions = gw.sessions
    assert await sessions.get("agent:main:fresh") is None
    entry = await sessions.ensure("agent:main:fresh")
    assert entry["key"] == "agent:main:fresh"
    assert entry["sessionId"]
    assert entry["createdAt"] == entry["updatedAt"] > 0
    assert entry["inputTokens"] == entry["outputTokens"] == 0
    again = await sessions.ensure("AGENT:MAIN:fresh")
    assert again["sessionId"] == entry["sessionId"]
    assert await sessions.get("agent:main:fresh") == again


async def test_append_and_history(gw: Running) -> None:
    sessions = gw.sessions
    assert await sessions.history("agent:main:talk") == []
    first = await sessions.append("agent:main:talk", {"role": "user", "text": "hello"})
    assert first["id"] and first["ts"] > 0
    assert first["role"] == "user" and first["text"] == "hello"
    second = await sessions.append(
        "agent:main:talk",
        {
            "role": "assistant",
            "text": "hi there",
            "runId": "run-1",
            "provider": "offline",
            "model": "echo",
            "stopReason": "stop",
            "usage": {"inputTokens": 3, "outputTokens": 5},
            "ignored": "extra keys are not stored",
        },
    )
    assert second["usage"] == {"inputTokens": 3, "outputTokens": 5}
    assert "ignored" not in second

    history = await sessions.history("agent:main:talk")
    assert history == [first, second]
    assert await sessions.history("agent:main:talk", limit=1) == [second]
    assert await sessions.history("agent:main:talk", limit=0) == []

    entry = await sessions.get("agent:main:talk")
    assert entry["messageCount"] == 2
    assert entry["lastModelProvider"] == "offline" and entry["lastModel"] == "echo"
    # Tokens count through record_usage only, so a run is never counted twice.
    assert entry["inputTokens"] == 0


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "robot", "text": "x"}, "message.role"),
        ({"text": "x"}, "message.role"),
        ({"role": "user"}, "message.text"),
        ({"role": "user", "text": 5}, "message.text"),
        ({"role": "user", "text": "a\x00b"}, "message.text"),
        ({"role": "user", "text": "x", "runId": 7}, "message.runId"),
        ({"role": "user", "text": "x", "usage": "lots"}, "message.usage"),
        ({"role": "user", "text": "x", "usage": {"inputTokens": -1}}, "message.usage.inputTokens"),
        (
            {"role": "user", "text": "x", "usage": {"outputTokens": True}},
            "message.usage.outputTokens",
        ),
    ],
)
async def test_append_refuses_malformed_messages(gw: Running, message: dict, field: str) -> None:
    with pytest.raises(GatewayError) as caught:
        await gw.sessions.append("agent:main:bad", message)
    assert caught.value.code == 400
    assert caught.value.details == {"field": field}
    # Nothing was written, not even the session.
    assert await gw.sessions.get("agent:main:bad") is None


async def test_record_usage_and_usage_rows(gw: Running) -> None:
    sessions = gw.sessions
    await sessions.record_usage(
        "agent:main:a",
        run_id="r1",
        provider="openai",
        model="gpt",
        input_tokens=10,
        output_tokens=20,
        ts=1_000,
    )
    await sessions.record_usage(
        "agent:main:b",
        run_id="r2",
        provider="anthropic",
        model="claude",
        input_tokens=1,
        output_tokens=2,
        ts=2_000,
    )
    await sessions.record_usage(
        "agent:main:a",
        run_id="r3",
        provider="openai",
        model="gpt",
        input_tokens=5,
        output_tokens=5,
        ts=3_000,
    )
    # A repeat for the same run replaces its row instead of counting twice.
    await sessions.record_usage(
        "agent:main:a",
        run_id="r3",
        provider="openai",
        model="gpt",
        input_tokens=6,
        output_tokens=6,
        ts=3_000,
    )
    entry = await sessions.get("agent:main:a")
    assert (entry["inputTokens"], entry["outputTokens"]) == (16, 26)
    assert entry["totalTokens"] == 42

    rows = await sessions.usage_rows(start_ms=0, end_ms=10_000)
    assert [row["runId"] for row in rows] == ["r1", "r2", "r3"]
    assert rows[0] == {
        "sessionKey": "agent:main:a",
        "runId": "r1",
        "provider": "openai",
        "model": "gpt",
        "inputTokens": 10,
        "outputTokens": 20,
        "ts": 1_000,
    }
    # [start, end): the end is exclusive.
    assert [r["runId"] for r in await sessions.usage_rows(start_ms=1_000, end_ms=3_000)] == [
        "r1",
        "r2",
    ]
    only_a = await sessions.usage_rows(start_ms=0, end_ms=10_000, key="AGENT:main:a")
    assert [r["runId"] for r in only_a] == ["r1", "r3"]
    assert len(await sessions.usage_rows(start_ms=0, end_ms=10_000, limit=1)) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"run_id": ""}, "runId"),
        ({"provider": None}, "provider"),
        ({"input_tokens": -1}, "inputTokens"),
        ({"output_tokens": 1.5}, "outputTokens"),
        ({"ts": True}, "ts"),
    ],
)
async def test_record_usage_refuses_bad_values(gw: Running, kwargs: dict, field: str) -> None:
    values = {
        "run_id": "r",
        "provider": "p",
        "model": "m",
        "input_tokens": 1,
        "output_tokens": 1,
        "ts": 1,
    } | kwargs
    with pytest.raises(GatewayError) as caught:
        await gw.sessions.record_usage("agent:main:main", **values)
    assert caught.value.code == 400
    assert caught.value.details == {"field": field}
