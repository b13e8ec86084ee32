"""Tests for the example plugin against a real gateway.

Each test starts a kernel in-process with ``kernel.open_gateway`` (127.0.0.1, port 0, a fresh
state directory from ``tmp_path``) and talks to it over a real WebSocket through
``kernel.open_client``, the way any client would. Most tests hand the plugin object to the
gateway directly (``use_entry_points=False``), so they test this plugin alone; one loads it
through its entry point, which needs the project installed (``pip install -e .``).

pytest-trio runs the ``async def`` tests (``trio_mode = true`` in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from kernel import Gateway, GatewayError, GatewayStartupError, open_client, open_gateway

from anima_plugin_example import ExamplePlugin

TOKEN = "example-plugin-test-token"


@pytest.fixture(autouse=True)
def gateway_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # The gateway prefers this variable over any token in config or in the state directory,
    # so every test knows the token without reading files.
    monkeypatch.setenv("ANIMA_GATEWAY_TOKEN", TOKEN)


@asynccontextmanager
async def example_gateway(state_dir: Path) -> AsyncIterator[Gateway]:
    """A gateway serving the example plugin and nothing else."""
    async with open_gateway(
        state_dir=state_dir,
        port=0,
        plugins={"example": ExamplePlugin()},
        use_entry_points=False,
    ) as gateway:
        yield gateway


def url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}"


def write_config(state_dir: Path, text: str) -> None:
    (state_dir / "config.toml").write_text(text, encoding="utf-8")


async def test_echo_answers_with_the_greeting_and_emits_an_event(tmp_path: Path) -> None:
    async with example_gateway(tmp_path) as gateway, open_client(url(gateway), token=TOKEN) as c:
        payload = await c.call("example.echo", {"text": "ping", "repeat": 2})
        # The event was written before the response, so it is already queued client-side.
        events = [e for e in c.events_nowait() if e["event"] == "example.echoed"]

    assert payload == {"text": "hello, ping ping", "greeting": "hello", "length": 9}
    assert len(events) == 1
    (event,) = events
    assert event["payload"]["length"] == 9
    assert event["payload"]["repeat"] == 2
    assert isinstance(event["seq"], int) and event["seq"] >= 1


async def test_hello_advertises_the_method_and_the_event(tmp_path: Path) -> None:
    async with example_gateway(tmp_path) as gateway, open_client(url(gateway), token=TOKEN) as c:
        features = c.hello["features"]

    assert "example.echo" in features["methods"]
    assert "example.echoed" in features["events"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "text"),
        ({"text": ""}, "text"),
        ({"text": 42}, "text"),
        ({"text": "ping", "repeat": 0}, "repeat"),
        ({"text": "ping", "repeat": 6}, "repeat"),
        ({"text": "ping", "colour": "red"}, "colour"),
    ],
)
async def test_bad_params_are_a_400_naming_the_field(
    tmp_path: Path, params: dict, field: str
) -> None:
    async with example_gateway(tmp_path) as gateway, open_client(url(gateway), token=TOKEN) as c:
        with pytest.raises(GatewayError) as refused:
            await c.call("example.echo", params)
        # The connection survives a bad request.
        assert (await c.call("example.echo", {"text": "still here"}))["length"] == 10

    assert refused.value.code == 400
    assert refused.value.reason == "INVALID_REQUEST"
    assert refused.value.details == {"field": field}
    assert field in refused.value.message


async def test_a_caller_without_read_scope_is_refused_and_not_sent_the_event(
    tmp_path: Path,
) -> None:
    async with (
        example_gateway(tmp_path) as gateway,
        open_client(url(gateway), token=TOKEN, scopes=[]) as c,
    ):
        with pytest.raises(GatewayError) as refused:
            await c.call("example.echo", {"text": "ping"})
        features = c.hello["features"]

    assert refused.value.code == 403
    assert "operator.read" in refused.value.message
    assert "example.echo" not in features["methods"]
    assert "example.echoed" not in features["events"]


async def test_the_config_section_is_read(tmp_path: Path) -> None:
    write_config(tmp_path, '[plugins.example]\ngreeting = "hi"\nmaxLength = 5\n')
    async with example_gateway(tmp_path) as gateway, open_client(url(gateway), token=TOKEN) as c:
        payload = await c.call("example.echo", {"text": "abcde"})
        with pytest.raises(GatewayError) as refused:
            await c.call("example.echo", {"text": "abcdef"})

    assert payload["text"] == "hi, abcde"
    assert refused.value.code == 400
    assert refused.value.details == {"field": "text"}
    assert "plugins.example.maxLength" in refused.value.message


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("maxLength = 0", "plugins.example.maxLength"),
        ('maxLength = "long"', "plugins.example.maxLength"),
        ("greeting = 5", "plugins.example.greeting"),
        ('colour = "red"', "plugins.example.colour"),
    ],
)
async def test_a_bad_config_value_stops_start_up_naming_the_key(
    tmp_path: Path, table: str, key: str
) -> None:
    write_config(tmp_path, f"[plugins.example]\n{table}\n")
    with pytest.raises(GatewayStartupError) as failed:
        async with example_gateway(tmp_path):
            pytest.fail("the gateway started with a bad config")

    assert str(failed.value).startswith(f"{key}:")


async def test_enabled_false_leaves_the_plugin_out(tmp_path: Path) -> None:
    write_config(tmp_path, "[plugins.example]\nenabled = false\n")
    async with example_gateway(tmp_path) as gateway, open_client(url(gateway), token=TOKEN) as c:
        with pytest.raises(GatewayError) as refused:
            await c.call("example.echo", {"text": "ping"})

    assert refused.value.code == 404


async def test_the_entry_point_loads_the_plugin(tmp_path: Path) -> None:
    async with (
        open_gateway(state_dir=tmp_path, port=0, use_entry_points=True) as gateway,
        open_client(url(gateway), token=TOKEN) as c,
    ):
        infos = {info.name: info for info in gateway.plugin_infos}
        assert "example" in infos, "no entry point: run `pip install -e .` in plugin-template"
        assert infos["example"].state == "loaded", infos["example"].error
        payload = await c.call("example.echo", {"text": "ping"})

    assert infos["example"].source == "entry point anima_plugin_example:ExamplePlugin"
    assert infos["example"].methods == ["example.echo"]
    assert infos["example"].events == ["example.echoed"]
    assert payload["text"] == "hello, ping"
