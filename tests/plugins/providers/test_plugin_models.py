"""``models.list``, ``usage.status`` and ``usage.cost``, and the providers following config.

The HTTP providers point at ``FakeLLMServer`` (the ``llm_server`` fixture of this folder);
runs go through the real chat and sessions plugins so that usage is what runs recorded.
"""

from __future__ import annotations

import datetime as dt

import pytest
import trio
from fake_llm_server import Reply, anthropic_events, json_reply, openai_chunks

from kernel import GatewayError
from plugins.chat import ChatPlugin
from plugins.providers import ProvidersPlugin
from plugins.providers.backends.offline import OFFLINE_MODEL_ID
from plugins.sessions import SessionsPlugin

KEY = "sk-models-test-0123456789abcdefgh"
SESSION = "agent:main:main"


def plugins() -> dict[str, object]:
    return {"sessions": SessionsPlugin(), "providers": ProvidersPlugin(), "chat": ChatPlugin()}


def config_for(base_url: str, **section) -> dict:
    return {
        "plugins": {
            "providers": {
                "openai": {"baseUrl": f"{base_url}/v1", "model": "gpt-test"},
                "anthropic": {"baseUrl": base_url, "model": "claude-test"},
                **section,
            }
        }
    }


async def run_to_end(client, run_id: str, **params) -> dict:
    await client.call(
        "chat.send",
        {"sessionKey": SESSION, "message": "hello", "idempotencyKey": run_id, **params},
    )
    with trio.fail_after(30):
        while True:
            frame = await client.next_event()
            payload = frame.get("payload") or {}
            if payload.get("runId") == run_id and frame["event"] in (
                "chat.run.completed",
                "chat.run.failed",
            ):
                return frame


async def test_models_come_from_each_provider_and_errors_are_reported(
    start_gateway, connect, llm_server
) -> None:
    llm_server.route(
        "GET",
        "/v1/models",
        json_reply(200, {"data": [{"id": "gpt-a"}, {"id": "gpt-b", "context_length": 8192}]}),
    )
    # Anthropic's API root gets its own path, where this server has no listing.
    anthropic = {"baseUrl": f"{llm_server.base_url}/anthropic", "model": "claude-test"}
    config = config_for(llm_server.base_url, anthropic=anthropic)
    async with (
        start_gateway(plugins=plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as admin,
        connect(gw, scopes=("operator.read",)) as reader,
    ):
        await admin.call("anima.providers.set", {"provider": "openai", "apiKey": KEY})
        listing = await reader.call("models.list", {})
        ids = [(m["provider"], m["id"]) for m in listing["models"]]
        assert ids == [("offline", "offline-echo"), ("openai", "gpt-a"), ("openai", "gpt-b")]
        assert listing["models"][2]["contextWindow"] == 8192
        reports = {r["provider"]: r for r in listing["providers"]}
        assert reports["openai"]["ok"] is True and reports["openai"]["count"] == 2
        assert reports["anthropic"] == {
            "provider": "anthropic",
            "displayName": "Anthropic",
            "ok": False,
            "skipped": True,
            "error": "no API key configured",
        }
        assert listing["defaultProvider"] == "openai"
        assert listing["defaultModel"] == "gpt-test"
        (request,) = [r for r in llm_server.requests if r.path == "/v1/models"]
        assert request.headers["authorization"] == f"Bearer {KEY}"

        # Anthropic with a key but no listing on this server: the error is reported and
        # the configured model still shows.
        await admin.call("anima.providers.set", {"provider": "anthropic", "apiKey": KEY})
        listing = await reader.call("models.list", {})
        reports = {r["provider"]: r for r in listing["providers"]}
        assert reports["anthropic"]["ok"] is False
        assert "404" in reports["anthropic"]["error"]
        assert reports["anthropic"]["fallback"] == "configured model"
        assert ("anthropic", "claude-test") in [(m["provider"], m["id"]) for m in listing["models"]]
        assert KEY not in str(listing)


async def test_a_server_without_a_models_listing_is_reported_not_raised(
    start_gateway, connect, llm_server
) -> None:
    config = config_for(
        llm_server.base_url,
        compatible=[
            {"name": "local", "baseUrl": f"{llm_server.base_url}/local", "model": "llama-local"}
        ],
    )
    async with (
        start_gateway(plugins=plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        listing = await client.call("models.list", {})
        reports = {r["provider"]: r for r in listing["providers"]}
        # A keyless compatible endpoint is asked even without a key.
        assert reports["local"]["ok"] is False
        assert ("local", "llama-local") in [(m["provider"], m["id"]) for m in listing["models"]]
        with pytest.raises(GatewayError) as refused:
            await client.call("models.list", {"provider": "x"})
        assert refused.value.code == 400


async def test_a_keyless_compatible_endpoint_can_be_the_default(
    start_gateway, connect, llm_server
) -> None:
    llm_server.route("POST", "/local/chat/completions", Reply(body=openai_chunks(["local ", "ok"])))
    config = config_for(
        llm_server.base_url,
        defaultProvider="local",
        compatible=[
            {"name": "local", "baseUrl": f"{llm_server.base_url}/local", "model": "llama-local"}
        ],
    )
    async with (
        start_gateway(plugins=plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        final = await run_to_end(client, "r1")
        assert final["payload"]["provider"] == "local"
        assert final["payload"]["text"] == "local ok"
        (request,) = llm_server.requests
        assert "authorization" not in request.headers
        assert request.json()["model"] == "llama-local"


async def test_usage_and_cost_add_up_recorded_runs(start_gateway, connect, llm_server) -> None:
    llm_server.route("POST", "/v1/chat/completions", Reply(body=openai_chunks(["a", "b"])))
    llm_server.route("POST", "/v1/messages", Reply(body=anthropic_events(["c"])))
    prices = {"openai/gpt-test": {"input": 2.0, "output": 8.0}}
    config = config_for(llm_server.base_url, prices=prices)
    async with (
        start_gateway(plugins=plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as admin,
        connect(gw, scopes=("operator.read",)) as reader,
    ):
        offline = await run_to_end(admin, "off-1")
        offline_usage = offline["payload"]["usage"]
        await admin.call("anima.providers.set", {"provider": "openai", "apiKey": KEY})
        for n in range(2):
            final = await run_to_end(admin, f"oa-{n}")
            assert final["payload"]["usage"] == {"inputTokens": 11, "outputTokens": 7}
        await admin.call(
            "anima.providers.set", {"provider": "openai", "keyId": "x", "apiKey": KEY + "2"}
        )
        await admin.call("anima.providers.set", {"provider": "anthropic", "apiKey": KEY})

        cost = await reader.call("usage.cost", {})
        assert cost["days"] == 30 and cost["currency"] == "USD"
        totals = cost["totals"]
        assert totals["runs"] == 3
        assert totals["inputTokens"] == 22 + offline_usage["inputTokens"]
        assert totals["outputTokens"] == 14 + offline_usage["outputTokens"]
        assert totals["cost"] == pytest.approx((22 * 2.0 + 14 * 8.0) / 1_000_000)
        by_model = {(m["provider"], m["model"]): m for m in cost["byModel"]}
        assert by_model[("openai", "gpt-test")]["priced"] is True
        assert by_model[("offline", "offline-echo")]["cost"] == 0
        assert cost["unpricedModels"] == []
        today = dt.datetime.now(dt.UTC).date().isoformat()
        assert cost["daily"][-1]["date"] == today
        assert cost["daily"][-1]["runs"] == 3
        assert sum(day["runs"] for day in cost["daily"]) == 3

        one_day = await reader.call("usage.cost", {"startDate": today, "endDate": today})
        assert one_day["days"] == 1 and one_day["totals"]["runs"] == 3
        long_ago = await reader.call(
            "usage.cost", {"startDate": "2001-01-01", "endDate": "2001-01-31"}
        )
        assert long_ago["totals"]["runs"] == 0 and long_ago["days"] == 31

        status = await reader.call("usage.status", {})
        rows = {p["provider"]: p for p in status["providers"]}
        day = next(w for w in rows["openai"]["windows"] if w["label"] == "24h")
        assert day == {"label": "24h", "inputTokens": 22, "outputTokens": 14, "runs": 2}
        assert rows["openai"]["keys"]["count"] == 2
        assert rows["anthropic"]["keys"]["count"] == 1
        assert next(w for w in rows["anthropic"]["windows"] if w["label"] == "30d")["runs"] == 0


async def test_cost_names_models_without_a_price(start_gateway, connect, llm_server) -> None:
    llm_server.route("POST", "/v1/chat/completions", Reply(body=openai_chunks(["a"])))
    config = config_for(llm_server.base_url, prices={"other-model": {"input": 1, "output": 1}})
    async with (
        start_gateway(plugins=plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as admin,
    ):
        await admin.call("anima.providers.set", {"provider": "openai", "apiKey": KEY})
        await run_to_end(admin, "r1")
        cost = await admin.call("usage.cost", {"days": 1})
        assert cost["unpricedModels"] == ["openai/gpt-test"]
        assert cost["totals"]["cost"] == 0 and cost["totals"]["runs"] == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"startDate": "2026-01-01"}, "endDate"),
        ({"endDate": "2026-01-01"}, "startDate"),
        ({"startDate": "2026-01-31", "endDate": "2026-01-01"}, "endDate"),
        ({"startDate": "2026-1-1", "endDate": "2026-01-02"}, "startDate"),
        ({"startDate": "2026-02-30", "endDate": "2026-03-01"}, "startDate"),
        ({"startDate": "yesterday", "endDate": "2026-03-01"}, "startDate"),
        ({"startDate": "2020-01-01", "endDate": "2026-01-01"}, "endDate"),
        ({"startDate": "2026-01-01", "endDate": "2026-01-02", "days": 3}, "days"),
        ({"days": 0}, "days"),
        ({"days": 367}, "days"),
        ({"days": "7"}, "days"),
        ({"since": 1}, "since"),
    ],
)
async def test_usage_cost_refuses_bad_ranges(start_gateway, connect, params, field) -> None:
    async with (
        start_gateway(plugins=plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        with pytest.raises(GatewayError) as refused:
            await client.call("usage.cost", params)
        assert refused.value.code == 400
        assert refused.value.details == {"field": field}, refused.value


@pytest.mark.parametrize("method", ["models.list", "usage.status"])
async def test_parameterless_methods_refuse_params(start_gateway, connect, method) -> None:
    async with (
        start_gateway(plugins=plugins(), use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        with pytest.raises(GatewayError) as refused:
            await client.call(method, {"limit": 3})
        assert refused.value.code == 400
        assert refused.value.details == {"field": "limit"}


async def test_usage_needs_the_sessions_service(start_gateway, connect) -> None:
    async with (
        start_gateway(plugins={"providers": ProvidersPlugin()}, use_entry_points=False) as gateway,
        connect(gateway) as client,
    ):
        for method in ("usage.status", "usage.cost"):
            with pytest.raises(GatewayError) as refused:
                await client.call(method, {})
            assert refused.value.code == 503


async def test_a_config_change_rebuilds_the_provider_it_touches(
    start_gateway, connect, llm_server, nursery
) -> None:
    from fake_llm_server import FakeLLMServer

    second = FakeLLMServer()
    await second.start(nursery)
    for server, word in ((llm_server, "first"), (second, "second")):
        server.route("POST", "/v1/chat/completions", Reply(body=openai_chunks([word])))
    providers = ProvidersPlugin()
    all_plugins = {"sessions": SessionsPlugin(), "providers": providers, "chat": ChatPlugin()}
    config = config_for(llm_server.base_url)
    async with (
        start_gateway(plugins=all_plugins, config=config, use_entry_points=False) as gw,
        connect(gw) as client,
    ):
        await client.call("anima.providers.set", {"provider": "openai", "apiKey": KEY})
        anthropic_before = providers.all_providers()["anthropic"]
        assert (await run_to_end(client, "r1"))["payload"]["text"] == "first"
        raw = gw.services.config.raw()
        raw["plugins"]["providers"]["openai"]["baseUrl"] = f"{second.base_url}/v1"
        await gw.services.config.replace(raw)
        assert (await run_to_end(client, "r2"))["payload"]["text"] == "second"
        assert providers.all_providers()["anthropic"] is anthropic_before


async def test_sessions_list_names_the_default_model(start_gateway, connect, llm_server) -> None:
    config = config_for(llm_server.base_url)
    async with (
        start_gateway(plugins=plugins(), config=config, use_entry_points=False) as gw,
        connect(gw) as admin,
    ):
        listing = await admin.call("sessions.list", {})
        assert listing["defaults"] == {
            "modelProvider": "offline",
            "model": OFFLINE_MODEL_ID,
            "contextTokens": None,
        }
        await admin.call("anima.providers.set", {"provider": "openai", "apiKey": KEY})
        listing = await admin.call("sessions.list", {})
        assert listing["defaults"]["modelProvider"] == "openai"
        assert listing["defaults"]["model"] == "gpt-test"
