"""``agent`` (two answers on one request id), ``agent.wait``, ``agent.identity.get``, and a
third party's model provider used for runs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from chat_testkit import (
    HELD_CONFIG,
    SESSION,
    TEXTS,
    HeldPlugin,
    add_key,
    chat_plugins,
    provider_config,
    run_events,
    send,
)
from fake_llm_server import Reply, openai_chunks

from kernel import (
    GatewayError,
    ModelInfo,
    ModelRequest,
    StreamDone,
    StreamEvent,
    TextDelta,
    TokenUsage,
    hookimpl,
)

WRITER = ("operator.read", "operator.write")


async def test_agent_answers_twice_on_one_request_id(start_gateway, raw_connect) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gateway,
        raw_connect(gateway, scopes=WRITER) as raw,
    ):
        params = {"message": "do the thing", "idempotencyKey": "agent-1"}
        await raw.request("a1", "agent", params)
        accepted = await raw.response("a1", nth=1)
        assert accepted["ok"], accepted
        assert accepted["payload"]["status"] == "accepted"
        assert accepted["payload"]["runId"] == "agent-1"
        assert isinstance(accepted["payload"]["acceptedAt"], int)
        with trio.fail_after(30):
            final = await raw.response("a1", nth=2)
        assert final["ok"], final
        payload = final["payload"]
        assert payload["runId"] == "agent-1"
        assert payload["status"] == "ok" and payload["summary"] == "completed"
        assert "do the thing" in payload["result"]["text"]
        assert payload["result"]["provider"] == "offline"

        # The run was bound to the default session and streamed as chat events too.
        kinds = [
            e["event"] for e in raw.events if (e.get("payload") or {}).get("runId") == "agent-1"
        ]
        assert kinds[0] == "chat.run.started" and kinds[-1] == "chat.run.completed"
        history = await raw.call("h", "chat.history", {"sessionKey": SESSION})
        assert [m["role"] for m in history["payload"]["messages"]] == ["user", "assistant"]

        # A repeat of the key gets the same two answers, and no second run.
        await raw.request("a2", "agent", {**params, "message": "something else"})
        again_accepted = await raw.response("a2", nth=1)
        again_final = await raw.response("a2", nth=2)
        assert again_accepted["payload"] == accepted["payload"]
        assert again_final["payload"] == payload
        history = await raw.call("h2", "chat.history", {"sessionKey": SESSION})
        assert len(history["payload"]["messages"]) == 2

        waited = await raw.call("w", "agent.wait", {"runId": "agent-1"})
        assert waited["payload"]["status"] == "ok"
        assert waited["payload"]["startedAt"] <= waited["payload"]["endedAt"]


async def test_agent_wait_times_out_then_sees_the_end(start_gateway, connect, llm) -> None:
    hold = trio.Event()
    pieces = openai_chunks(TEXTS)
    llm.route("POST", "/v1/chat/completions", Reply(body=[*pieces[:2], hold, *pieces[2:]]))
    config = provider_config(llm.base_url)
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
        connect(gw) as waiter,
    ):
        await add_key(client, "openai", "sk-agent-test-0123456789abcdefgh")
        outcome: dict = {}

        async def run_agent() -> None:
            outcome["final"] = await client.request(
                "agent",
                {"message": "slow one", "idempotencyKey": "slow", "sessionKey": "main"},
                responses=2,
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_agent)
            with trio.fail_after(30):
                await waiter.next_event("chat.delta")
            early = await waiter.call("agent.wait", {"runId": "slow", "timeoutMs": 50})
            assert early == {"runId": "slow", "status": "timeout"}
            hold.set()
            done = await waiter.call("agent.wait", {"runId": "slow", "timeoutMs": 30_000})
            assert done["status"] == "ok"
        accepted, final = outcome["final"]
        assert accepted["payload"]["status"] == "accepted"
        assert final["payload"]["result"]["text"] == "".join(TEXTS)


async def test_an_aborted_agent_run_ends_its_request(start_gateway, connect) -> None:
    async with (
        start_gateway(
            plugins=chat_plugins(held=HeldPlugin()), config=HELD_CONFIG, use_entry_points=False
        ) as gateway,
        connect(gateway) as client,
        connect(gateway) as other,
    ):
        outcome: dict = {}

        async def run_agent() -> None:
            outcome["frames"] = await client.request(
                "agent",
                {"message": "go", "idempotencyKey": "ag", "sessionKey": SESSION},
                responses=2,
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_agent)
            with trio.fail_after(30):
                await other.next_event("chat.delta")
            result = await other.call("chat.abort", {"sessionKey": SESSION})
            assert result["runIds"] == ["ag"]
        final = outcome["frames"][1]
        assert final["ok"] and final["payload"]["status"] == "aborted"
        assert final["payload"]["result"] == {"text": "first ", "stopReason": "rpc"}


async def test_agent_identity_comes_from_config(start_gateway, connect) -> None:
    config = {
        "plugins": {
            "chat": {"identity": {"name": "Nox", "emoji": "🦉", "avatar": "https://x.test/a.png"}}
        }
    }
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw, scopes=("operator.read",)) as reader,
    ):
        identity = await reader.call("agent.identity.get", {})
        assert identity == {
            "agentId": "main",
            "name": "Nox",
            "emoji": "🦉",
            "avatar": "https://x.test/a.png",
        }
        by_session = await reader.call("agent.identity.get", {"sessionKey": "agent:Helper:main"})
        assert by_session["agentId"] == "helper"
        both = await reader.call(
            "agent.identity.get", {"agentId": "helper", "sessionKey": "agent:helper:x"}
        )
        assert both["agentId"] == "helper"


async def test_identity_config_is_validated(start_gateway) -> None:
    from kernel import GatewayStartupError

    config = {"plugins": {"chat": {"identity": {"name": ""}}}}
    with pytest.raises(GatewayStartupError, match=r"plugins\.chat\.identity\.name"):
        async with start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False):
            pass


# -- a third party's provider ---------------------------------------------------------------


class ShoutingProvider:
    """A provider from another distribution: answers with the last message in capitals."""

    name = "shout"
    display_name = "Shouting provider"
    needs_key = False
    default_model = "shout-1"

    def __init__(self) -> None:
        self.requests: list[ModelRequest] = []
        self.closed = 0

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        self.requests.append(request)
        for word in request.messages[-1].content.upper().split():
            await trio.sleep(0)
            yield TextDelta(word + " ")
        yield StreamDone(stop_reason="shouted", usage=TokenUsage(1, 2), model=request.model)

    async def list_models(self, api_key: str | None) -> list[ModelInfo]:
        return [ModelInfo(id="shout-1", name="Shout one", provider=self.name)]

    async def aclose(self) -> None:
        self.closed += 1


class ShoutingPlugin:
    def __init__(self) -> None:
        self.provider = ShoutingProvider()

    @hookimpl
    def anima_model_providers(self) -> list[ShoutingProvider]:
        return [self.provider]


async def test_a_third_party_provider_serves_runs_and_listings(start_gateway, connect) -> None:
    shouting = ShoutingPlugin()
    plugins = chat_plugins(shouting=shouting)
    async with (
        start_gateway(plugins=plugins, use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        frames = await client.request(
            "agent",
            {"message": "quiet please", "idempotencyKey": "s1", "model": "shout/shout-9"},
            responses=2,
        )
        result = frames[1]["payload"]["result"]
        assert result["text"] == "QUIET PLEASE "
        assert (result["provider"], result["model"]) == ("shout", "shout-9")
        assert shouting.provider.requests[-1].model == "shout-9"

        listing = await client.call("models.list", {})
        assert {"id": "shout-1", "name": "Shout one", "provider": "shout"} in listing["models"]
        described = await client.call("anima.providers.get", {"provider": "shout"})
        assert described["providers"][0]["kind"] == "plugin"

        # A chat without a model still gets the default (offline): the third party is
        # only used when asked for, or when config makes it the default.
        await send(client, "c1", "hello")
        frames = await run_events(client, "c1")
        assert frames[-1]["payload"]["provider"] == "offline"
        assert shouting.provider.closed == 0
    # The provider protocol's aclose, once, at shutdown.
    assert shouting.provider.closed == 1


async def test_a_third_party_provider_can_be_the_default(start_gateway, connect) -> None:
    config = {"plugins": {"providers": {"defaultProvider": "shout"}}}
    plugins = chat_plugins(shouting=ShoutingPlugin())
    async with (
        start_gateway(plugins=plugins, config=config, use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        await send(client, "c1", "make some noise")
        frames = await run_events(client, "c1")
        final = frames[-1]["payload"]
        assert (final["provider"], final["model"], final["text"]) == (
            "shout",
            "shout-1",
            "MAKE SOME NOISE ",
        )


async def test_a_default_provider_that_is_not_installed_is_a_503(start_gateway, connect) -> None:
    config = {"plugins": {"providers": {"defaultProvider": "shout"}}}
    async with (
        start_gateway(plugins=chat_plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        with pytest.raises(GatewayError) as refused:
            await send(client, "c1")
        assert refused.value.code == 503
        assert "defaultProvider" in refused.value.message


async def test_a_sessions_model_answers_its_runs(start_gateway, connect) -> None:
    shouting = ShoutingPlugin()
    async with (
        start_gateway(plugins=chat_plugins(shouting=shouting), use_entry_points=False) as gw,
        connect(gw) as admin,
    ):
        await send(admin, "before", "quiet")
        assert (await run_events(admin, "before"))[-1]["payload"]["provider"] == "offline"
        await admin.call("sessions.patch", {"key": SESSION, "model": "shout/shout-2"})
        ack = await send(admin, "after", "now loud")
        assert (ack["provider"], ack["model"]) == ("shout", "shout-2")
        final = (await run_events(admin, "after"))[-1]["payload"]
        assert (final["provider"], final["model"], final["text"]) == (
            "shout",
            "shout-2",
            "NOW LOUD ",
        )
        # A model named in the request wins over the session's.
        frames = await admin.request(
            "agent",
            {"message": "x", "idempotencyKey": "a1", "sessionKey": SESSION, "model": "offline/o"},
            responses=2,
        )
        assert frames[1]["payload"]["result"]["provider"] == "offline"


async def test_a_session_whose_send_policy_is_deny_takes_no_message(start_gateway, connect) -> None:
    async with (
        start_gateway(plugins=chat_plugins(), use_entry_points=False) as gw,
        connect(gw) as admin,
    ):
        await send(admin, "r0", "allowed")
        await run_events(admin, "r0")
        await admin.call("sessions.patch", {"key": SESSION, "sendPolicy": "deny"})
        with pytest.raises(GatewayError) as blocked:
            await send(admin, "r1", "blocked")
        assert blocked.value.code == 403
        assert blocked.value.message == "send blocked by session policy"
        assert blocked.value.details["field"] == "sessionKey"
        with pytest.raises(GatewayError) as blocked_agent:
            await admin.call(
                "agent", {"message": "x", "idempotencyKey": "a1", "sessionKey": SESSION}
            )
        assert blocked_agent.value.code == 403
        # Stopping is still allowed, and other sessions are not affected.
        assert (await send(admin, "s1", "stop"))["ok"] is True
        await send(admin, "o1", "elsewhere", session="agent:main:other")
        await run_events(admin, "o1")
        history = await admin.call("chat.history", {"sessionKey": SESSION})
        assert [m["runId"] for m in history["messages"]] == ["r0", "r0"]

        await admin.call("sessions.patch", {"key": SESSION, "sendPolicy": None})
        await send(admin, "r1", "allowed again")
        assert (await run_events(admin, "r1"))[-1]["event"] == "chat.run.completed"
