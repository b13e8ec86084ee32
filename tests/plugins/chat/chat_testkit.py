"""What the chat tests share: the plugin set, config builders and run-event collection.

Every gateway is real (127.0.0.1, port 0, SQLite in the test's tmp dir) and runs the real
sessions plugin next to the providers and chat plugins.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from fake_llm_server import Reply, anthropic_events, json_reply, openai_chunks

from kernel import (
    GatewayClient,
    ModelInfo,
    ModelRequest,
    StreamDone,
    TextDelta,
    TokenUsage,
    hookimpl,
)
from plugins.chat import ChatPlugin
from plugins.providers import ProvidersPlugin
from plugins.sessions import SessionsPlugin

SESSION = "agent:main:main"
FINAL_EVENTS = ("chat.run.completed", "chat.run.failed")
RUN_EVENTS = ("chat.run.started", "chat.delta", "chat.run.rotated", *FINAL_EVENTS)
TEXTS = ["Hel", "lo ", "from ", "the ", "fake ", "model."]
ANIMA_GATEWAY = str(Path(sys.executable).with_name("anima-gateway"))


class HeldProvider:
    """A test provider that says ``"first "`` and then waits for ``release`` to finish.

    Runs on it stay mid-stream for as long as a test needs, without any timing.
    """

    name = "held"
    display_name = "Held test provider"
    needs_key = False
    default_model = "held-1"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.open_streams = 0

    async def stream(self, request: ModelRequest) -> AsyncIterator[Any]:
        self.open_streams += 1
        try:
            yield TextDelta("first ")
            await self.release.wait()
            yield TextDelta("second")
            yield StreamDone(stop_reason="end_turn", usage=TokenUsage(1, 2), model=request.model)
        finally:
            self.open_streams -= 1

    async def list_models(self, api_key: str | None) -> list[ModelInfo]:
        return [ModelInfo(id="held-1", name="Held", provider=self.name)]

    async def aclose(self) -> None:
        pass


class HeldPlugin:
    def __init__(self) -> None:
        self.provider = HeldProvider()

    @hookimpl
    def anima_model_providers(self) -> list[HeldProvider]:
        return [self.provider]


#: Config that makes the held provider answer every run.
HELD_CONFIG = {"plugins": {"providers": {"defaultProvider": "held"}}}


def chat_plugins(**extra: object) -> dict[str, object]:
    return {
        "sessions": SessionsPlugin(),
        "providers": ProvidersPlugin(),
        "chat": ChatPlugin(),
        **extra,
    }


def provider_config(base_url: str, **providers: Any) -> dict[str, Any]:
    """Config pointing both HTTP providers at the fake server, plus ``providers`` keys."""
    section = {
        "openai": {"baseUrl": f"{base_url}/v1", "model": "gpt-test"},
        "anthropic": {"baseUrl": base_url, "model": "claude-test"},
        **providers,
    }
    return {"plugins": {"providers": section}}


def merge(*configs: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for config in configs:
        for name, section in config.get("plugins", {}).items():
            merged.setdefault("plugins", {}).setdefault(name, {}).update(section)
    return merged


async def add_key(client: GatewayClient, provider: str, secret: str, **fields: Any) -> str:
    result = await client.call(
        "anima.providers.set", {"provider": provider, "apiKey": secret, **fields}
    )
    return result["key"]["id"]


def stream_route(kind: str, texts: list[str] = TEXTS, **options: Any) -> tuple[str, Reply]:
    """The path and a streamed answer of ``texts`` for ``kind`` (openai or anthropic)."""
    if kind == "openai":
        return "/v1/chat/completions", Reply(body=openai_chunks(texts), **options)
    return "/v1/messages", Reply(body=anthropic_events(texts), **options)


def error_reply(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return json_reply(status, {"error": {"message": message}}, headers or [])


async def run_events(client: GatewayClient, run_id: str) -> list[dict[str, Any]]:
    """This run's event frames, up to and including its final one."""
    frames = []
    with trio.fail_after(30):
        while True:
            frame = await client.next_event()
            if (frame.get("payload") or {}).get("runId") != run_id:
                continue
            frames.append(frame)
            if frame["event"] in FINAL_EVENTS:
                return frames


async def send(
    client: GatewayClient, run_id: str, message: str = "hi", session: str = SESSION, **extra: Any
) -> dict[str, Any]:
    params = {"sessionKey": session, "message": message, "idempotencyKey": run_id, **extra}
    return await client.call("chat.send", params)


def names(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["event"] for frame in frames]


def delta_text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["payload"]["text"] for f in frames if f["event"] == "chat.delta")


# -- gateway subprocesses ------------------------------------------------------------------


class GatewayProcess:
    """``anima-gateway run`` in a child process; ``url`` once it printed its first screen."""

    def __init__(self, process: trio.Process, url: str, output: bytes) -> None:
        self.process = process
        self.url = url
        self.output = output


@asynccontextmanager
async def gateway_process(
    state_dir: Path, token: str, config: str | None = None
) -> AsyncIterator[GatewayProcess]:
    if config is not None:
        (state_dir / "config.toml").write_text(config)
    env = {**os.environ, "ANIMA_GATEWAY_TOKEN": token, "ANIMA_LOG_LEVEL": "WARNING"}
    process = await trio.lowlevel.open_process(
        [ANIMA_GATEWAY, "run", "--state-dir", str(state_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(30):
            while not (found := re.search(rb"url:\s+(ws://\S+)", output)):
                chunk = await process.stdout.receive_some()
                assert chunk, f"the gateway exited before serving: {output!r}"
                output += chunk
        yield GatewayProcess(process, found.group(1).decode(), output)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(10):
            await process.wait()
