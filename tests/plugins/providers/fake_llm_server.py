"""A small HTTP/1.1 server on trio sockets that plays scripted model-API answers.

The provider tests talk to a real server on 127.0.0.1 (port 0, learned through
``nursery.start``) so that they exercise httpx, the sockets and the close path exactly as
production does. Each route answers with a ``Reply``: a status, headers, and body pieces sent
one at a time, with optional pauses, gates (a ``trio.Event`` the test sets) and a deliberate
cut in the middle. One request per connection, answered with ``Connection: close``, keeps the
disconnect detection simple: once the request is read, EOF from the client can only mean it
hung up.
"""

from __future__ import annotations

import functools
import http
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import trio

__all__ = [
    "FakeLLMServer",
    "RecordedRequest",
    "Reply",
    "anthropic_events",
    "json_reply",
    "openai_chunks",
    "sse",
]

MAX_HEAD_BYTES = 64 * 1024

Framing = Literal["chunked", "close", "length"]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """A scripted answer.

    ``body`` pieces are bytes to send, or a ``trio.Event`` to wait for before going on; the
    pieces may be endless (``itertools.repeat``) unless ``framing`` is ``length``.
    ``cut_after`` drops the connection after that many pieces, leaving the body unfinished.
    """

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: Iterable[bytes | trio.Event] = ()
    framing: Framing = "chunked"
    delay_s: float = 0.0
    cut_after: int | None = None


Route = Reply | Callable[[RecordedRequest], Reply]


@dataclass
class FakeLLMServer:
    """Serves ``routes`` keyed by ``(method, path)``; records every request it reads.

    ``client_gone`` is set when a client disconnects before its reply was finished: a read
    returned EOF or a send failed. That is what an aborted stream must cause.
    """

    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    client_gone: trio.Event = field(default_factory=trio.Event)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, method: str, path: str, reply: Route) -> None:
        self.routes[(method, path)] = reply

    async def start(self, nursery: trio.Nursery) -> None:
        serve = functools.partial(trio.serve_tcp, self._serve_connection, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        self.port = listeners[0].socket.getsockname()[1]

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = await _read_request(stream)
            if request is None:
                return
            self.requests.append(request)
            route = self.routes.get((request.method, request.path))
            if route is None:
                reply = json_reply(404, {"error": {"message": f"no route {request.path}"}})
            else:
                reply = route(request) if callable(route) else route
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_for_hangup, stream, nursery.cancel_scope)
                try:
                    await _send_reply(stream, reply)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.client_gone.set()
                nursery.cancel_scope.cancel()

    async def _watch_for_hangup(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            data = await stream.receive_some()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.client_gone.set()
            scope.cancel()


def sse(data: str | dict[str, Any], event: str | None = None) -> bytes:
    """One server-sent event, JSON-encoding ``data`` when it is a dict."""
    text = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def json_reply(status: int, document: Any, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    return Reply(
        status=status,
        headers=[("Content-Type", "application/json"), *headers],
        body=[json.dumps(document).encode()],
        framing="length",
    )


def openai_chunks(
    texts: Iterable[str],
    *,
    finish_reason: str | None = "stop",
    usage: tuple[int, int] | None = (11, 7),
    model: str = "gpt-test",
    done: bool = True,
) -> list[bytes]:
    """The events of a chat-completions stream that says ``texts`` in order."""

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse(
            {"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
        )

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": text}, None) for text in texts)
    if finish_reason is not None:
        events.append(chunk({}, finish_reason))
    if usage is not None:
        prompt, completion = usage
        counts = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        events.append(sse({"id": "c1", "model": model, "choices": [], "usage": counts}))
    if done:
        events.append(b"data: [DONE]\n\n")
    return events


def anthropic_events(
    texts: Iterable[str],
    *,
    stop_reason: str = "end_turn",
    input_tokens: int = 25,
    output_tokens: int = 9,
    model: str = "claude-test",
    stop: bool = True,
) -> list[bytes]:
    """The events of a Messages API stream that says ``texts`` in order."""
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        },
    }
    events = [
        sse(start, "message_start"),
        sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        sse({"type": "ping"}, "ping"),
    ]
    for text in texts:
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": text},
        }
        events.append(sse(delta, "content_block_delta"))
    events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    events.append(
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
            "message_delta",
        )
    )
    if stop:
        events.append(sse({"type": "message_stop"}, "message_stop"))
    return events


async def _read_request(stream: trio.SocketStream) -> RecordedRequest | None:
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            return None
        data = await stream.receive_some()
        if not data:
            return None
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = bytearray(rest)
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        data = await stream.receive_some()
        if not data:
            return None
        body += data
    url = urlsplit(target)
    return RecordedRequest(method, url.path, dict(parse_qsl(url.query)), headers, bytes(body))


async def _send_reply(stream: trio.SocketStream, reply: Reply) -> None:
    pieces: Iterable[bytes | trio.Event] = reply.body
    head = [f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}"]
    head.extend(f"{name}: {value}" for name, value in reply.headers)
    if reply.framing == "chunked":
        head.append("Transfer-Encoding: chunked")
    elif reply.framing == "length":
        pieces = list(pieces)
        length = sum(len(piece) for piece in pieces if isinstance(piece, bytes))
        head.append(f"Content-Length: {length}")
    head.append("Connection: close")
    await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    sent = 0
    for piece in pieces:
        if reply.cut_after is not None and sent >= reply.cut_after:
            return
        if isinstance(piece, trio.Event):
            await piece.wait()
            continue
        await trio.sleep(reply.delay_s)
        if not piece:
            continue  # an empty chunk would end a chunked body
        if reply.framing == "chunked":
            piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        await stream.send_all(piece)
        sent += 1
    if reply.cut_after is not None:
        return
    if reply.framing == "chunked":
        await stream.send_all(b"0\r\n\r\n")
