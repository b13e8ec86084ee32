"""Chat on a fresh install: no keys, so the offline provider answers, streamed as events.

The first test drives the gateway with a client that is not ours (trio-websocket and plain
JSON, the ``raw_connect`` fixture) and the installed plugins, as a new user would meet it.
"""

from __future__ import annotations

import itertools
import json

import pytest
import trio
from chat_testkit import (
    HELD_CONFIG,
    SESSION,
    HeldPlugin,
    chat_plugins,
    delta_text,
    names,
    run_events,
    send,
)

from kernel import GatewayError

WRITER = ("operator.read", "operator.write")


async def test_fresh_install_streams_an_offline_answer_to_a_plain_client(
    start_gateway, raw_connect
) -> None:
    async with start_gateway() as gateway, raw_connect(gateway, scopes=WRITER) as raw:
        params = {"sessionKey": SESSION, "message": "Hello there", "idempotencyKey": "run-1"}
        ack = await raw.call("send-1", "chat.send", params)
        assert ack["ok"], ack
        assert ack["payload"]["runId"] == "run-1"
        assert ack["payload"]["status"] == "started"

        with trio.fail_after(30):
            completed = await raw.event("chat.run.completed")
        mine = [e for e in raw.events if (e.get("payload") or {}).get("runId") == "run-1"]
        kinds = [e["event"] for e in mine]
        assert kinds[0] == "chat.run.started"
        assert kinds[-1] == "chat.run.completed"
        assert set(kinds[1:-1]) == {"chat.delta"} and len(kinds) >= 3

        deltas = [e["payload"] for e in mine if e["event"] == "chat.delta"]
        assert [d["index"] for d in deltas] == list(range(len(deltas)))
        assert all(d["sessionKey"] == SESSION for d in deltas)
        final = completed["payload"]
        assert "".join(d["text"] for d in deltas) == final["text"]
        assert final["provider"] == "offline"
        assert "[offline provider]" in final["text"] and "Hello there" in final["text"]
        assert final["stopReason"] == "end_turn"
        assert final["usage"]["outputTokens"] > 0
        started = mine[0]["payload"]
        assert started["provider"] == "offline"
        assert started["providerReason"] == "no model key is configured"

        # Every event this connection got, from its first, carries the next seq: no gaps.
        seqs = [e["seq"] for e in raw.events]
        assert seqs == list(range(1, len(seqs) + 1))

        history = await raw.call("history-1", "chat.history", {"sessionKey": SESSION})
        messages = history["payload"]["messages"]
        assert [(m["role"], m["runId"]) for m in messages] == [
            ("user", "run-1"),
            ("assistant", "run-1"),
        ]
        assert messages[0]["text"] == "Hello there"
        assert messages[1]["text"] == final["text"]

        again = await raw.call("send-2", "chat.send", {**params, "message": "changed my mind"})
        assert again["ok"] and again["payload"]["runId"] == "run-1"
        history = await raw.call("history-2", "chat.history", {"sessionKey": SESSION})
        assert len(history["payload"]["messages"]) == 2, "a repeated key must not start a run"

        nul = await raw.call(
            "send-3", "chat.send", {**params, "idempotencyKey": "run-2", "message": "a\x00b"}
        )
        assert not nul["ok"]
        assert nul["error"]["code"] == 400
        assert nul["error"]["details"] == {"field": "message"}
        assert "null bytes" in nul["error"]["message"]


async def test_text_is_normalised_and_control_characters_are_stripped(
    start_gateway, connect
) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        await send(client, "r1", "cafe\u0301\x07 \x1b[31mred\ttab\r\nline")
        await run_events(client, "r1")
        history = await client.call("chat.history", {"sessionKey": SESSION})
        user = history["messages"][0]
        assert user["text"] == "caf\u00e9 [31mred\ttab\r\nline"


async def test_an_answer_is_acknowledged_before_it_is_complete_and_deltas_are_increments(
    start_gateway, connect
) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        await send(client, "r1", "one two three")
        frames = await run_events(client, "r1")
        deltas = [f["payload"]["text"] for f in frames if f["event"] == "chat.delta"]
        assert len(deltas) > 1
        # Increments, not the accumulated text: no delta repeats its predecessor.
        assert not any(b.startswith(a) for a, b in itertools.pairwise(deltas))
        assert delta_text(frames) == frames[-1]["payload"]["text"]


async def test_a_second_run_in_a_session_sees_the_first_exchange(start_gateway, connect) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        await send(client, "r1", "first message")
        await send(client, "r2", "second message")
        first = await run_events(client, "r1")
        second = await run_events(client, "r2")
        assert first[-1]["event"] == second[-1]["event"] == "chat.run.completed"
        # The runs of one session take turns: r2 starts after r1 ended.
        history = await client.call("chat.history", {"sessionKey": SESSION})
        assert [(m["role"], m["runId"]) for m in history["messages"]] == [
            ("user", "r1"),
            ("user", "r2"),
            ("assistant", "r1"),
            ("assistant", "r2"),
        ]
        assert "second message" in second[-1]["payload"]["text"]


async def test_a_stop_word_aborts_the_sessions_runs(start_gateway, connect) -> None:
    held = HeldPlugin()
    async with (
        start_gateway(
            plugins=chat_plugins(held=held), config=HELD_CONFIG, use_entry_points=False
        ) as gateway,
        connect(gateway) as client,
    ):
        await send(client, "long", "tell me a story")
        with trio.fail_after(30):
            await client.next_event("chat.delta")
        result = await send(client, "stop-1", "  STOP ")
        assert result == {"ok": True, "aborted": True, "runIds": ["long"]}
        assert held.provider.open_streams == 0
        frames = await run_events(client, "long")
        final = frames[-1]
        assert final["event"] == "chat.run.failed"
        assert final["payload"]["aborted"] is True
        assert final["payload"]["stopReason"] == "stop"
        assert final["payload"]["text"] == "first "
        history = await client.call("chat.history", {"sessionKey": SESSION})
        assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
        partial = history["messages"][1]
        assert (partial["text"], partial["stopReason"]) == ("first ", "aborted")
        # The stop word itself is not part of the conversation.
        assert all(m["text"].strip() != "STOP" for m in history["messages"])

        nothing = await send(client, "stop-2", "/stop")
        assert nothing == {"ok": True, "aborted": False, "runIds": []}


async def test_chat_abort_by_run_and_by_session(start_gateway, connect) -> None:
    held = HeldPlugin()
    async with (
        start_gateway(
            plugins=chat_plugins(held=held), config=HELD_CONFIG, use_entry_points=False
        ) as gateway,
        connect(gateway) as client,
    ):
        await send(client, "long", "go on")
        with trio.fail_after(30):
            await client.next_event("chat.delta")
        with pytest.raises(GatewayError) as wrong:
            await client.call("chat.abort", {"sessionKey": "agent:main:other", "runId": "long"})
        assert wrong.value.code == 400
        assert wrong.value.message == "runId does not match sessionKey"
        assert wrong.value.details == {"field": "runId"}

        unknown = await client.call("chat.abort", {"sessionKey": SESSION, "runId": "nope"})
        assert unknown == {"ok": True, "aborted": False, "runIds": []}

        result = await client.call("chat.abort", {"sessionKey": SESSION, "runId": "long"})
        assert result == {"ok": True, "aborted": True, "runIds": ["long"]}
        frames = await run_events(client, "long")
        assert frames[-1]["event"] == "chat.run.failed"
        assert frames[-1]["payload"]["stopReason"] == "rpc"
        assert frames[-1]["payload"]["text"] == "first "
        assert held.provider.open_streams == 0
        # After the final event, nothing more for that run, even once the provider is free.
        held.provider.release.set()
        await trio.sleep(0.1)
        late = [
            f for f in client.events_nowait() if (f.get("payload") or {}).get("runId") == "long"
        ]
        assert late == []

        again = await client.call("chat.abort", {"sessionKey": SESSION, "runId": "long"})
        assert again["aborted"] is False

        held.provider.release = trio.Event()
        await send(client, "r2", "more")
        await send(client, "r3", "queued behind r2")
        with trio.fail_after(30):
            await client.next_event("chat.delta")
        whole = await client.call("chat.abort", {"sessionKey": SESSION})
        assert whole["ok"] is True and sorted(whole["runIds"]) == ["r2", "r3"]
        waited = await client.call("agent.wait", {"runId": "r3", "timeoutMs": 0})
        assert waited["aborted"] is True and waited["startedAt"] is None


async def test_a_repeated_key_finds_its_run_and_a_refused_send_can_be_retried(
    start_gateway, connect
) -> None:
    held = HeldPlugin()
    async with (
        start_gateway(
            plugins=chat_plugins(held=held), config=HELD_CONFIG, use_entry_points=False
        ) as gateway,
        connect(gateway) as client,
    ):
        first = await send(client, "r1", "once")
        assert first == {"runId": "r1", "status": "started", "provider": "held", "model": "held-1"}
        with trio.fail_after(30):
            await client.next_event("chat.delta")
        repeat = await send(client, "r1", "once, again")
        assert repeat == {**first, "status": "in_flight"}
        held.provider.release.set()
        frames = await run_events(client, "r1")
        assert frames[-1]["event"] == "chat.run.completed"
        assert (await send(client, "r1", "once"))["status"] == "ok"
        history = await client.call("chat.history", {"sessionKey": SESSION})
        assert [m["text"] for m in history["messages"] if m["role"] == "user"] == ["once"]

        # Two sends of one key at the same moment start one run between them.
        held.provider.release = trio.Event()
        answers: list[str] = []

        async def send_twin() -> None:
            answers.append((await send(client, "twin", "twice at once"))["status"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_twin)
            nursery.start_soon(send_twin)
        assert sorted(answers) == ["in_flight", "started"]
        held.provider.release.set()
        await run_events(client, "twin")

        # A refused send leaves nothing behind: the corrected retry with the same key runs,
        # rather than being told the first refusal again.
        with pytest.raises(GatewayError) as refused:
            await send(client, "fixme", "bad\x00byte")
        assert refused.value.code == 400
        retried = await send(client, "fixme", "good text")
        assert retried["status"] == "started"
        assert (await run_events(client, "fixme"))[-1]["event"] == "chat.run.completed"
        history = await client.call("chat.history", {"sessionKey": SESSION})
        users = [m["text"] for m in history["messages"] if m["role"] == "user"]
        assert users == ["once", "twice at once", "good text"]


async def test_finished_runs_are_remembered_for_ten_minutes(
    start_gateway, connect, mock_clock
) -> None:
    mock_clock.rate = 1.0  # real time passes, and jump() adds minutes at once
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        await send(client, "r1", "remember this run")
        await run_events(client, "r1")
        mock_clock.jump(9 * 60 + 50)
        waited = await client.call("agent.wait", {"runId": "r1", "timeoutMs": 0})
        assert waited["status"] == "ok"
        assert (await send(client, "r1", "again"))["status"] == "ok"
        mock_clock.jump(20)
        with pytest.raises(GatewayError) as forgotten:
            await client.call("agent.wait", {"runId": "r1", "timeoutMs": 0})
        assert forgotten.value.code == 404


async def test_a_reader_sees_runs_but_may_not_start_one(start_gateway, connect) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as writer,
        connect(gateway, scopes=("operator.read",)) as reader,
    ):
        with pytest.raises(GatewayError) as refused:
            await send(reader, "r0")
        assert refused.value.code == 403
        await send(writer, "r1", "watched")
        frames = await run_events(reader, "r1")
        assert names(frames)[0] == "chat.run.started"
        assert names(frames)[-1] == "chat.run.completed"
        history = await reader.call("chat.history", {"sessionKey": SESSION})
        assert len(history["messages"]) == 2


async def test_chat_history_limits_and_unknown_sessions(start_gateway, connect) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        empty = await client.call("chat.history", {"sessionKey": "agent:main:nobody"})
        assert empty["messages"] == [] and empty["sessionKey"] == "agent:main:nobody"
        for n in range(3):
            await send(client, f"r{n}", f"message {n}")
            await run_events(client, f"r{n}")
        last_two = await client.call("chat.history", {"sessionKey": "MAIN", "limit": 2})
        assert last_two["sessionKey"] == SESSION
        assert [m["runId"] for m in last_two["messages"]] == ["r2", "r2"]
        assert last_two["sessionId"]


async def test_chat_inject_appends_without_a_run(start_gateway, connect) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as admin,
        connect(gateway, scopes=("operator.write",)) as w,
    ):
        with pytest.raises(GatewayError) as missing:
            await admin.call("chat.inject", {"sessionKey": SESSION, "message": "x"})
        assert missing.value.code == 404

        await send(admin, "r1", "hi")
        await run_events(admin, "r1")
        with pytest.raises(GatewayError) as forbidden:
            await w.call("chat.inject", {"sessionKey": SESSION, "message": "x"})
        assert forbidden.value.code == 403

        result = await admin.call(
            "chat.inject", {"sessionKey": SESSION, "message": "note", "label": "ops"}
        )
        assert result["ok"] is True
        event = await admin.next_event("chat.run.completed")
        assert event["payload"]["runId"] == f"inject-{result['messageId']}"
        assert event["payload"]["injected"] is True
        history = await admin.call("chat.history", {"sessionKey": SESSION})
        injected = history["messages"][-1]
        assert injected["id"] == result["messageId"]
        assert injected["role"] == "assistant"
        assert injected["text"] == "[ops]\n\nnote"
        assert injected["model"] == "gateway-injected"


BAD_INPUTS = [
    ("chat.send", {"message": "x", "idempotencyKey": "k"}, 400, "sessionKey"),
    ("chat.send", {"sessionKey": SESSION, "idempotencyKey": "k"}, 400, "message"),
    ("chat.send", {"sessionKey": SESSION, "message": "x"}, 400, "idempotencyKey"),
    (
        "chat.send",
        {"sessionKey": SESSION, "message": "x", "idempotencyKey": ""},
        400,
        "idempotencyKey",
    ),
    (
        "chat.send",
        {"sessionKey": SESSION, "message": "x", "idempotencyKey": "a\nb"},
        400,
        "idempotencyKey",
    ),
    (
        "chat.send",
        {"sessionKey": "agent:main:../etc", "message": "x", "idempotencyKey": "k"},
        400,
        "sessionKey",
    ),
    ("chat.send", {"sessionKey": "nope", "message": "x", "idempotencyKey": "k"}, 400, "sessionKey"),
    ("chat.send", {"sessionKey": SESSION, "message": "   ", "idempotencyKey": "k"}, 400, "message"),
    (
        "chat.send",
        {"sessionKey": SESSION, "message": "\x07\x08", "idempotencyKey": "k"},
        400,
        "message",
    ),
    ("chat.send", {"sessionKey": SESSION, "message": 5, "idempotencyKey": "k"}, 400, "message"),
    (
        "chat.send",
        {"sessionKey": SESSION, "message": "x", "idempotencyKey": "k", "timeoutMs": -1},
        400,
        "timeoutMs",
    ),
    (
        "chat.send",
        {"sessionKey": SESSION, "message": "x", "idempotencyKey": "k", "bogus": 1},
        400,
        "bogus",
    ),
    (
        "chat.send",
        {
            "sessionKey": SESSION,
            "message": "",
            "idempotencyKey": "k",
            "attachments": [{"content": "not base64!"}],
        },
        400,
        "attachments.0.content",
    ),
    (
        "chat.send",
        {
            "sessionKey": SESSION,
            "message": "",
            "idempotencyKey": "k",
            "attachments": [{"fileName": "a.txt"}],
        },
        400,
        "attachments.0.content",
    ),
    ("chat.history", {}, 400, "sessionKey"),
    ("chat.history", {"sessionKey": SESSION, "limit": 0}, 400, "limit"),
    ("chat.history", {"sessionKey": SESSION, "limit": 1001}, 400, "limit"),
    ("chat.history", {"sessionKey": "agent:main:a\\b"}, 400, "sessionKey"),
    ("chat.abort", {}, 400, "sessionKey"),
    ("chat.abort", {"sessionKey": SESSION, "runId": ""}, 400, "runId"),
    ("chat.abort", {"sessionKey": "x"}, 400, "sessionKey"),
    ("chat.inject", {"sessionKey": SESSION}, 400, "message"),
    ("chat.inject", {"sessionKey": SESSION, "message": ""}, 400, "message"),
    ("chat.inject", {"sessionKey": SESSION, "message": "a\x00"}, 400, "message"),
    ("chat.inject", {"sessionKey": SESSION, "message": "x", "label": "l" * 101}, 400, "label"),
    ("agent", {"idempotencyKey": "k"}, 400, "message"),
    ("agent", {"message": "x"}, 400, "idempotencyKey"),
    ("agent", {"message": "", "idempotencyKey": "k"}, 400, "message"),
    ("agent", {"message": "a\x00", "idempotencyKey": "k"}, 400, "message"),
    ("agent", {"message": "x", "idempotencyKey": "k", "agentId": "Bad Id!"}, 400, "agentId"),
    (
        "agent",
        {"message": "x", "idempotencyKey": "k", "agentId": "other", "sessionKey": SESSION},
        400,
        "agentId",
    ),
    ("agent", {"message": "x", "idempotencyKey": "k", "timeout": -5}, 400, "timeout"),
    ("agent", {"message": "x", "idempotencyKey": "k", "label": ""}, 400, "label"),
    (
        "agent",
        {"message": "x", "idempotencyKey": "k", "inputProvenance": {"kind": "alien"}},
        400,
        "inputProvenance.kind",
    ),
    ("agent", {"message": "x", "idempotencyKey": "k", "sessionKey": "agent::x"}, 400, "sessionKey"),
    ("agent.wait", {}, 400, "runId"),
    ("agent.wait", {"runId": "nope"}, 404, "runId"),
    ("agent.wait", {"runId": "x", "timeoutMs": -1}, 400, "timeoutMs"),
    ("agent.wait", {"runId": "x", "timeoutMs": "soon"}, 400, "timeoutMs"),
    ("agent.identity.get", {"agentId": ""}, 400, "agentId"),
    ("agent.identity.get", {"agentId": "BAD ID"}, 400, "agentId"),
    ("agent.identity.get", {"agentId": "a", "sessionKey": "agent:b:main"}, 400, "agentId"),
    ("agent.identity.get", {"sessionKey": "../x"}, 400, "sessionKey"),
]


@pytest.mark.parametrize(("method", "params", "code", "field"), BAD_INPUTS)
async def test_bad_inputs_are_refused_naming_the_field(
    start_gateway, connect, method, params, code, field
) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        with pytest.raises(GatewayError) as refused:
            await client.call(method, params)
        assert refused.value.code == code, refused.value
        if field is not None:
            assert (refused.value.details or {}).get("field") == field, refused.value
        # Nothing was written for a refused request.
        history = await client.call("chat.history", {"sessionKey": SESSION})
        assert history["messages"] == [], json.dumps(history)


async def test_a_huge_attachment_is_too_large(start_gateway, connect) -> None:
    import base64

    blob = base64.b64encode(b"x" * 5_000_001).decode()
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        with pytest.raises(GatewayError) as refused:
            await send(client, "big", "", attachments=[{"content": blob}])
        assert refused.value.code == 413
        small = base64.b64encode(b"hello").decode()
        await send(
            client,
            "ok",
            "",
            attachments=[{"content": small, "fileName": "hi.txt", "mimeType": "text/plain"}],
        )
        await run_events(client, "ok")
        history = await client.call("chat.history", {"sessionKey": SESSION})
        assert history["messages"][0]["text"] == "[attachment: hi.txt (text/plain, 5 bytes)]"


async def test_chat_needs_the_sessions_service(start_gateway, connect) -> None:
    plugins = {"providers": chat_plugins()["providers"], "chat": chat_plugins()["chat"]}
    async with (
        start_gateway(plugins=plugins, use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        with pytest.raises(GatewayError) as refused:
            await send(client, "r1")
        assert refused.value.code == 503
        assert "sessions" in refused.value.message
