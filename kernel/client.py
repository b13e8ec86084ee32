"""A small trio client for the gateway, shared by the CLI, the tests and embedding hosts.

``open_client`` connects, answers the challenge with ``connect`` and returns a client whose
``call`` sends a request and waits for its response while events are queued for
``next_event``. Requests may overlap; responses are matched by id.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from .errors import GatewayError

__all__ = ["GatewayClient", "HandshakeRefused", "open_client"]

logger = logging.getLogger(__name__)

DEFAULT_SCOPES = ("operator.admin", "operator.read", "operator.write")


class HandshakeRefused(Exception):
    """The gateway refused ``connect``; ``error`` is its answer, ``close_code`` its close."""

    def __init__(self, error: GatewayError | None, close_code: int | None, reason: str | None):
        super().__init__(error.message if error else f"closed {close_code} {reason or ''}")
        self.error = error
        self.close_code = close_code
        self.close_reason = reason


def _error_from(shape: dict[str, Any]) -> GatewayError:
    return GatewayError(
        int(shape.get("code", 500)),
        str(shape.get("message", "")),
        reason=shape.get("reason"),
        details=shape.get("details"),
        retryable=shape.get("retryable"),
        retry_after_ms=shape.get("retryAfterMs"),
    )


class GatewayClient:
    """A connected, handshaken client. Build it with ``open_client``."""

    def __init__(self, ws: WebSocketConnection, *, max_events: int = 10_000) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.challenge: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events = trio.open_memory_channel[dict[str, Any]](max_events)
        self.dropped_events = 0

    async def _receive_loop(self) -> None:
        try:
            while True:
                frame = msgspec.json.decode(await self.ws.get_message())
                kind = frame.get("type")
                if kind == "res":
                    waiter = self._pending.get(frame.get("id"))
                    if waiter is not None:
                        waiter.send_nowait(frame)
                elif kind == "evt":
                    try:
                        self._events_send.send_nowait(frame)
                    except trio.WouldBlock:
                        self.dropped_events += 1
        except ConnectionClosed:
            pass
        finally:
            self._events_send.close()
            for waiter in self._pending.values():
                waiter.close()

    async def request(self, method: str, params: Any = None, *, responses: int = 1) -> list[dict]:
        """Send one request and return its raw response frames (two for two-phase calls)."""
        request_id = str(next(self._ids))
        send, receive = trio.open_memory_channel[dict[str, Any]](responses)
        self._pending[request_id] = send
        frame: dict[str, Any] = {"type": "req", "id": request_id, "method": method}
        if params is not None:
            frame["params"] = params
        try:
            await self.ws.send_message(msgspec.json.encode(frame).decode())
            frames = []
            for _ in range(responses):
                try:
                    frames.append(await receive.receive())
                except trio.EndOfChannel:
                    raise ConnectionClosed(self.ws.closed) from None
            return frames
        finally:
            del self._pending[request_id]

    async def call(self, method: str, params: Any = None) -> Any:
        """Call a method and return its payload, or raise ``GatewayError``."""
        (frame,) = await self.request(method, params)
        if not frame.get("ok"):
            raise _error_from(frame.get("error") or {})
        return frame.get("payload")

    async def next_event(self, name: str | None = None) -> dict[str, Any]:
        """The next event frame (of ``name``, skipping others when given)."""
        while True:
            frame = await self._events.receive()
            if name is None or frame.get("event") == name:
                return frame

    def events_nowait(self) -> list[dict[str, Any]]:
        frames = []
        while True:
            try:
                frames.append(self._events.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return frames


def connect_params(
    *,
    token: str | None = None,
    password: str | None = None,
    scopes: Sequence[str] = DEFAULT_SCOPES,
    role: str = "operator",
    client_id: str = "cli",
    mode: str = "cli",
    device: dict[str, Any] | None = None,
    min_protocol: int = 3,
    max_protocol: int = 3,
) -> dict[str, Any]:
    from .gateway import gateway_version

    params: dict[str, Any] = {
        "minProtocol": min_protocol,
        "maxProtocol": max_protocol,
        "client": {
            "id": client_id,
            "version": gateway_version(),
            "platform": "python",
            "mode": mode,
        },
        "role": role,
        "scopes": list(scopes),
    }
    auth = {k: v for k, v in (("token", token), ("password", password)) if v}
    if auth:
        params["auth"] = auth
    if device is not None:
        params["device"] = device
    return params


@asynccontextmanager
async def open_client(
    url: str,
    *,
    token: str | None = None,
    password: str | None = None,
    scopes: Sequence[str] = DEFAULT_SCOPES,
    role: str = "operator",
    client_id: str = "cli",
    mode: str = "cli",
    device_signer: Any = None,
    extra_headers: Sequence[tuple[str, str]] | None = None,
    max_message_size: int = 64 * 1024 * 1024,
) -> AsyncIterator[GatewayClient]:
    """Connect and handshake; raise ``HandshakeRefused`` when the gateway says no.

    :param device_signer: ``callable(nonce) -> device block dict``, to prove a device
        identity (see ``kernel.device_identity.sign_device_proof``).
    """
    headers = [(k.encode(), v.encode()) for k, v in (extra_headers or ())] or None
    async with open_websocket_url(
        url, extra_headers=headers, max_message_size=max_message_size
    ) as ws:
        client = GatewayClient(ws)
        challenge = msgspec.json.decode(await ws.get_message())
        client.challenge = challenge.get("payload") or {}
        device = device_signer(client.challenge.get("nonce")) if device_signer else None
        params = connect_params(
            token=token,
            password=password,
            scopes=scopes,
            role=role,
            client_id=client_id,
            mode=mode,
            device=device,
        )
        await ws.send_message(
            msgspec.json.encode(
                {"type": "req", "id": "connect", "method": "connect", "params": params}
            ).decode()
        )
        try:
            answer = msgspec.json.decode(await ws.get_message())
        except ConnectionClosed as closed:
            reason = closed.reason
            raise HandshakeRefused(
                None, reason.code if reason else None, reason.reason if reason else None
            ) from None
        if not answer.get("ok"):
            error = _error_from(answer.get("error") or {})
            code = reason_text = None
            with trio.move_on_after(2):
                try:
                    await ws.get_message()
                except ConnectionClosed as closed:
                    if closed.reason:
                        code, reason_text = closed.reason.code, closed.reason.reason
            raise HandshakeRefused(error, code, reason_text)
        client.hello = answer["payload"]
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._receive_loop)
            try:
                yield client
            except Exception as exc:
                # Re-raised below, outside the nursery: raised inside it, the caller's own
                # exception (a GatewayError from ``call``) would come back in an exception group.
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
