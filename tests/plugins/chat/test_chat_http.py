"""Chat runs against the OpenAI-compatible and Anthropic providers, pointed at a local server.

The server (``FakeLLMServer``) is real HTTP on 127.0.0.1; it records each request and notices
when the gateway hangs up mid-answer, which is how an abort is seen to close the upstream
stream. Keys are added over the wire with ``anima.providers.set``, as an operator would.
"""

from __future__ import annotations

import pytest
import trio
from chat_testkit import (
    SESSION,
    TEXTS,
    add_key,
    chat_plugins,
    delta_text,
    error_reply,
    merge,
    names,
    provider_config,
    run_events,
    send,
    stream_route,
)
from fake_llm_server import RecordedRequest, Reply, anthropic_events, openai_chunks

KINDS = ["openai", "anthropic"]
KEY_ONE = "sk-test-one-0123456789abcdefghij"
KEY_TWO = "sk-test-two-0123456789abcdefghij"


def auth_of(request: RecordedRequest) -> str | None:
    bearer = request.headers.get("authorization", "")
    return bearer.removeprefix("Bearer ") or request.headers.get("x-api-key")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_run_streams_from_an_http_provider(start_gateway, connect, llm, kind) -> None:
    path, reply = stream_route(kind)
    llm.route("POST", path, reply)
    config = provider_config(llm.base_url)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        await add_key(client, kind, KEY_ONE)
        ack = await send(client, "r1", "Say hello")
        assert ack["provider"] == kind
        frames = await run_events(client, "r1")
        assert names(frames) == [
            "chat.run.started",
            *["chat.delta"] * len(TEXTS),
            "chat.run.completed",
        ]
        assert [f["payload"]["text"] for f in frames[1:-1]] == TEXTS
        final = frames[-1]["payload"]
        assert final["text"] == "".join(TEXTS)
        assert final["provider"] == kind
        if kind == "openai":
            assert final["usage"] == {"inputTokens": 11, "outputTokens": 7}
            assert final["stopReason"] == "stop"
            assert final["model"] == "gpt-test"
        else:
            assert final["usage"] == {"inputTokens": 25, "outputTokens": 9}
            assert final["stopReason"] == "end_turn"
            assert final["model"] == "claude-test"

        (request,) = llm.requests
        assert auth_of(request) == KEY_ONE
        body = request.json()
        assert body["stream"] is True
        assert body["messages"][-1] == {"role": "user", "content": "Say hello"}

        history = await client.call("chat.history", {"sessionKey": SESSION})
        assistant = history["messages"][-1]
        assert assistant["text"] == "".join(TEXTS)
        assert assistant["provider"] == kind

        # The second run sends the first exchange as context.
        await send(client, "r2", "And again")
        await run_events(client, "r2")
        context = llm.requests[-1].json()["messages"]
        assert [m["role"] for m in context] == ["user", "assistant", "user"]
        assert context[1]["content"] == "".join(TEXTS)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_plain_client_gets_the_whole_run_from_an_http_provider(
    start_gateway, connect, raw_connect, llm, kind
) -> None:
    path, reply = stream_route(kind)
    llm.route("POST", path, reply)
    config = provider_config(llm.base_url)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as admin,
    ):
        await add_key(admin, kind, KEY_ONE)
        async with raw_connect(gw, scopes=("operator.read", "operator.write")) as raw:
            params = {"sessionKey": SESSION, "message": "Hello", "idempotencyKey": "h1"}
            ack = await raw.call("s1", "chat.send", params)
            assert ack["ok"] and ack["payload"]["runId"] == "h1", ack
            with trio.fail_after(30):
                await raw.event("chat.run.completed")
            mine = [e for e in raw.events if (e.get("payload") or {}).get("runId") == "h1"]
            assert names(mine) == [
                "chat.run.started",
                *["chat.delta"] * len(TEXTS),
                "chat.run.completed",
            ]
            assert [e["payload"]["index"] for e in mine[1:-1]] == list(range(len(TEXTS)))
            seqs = [e["seq"] for e in raw.events]
            assert seqs == list(range(1, len(seqs) + 1))

            history = await raw.call("h", "chat.history", {"sessionKey": SESSION})
            assert [m["text"] for m in history["payload"]["messages"]] == [
                "Hello",
                "".join(TEXTS),
            ]
            again = await raw.call("s2", "chat.send", {**params, "message": "Hello?"})
            assert again["ok"] and again["payload"]["runId"] == "h1"
            assert again["payload"]["status"] == "ok"
            assert len(llm.requests) == 1, "a repeated key must not ask the model again"

            nul = await raw.call(
                "s3", "chat.send", {**params, "idempotencyKey": "h2", "message": "\x00"}
            )
            assert nul["error"]["code"] == 400 and nul["error"]["details"] == {"field": "message"}
            assert len(llm.requests) == 1


async def test_a_manual_rotation_moves_the_next_run_to_the_next_key(
    start_gateway, connect, llm
) -> None:
    path, reply = stream_route("openai")
    llm.route("POST", path, reply)
    config = provider_config(llm.base_url)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        await add_key(client, "openai", KEY_ONE)
        second = await add_key(client, "openai", KEY_TWO)
        await send(client, "r1")
        await run_events(client, "r1")
        rotated = await client.call("anima.providers.rotate", {"provider": "openai"})
        assert rotated["activeKeyId"] == second
        await send(client, "r2")
        frames = await run_events(client, "r2")
        assert frames[-1]["event"] == "chat.run.completed"
        assert "chat.run.rotated" not in names(frames)
        assert [auth_of(r) for r in llm.requests] == [KEY_ONE, KEY_TWO]


@pytest.mark.parametrize("kind", KINDS)
async def test_abort_mid_stream_closes_the_upstream_stream(
    start_gateway, connect, llm, kind
) -> None:
    hold = trio.Event()  # never set: the server stalls after three pieces
    pieces = openai_chunks(TEXTS) if kind == "openai" else anthropic_events(TEXTS)
    path = "/v1/chat/completions" if kind == "openai" else "/v1/messages"
    # openai: role chunk + 2 texts; anthropic: start, block start, ping + 2 texts.
    head = 3 if kind == "openai" else 5
    llm.route("POST", path, Reply(body=[*pieces[:head], hold, *pieces[head:]]))
    config = provider_config(llm.base_url)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        await add_key(client, kind, KEY_ONE)
        await send(client, "r1", "Talk for a while")
        seen = []
        with trio.fail_after(30):
            while len(seen) < 2:
                frame = await client.next_event("chat.delta")
                seen.append(frame["payload"]["text"])
        assert seen == TEXTS[:2]
        assert not llm.client_gone.is_set()

        result = await client.call("chat.abort", {"sessionKey": SESSION, "runId": "r1"})
        assert result == {"ok": True, "aborted": True, "runIds": ["r1"]}
        with trio.fail_after(10):
            await llm.client_gone.wait()

        final = await client.next_event("chat.run.failed")
        assert final["payload"]["runId"] == "r1"
        assert final["payload"]["aborted"] is True
        assert final["payload"]["stopReason"] == "rpc"
        assert final["payload"]["text"] == "".join(TEXTS[:2])
        history = await client.call("chat.history", {"sessionKey": SESSION})
        partial = history["messages"][-1]
        assert partial["text"] == "".join(TEXTS[:2])
        assert partial["stopReason"] == "aborted"
        assert partial["label"] == "partial"
        waited = await client.call("agent.wait", {"runId": "r1", "timeoutMs": 0})
        assert waited["status"] == "error" and waited["aborted"] is True


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [401, 429])
async def test_auto_rotation_retries_once_on_the_next_key_and_says_so(
    start_gateway, connect, llm, kind, status
) -> None:
    path, good = stream_route(kind)

    def answer(request: RecordedRequest) -> Reply:
        if auth_of(request) == KEY_ONE:
            headers = [("Retry-After", "3")] if status == 429 else []
            return error_reply(status, f"key one refused with {status}", headers)
        return good

    llm.route("POST", path, answer)
    config = provider_config(llm.base_url)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        first = await add_key(client, kind, KEY_ONE)
        second = await add_key(client, kind, KEY_TWO)
        await send(client, "r1", "hello")
        frames = await run_events(client, "r1")
        assert names(frames)[:2] == ["chat.run.started", "chat.run.rotated"]
        assert names(frames)[-1] == "chat.run.completed"
        notice = frames[1]["payload"]
        assert notice["fromKeyId"] == first and notice["toKeyId"] == second
        assert notice["reason"] == ("auth" if status == 401 else "rate_limited")
        assert notice["status"] == status
        assert KEY_ONE not in str(notice) and KEY_TWO not in str(notice)
        final = frames[-1]["payload"]
        assert final["text"] == "".join(TEXTS)
        assert final["rotations"] == [
            {k: v for k, v in notice.items() if k not in ("runId", "sessionKey")}
        ]
        assert [auth_of(r) for r in llm.requests] == [KEY_ONE, KEY_TWO]

        described = await client.call("anima.providers.get", {"provider": kind})
        (entry,) = described["providers"]
        assert entry["activeKeyId"] == second
        statuses = {k["id"]: k["status"] for k in entry["keys"]}
        assert statuses == {first: "failing", second: "ok"}

        # The next run starts on the key that worked: no second rotation.
        await send(client, "r2", "again")
        frames = await run_events(client, "r2")
        assert "chat.run.rotated" not in names(frames)
        assert auth_of(llm.requests[-1]) == KEY_TWO


async def test_rotation_retries_only_once(start_gateway, connect, llm) -> None:
    llm.route("POST", "/v1/chat/completions", error_reply(401, "no key is good here"))
    config = provider_config(llm.base_url)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        for secret in (KEY_ONE, KEY_TWO, "sk-test-three-0123456789abcdefgh"):
            await add_key(client, "openai", secret)
        await send(client, "r1")
        frames = await run_events(client, "r1")
        assert names(frames) == ["chat.run.started", "chat.run.rotated", "chat.run.failed"]
        error = frames[-1]["payload"]["error"]
        assert error["code"] == 503
        assert error["details"] == {"providerError": "auth", "status": 401}
        assert "no key is good here" in error["message"]
        assert len(llm.requests) == 2


async def test_without_auto_rotation_a_refused_key_fails_the_run(
    start_gateway, connect, llm
) -> None:
    llm.route("POST", "/v1/chat/completions", error_reply(429, "slow down", [("Retry-After", "7")]))
    config = provider_config(llm.base_url, autoRotate=False)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        first = await add_key(client, "openai", KEY_ONE)
        await add_key(client, "openai", KEY_TWO)
        await send(client, "r1")
        frames = await run_events(client, "r1")
        assert names(frames) == ["chat.run.started", "chat.run.failed"]
        error = frames[-1]["payload"]["error"]
        assert error["code"] == 429
        assert error["reason"] == "RATE_LIMITED"
        assert error["retryAfterMs"] == 7000
        described = await client.call("anima.providers.get", {"provider": "openai"})
        assert described["providers"][0]["activeKeyId"] == first
        assert described["autoRotation"] is False


@pytest.mark.parametrize("kind", KINDS)
async def test_server_errors_and_broken_streams_fail_the_run(
    start_gateway, connect, llm, kind
) -> None:
    path, _ = stream_route(kind)
    pieces = openai_chunks(TEXTS) if kind == "openai" else anthropic_events(TEXTS)
    replies = iter([error_reply(500, "the model fell over"), Reply(body=pieces, cut_after=5)])
    llm.route("POST", path, lambda request: next(replies))
    config = provider_config(llm.base_url)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        await add_key(client, kind, KEY_ONE)
        await send(client, "r1")
        frames = await run_events(client, "r1")
        error = frames[-1]["payload"]["error"]
        assert names(frames) == ["chat.run.started", "chat.run.failed"]
        assert error["code"] == 503 and "the model fell over" in error["message"]
        assert error["details"]["providerError"] == "server"

        await send(client, "r2")
        frames = await run_events(client, "r2")
        assert frames[-1]["event"] == "chat.run.failed"
        error = frames[-1]["payload"]["error"]
        assert error["details"]["providerError"] == "bad_response"
        streamed = delta_text(frames)
        assert streamed and frames[-1]["payload"]["text"] == streamed
        history = await client.call("chat.history", {"sessionKey": SESSION})
        kept = history["messages"][-1]
        assert (kept["role"], kept["text"], kept["stopReason"]) == (
            "assistant",
            streamed,
            "error",
        )
        waited = await client.call("agent.wait", {"runId": "r2"})
        assert waited["status"] == "error" and waited["error"]["code"] == 503


async def test_a_run_past_its_time_limit_is_aborted(start_gateway, connect, llm) -> None:
    hold = trio.Event()
    pieces = openai_chunks(TEXTS)
    llm.route("POST", "/v1/chat/completions", Reply(body=[*pieces[:2], hold]))
    config = merge(
        provider_config(llm.base_url),
        {"plugins": {"chat": {"timeoutGraceMs": 0, "minRunMs": 0}}},
    )
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        await add_key(client, "openai", KEY_ONE)
        await send(client, "r1", timeoutMs=300)
        frames = await run_events(client, "r1")
        final = frames[-1]["payload"]
        assert final["aborted"] is True and final["stopReason"] == "timeout"
        assert final["text"] == TEXTS[0]
        with trio.fail_after(10):
            await llm.client_gone.wait()
        waited = await client.call("agent.wait", {"runId": "r1"})
        assert waited["status"] == "error" and waited["error"]["code"] == 504


async def test_a_provider_named_as_default_without_a_key_is_refused_before_the_ack(
    start_gateway, connect, llm
) -> None:
    config = provider_config(llm.base_url, defaultProvider="anthropic")
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        from kernel import GatewayError

        with pytest.raises(GatewayError) as refused:
            await send(client, "r1")
        assert refused.value.code == 503
        assert "no enabled API key" in refused.value.message
        history = await client.call("chat.history", {"sessionKey": SESSION})
        assert history["messages"] == []
