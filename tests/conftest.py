"""Fixtures shared by the whole suite: a live gateway on 127.0.0.1, and clients for it.

Every gateway here is real: it listens on 127.0.0.1 port 0 (an ephemeral port), keeps its
state in the test's own temporary directory and accepts the token ``GATEWAY_TOKEN``, given
through ``ANIMA_GATEWAY_TOKEN`` as an operator would.

- ``start_gateway(...)``: an async context manager around ``kernel.open_gateway``; use it when
  a test needs its own plugins or config (``config=`` takes TOML text or a dict).
- ``gateway``: a gateway with the installed plugins (entry points) and the default config.
- ``connect(gateway, ...)``: ``kernel.open_client`` to that gateway with the token.
- ``raw_connect(gateway, ...)``: a client that is not ours, trio-websocket and plain JSON only,
  for what the kernel's own client would never send (junk, oversized frames, bad handshakes).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, open_websocket

from kernel import Gateway, GatewayClient, open_client, open_gateway

GATEWAY_TOKEN = "test-token-7f3a9c"
HOST = "127.0.0.1"
READ_ONLY = ("operator.read",)
ADMIN_SCOPES = ("operator.admin",)


def gateway_url(gateway: Gateway) -> str:
    return f"ws://{HOST}:{gateway.port}"


def write_config(state_dir: Path, config: str | dict[str, Any]) -> Path:
    """Write ``config.toml`` into ``state_dir``: TOML text as is, a dict through tomli-w."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "config.toml"
    path.write_text(config if isinstance(config, str) else tomli_w.dumps(config))
    return path


@pytest.fixture
def gateway_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ANIMA_GATEWAY_TOKEN", GATEWAY_TOKEN)
    monkeypatch.delenv("ANIMA_GATEWAY_PASSWORD", raising=False)
    monkeypatch.delenv("ANIMA_STATE_DIR", raising=False)
    return GATEWAY_TOKEN


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


StartGateway = Callable[..., AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def start_gateway(state_dir: Path, gateway_token: str) -> StartGateway:
    """``async with start_gateway(plugins=..., config=..., use_entry_points=...) as gw``."""

    @asynccontextmanager
    async def start(
        *,
        plugins: dict[str, object] | None = None,
        config: str | dict[str, Any] | None = None,
        use_entry_points: bool = True,
        state_dir: Path = state_dir,
    ) -> AsyncIterator[Gateway]:
        if config is not None:
            write_config(state_dir, config)
        async with open_gateway(
            state_dir=state_dir,
            plugins=plugins,
            use_entry_points=use_entry_points,
            host=HOST,
            port=0,
        ) as gateway:
            yield gateway

    return start


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> AsyncIterator[Gateway]:
    async with start_gateway() as running:
        yield running


Connect = Callable[..., AbstractAsyncContextManager[GatewayClient]]


@pytest.fixture
def connect(gateway_token: str) -> Connect:
    """``async with connect(gateway, scopes=..., role=..., mode=...) as client``."""

    def connect(gateway: Gateway, **kwargs: Any) -> AbstractAsyncContextManager[GatewayClient]:
        kwargs.setdefault("token", gateway_token)
        return open_client(gateway_url(gateway), **kwargs)

    return connect


def connect_params(
    *,
    token: str | None = GATEWAY_TOKEN,
    scopes: Sequence[str] = ADMIN_SCOPES,
    role: str = "operator",
    min_protocol: int = 3,
    max_protocol: int = 3,
    mode: str = "test",
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "minProtocol": min_protocol,
        "maxProtocol": max_protocol,
        "client": {"id": "test", "version": "0", "platform": "pytest", "mode": mode},
        "role": role,
        "scopes": list(scopes),
    }
    if token is not None:
        params["auth"] = {"token": token}
    return params


class RawClient:
    """A WebSocket speaking plain JSON, knowing nothing of the kernel's client.

    Frames read while waiting for something else are kept: events in ``events``, responses
    in ``responses`` (by id, every frame in arrival order).
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.challenge: dict[str, Any] = {}
        self.hello: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.responses: dict[str, list[dict[str, Any]]] = {}
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: Any) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.ws.send_message(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_message(data)

    async def receive(self) -> dict[str, Any]:
        frame = json.loads(await self.ws.get_message())
        self.frames.append(frame)
        if frame.get("type") == "evt":
            self.events.append(frame)
        elif frame.get("type") == "res":
            self.responses.setdefault(frame.get("id"), []).append(frame)
        return frame

    async def request(self, request_id: str, method: str, params: Any = None) -> None:
        frame: dict[str, Any] = {"type": "req", "id": request_id, "method": method}
        if params is not None:
            frame["params"] = params
        await self.send(frame)

    async def response(self, request_id: str, *, nth: int = 1) -> dict[str, Any]:
        """The ``nth`` response frame for ``request_id``, reading as far as needed."""
        while len(self.responses.get(request_id, ())) < nth:
            await self.receive()
        return self.responses[request_id][nth - 1]

    async def call(self, request_id: str, method: str, params: Any = None) -> dict[str, Any]:
        """Send a request and return its (next) response frame."""
        nth = len(self.responses.get(request_id, ())) + 1
        await self.request(request_id, method, params)
        return await self.response(request_id, nth=nth)

    async def event(self, name: str) -> dict[str, Any]:
        """The next event called ``name`` not yet looked at by this method."""
        seen = getattr(self, "_seen_events", 0)
        while True:
            while seen < len(self.events):
                frame = self.events[seen]
                seen += 1
                if frame.get("event") == name:
                    self._seen_events = seen
                    return frame
            self._seen_events = seen
            await self.receive()

    async def handshake(self, **params: Any) -> dict[str, Any]:
        """Send ``connect`` (see ``connect_params``) and return its response frame."""
        response = await self.call("connect", "connect", connect_params(**params))
        if response.get("ok"):
            self.hello = response["payload"]
        return response

    async def closed(self) -> CloseReason:
        """Read (and keep) frames until the server closes; return the close reason."""
        while True:
            try:
                await self.receive()
            except ConnectionClosed as exc:
                return exc.reason


RawConnect = Callable[..., AbstractAsyncContextManager[RawClient]]


@pytest.fixture
def raw_connect(gateway_token: str) -> RawConnect:
    """``async with raw_connect(gateway, handshake=True, **connect_params) as raw``."""

    @asynccontextmanager
    async def raw_connect(
        gateway: Gateway, *, handshake: bool = True, **params: Any
    ) -> AsyncIterator[RawClient]:
        async with open_websocket(
            HOST, gateway.port, "/", use_ssl=False, max_message_size=64 * 1024 * 1024
        ) as ws:
            raw = RawClient(ws)
            raw.challenge = json.loads(await ws.get_message())
            if handshake:
                response = await raw.handshake(**params)
                assert response["ok"], response
                # Start the test with clean records: only what follows the hello counts.
                raw.frames.clear()
                raw.responses.clear()
            yield raw

    return raw_connect
