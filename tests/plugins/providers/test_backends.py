"""Tests for the built-in model providers and their shared SSE and HTTP plumbing.

The HTTP providers are driven against ``FakeLLMServer``, a real HTTP/1.1 server on 127.0.0.1
started in the test's nursery, so reads, cuts and disconnects happen on real sockets. No test
uses an autojump clock: real socket waits would make it jump past the timeouts under test.
"""

from __future__ import annotations

import email.utils
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from fake_llm_server import (
    FakeLLMServer,
    RecordedRequest,
    Reply,
    anthropic_events,
    json_reply,
    openai_chunks,
    sse,
)
from hypothesis import given
from hypothesis import strategies as st

from kernel.providers import (
    ModelInfo,
    ModelMessage,
    ModelProvider,
    ModelRequest,
    ProviderError,
    StreamDone,
    StreamEvent,
    TextDelta,
    TokenUsage,
)
from plugins.providers.backends import AnthropicProvider, OfflineProvider, OpenAICompatibleProvider
from plugins.providers.backends._http import (
    error_message_from_body,
    quote_server_message,
    retry_after_ms,
)
from plugins.providers.backends._sse import SSEDecoder, SSEError, SSEEvent

HttpProvider = OpenAICompatibleProvider | AnthropicProvider
MakeProvider = Callable[..., HttpProvider]

API_KEY = "sk-test-0123456789abcdef"
TEXTS = ["Hel", "lo, ", "wor", "ld! ", "Ünï", "cödé ✓"]

REQUEST = ModelRequest(
    model="some-model",
    messages=[
        ModelMessage("system", "Be brief."),
        ModelMessage("user", "Say hello."),
    ],
    api_key=API_KEY,
    max_tokens=64,
)


async def collect(stream: AsyncIterator[StreamEvent]) -> tuple[str, StreamDone]:
    """Drain ``stream``; return the joined text and the final event, checking the order."""
    text: list[str] = []
    done: StreamDone | None = None
    async with aclosing(stream):
        async for event in stream:
            assert done is None, "an event came after StreamDone"
            if isinstance(event, TextDelta):
                text.append(event.text)
            else:
                done = event
    assert done is not None, "the stream ended without StreamDone"
    return "".join(text), done


async def provider_error(stream: AsyncIterator[StreamEvent]) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await collect(stream)
    return caught.value


def pooled_connections(provider: HttpProvider) -> int:
    """Connections httpx holds open for ``provider``.

    This reads httpx internals on purpose: the server notices a drop only after some
    scheduling, and so would it if the connection were left to the garbage collector's
    async-generator finalizer. An empty pool right after ``aclose`` shows the close itself
    released the connection.
    """
    client = provider._http._client
    assert client is not None
    return len(client._transport._pool.connections)


def rechunk(pieces: list[bytes], size: int) -> list[bytes]:
    """The same bytes cut into ``size``-byte pieces, ignoring event and character bounds."""
    data = b"".join(pieces)
    return [data[i : i + size] for i in range(0, len(data), size)]


# --- the SSE decoder ---------------------------------------------------------------------


def decode_all(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.close()


SAMPLE_STREAM = (
    "\ufeff: a comment, as servers send for keep-alive\r\n"
    "event: first\r\n"
    "data: one\r\n"
    "data:two\r\n"
    "id: 7\r\n"
    "retry: 1000\r\n"
    "\r\n"
    "data: ünïcödé ✓\n"
    "\n"
    "event: no-data-so-not-dispatched\r"
    "\r"
    "data\r"
    "\r"
    "data: last\n\n"
).encode()
SAMPLE_EVENTS = [
    SSEEvent("first", "one\ntwo"),
    SSEEvent("message", "ünïcödé ✓"),
    SSEEvent("message", ""),
    SSEEvent("message", "last"),
]


def test_sse_decoder_follows_the_event_stream_rules() -> None:
    assert decode_all([SAMPLE_STREAM]) == SAMPLE_EVENTS


@given(st.lists(st.integers(0, len(SAMPLE_STREAM)), max_size=12))
def test_sse_decoder_gives_the_same_events_however_the_body_is_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(SAMPLE_STREAM)]
    chunks = [SAMPLE_STREAM[start:end] for start, end in itertools.pairwise(bounds)]
    assert decode_all(chunks) == SAMPLE_EVENTS


def test_sse_decoder_dispatches_an_event_whose_last_blank_line_is_missing() -> None:
    both = [SSEEvent("message", "a"), SSEEvent("message", "b")]
    assert decode_all([b"data: a\n\ndata: b\n"]) == both
    assert decode_all([b"data: a\n\ndata: b\r"]) == both


def test_sse_decoder_drops_a_line_cut_off_by_the_end_of_the_body() -> None:
    assert decode_all([b'data: a\n\ndata: {"trunc']) == [SSEEvent("message", "a")]


def test_sse_decoder_refuses_an_unbounded_line() -> None:
    decoder = SSEDecoder(max_event_chars=100)
    with pytest.raises(SSEError):
        decoder.feed(b"data: " + b"x" * 200)
    decoder = SSEDecoder(max_event_chars=100)
    with pytest.raises(SSEError):
        decoder.feed(b"data: xxxxxxxxxx\n" * 20)


# --- shared HTTP helpers ----------------------------------------------------------------


def test_retry_after_reads_seconds_dates_and_milliseconds() -> None:
    now = time.time()
    in_thirty_s = email.utils.formatdate(now + 30, usegmt=True)
    a_minute_ago = email.utils.formatdate(now - 60, usegmt=True)
    assert retry_after_ms({"retry-after": "7"}) == 7000
    assert retry_after_ms({"retry-after": "1.5"}) == 1500
    assert 29_000 <= retry_after_ms({"retry-after": in_thirty_s}, now=now) <= 30_000
    assert retry_after_ms({"retry-after": a_minute_ago}, now=now) == 0
    assert retry_after_ms({"retry-after": "soon"}) is None
    assert retry_after_ms({"retry-after": "inf"}) is None
    assert retry_after_ms({}) is None
    assert retry_after_ms({"retry-after-ms": "250", "retry-after": "7"}) == 250


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "bad key", "type": "invalid_request_error"}}', "bad key"),
        (b'{"type": "error", "error": {"type": "x", "message": "overloaded"}}', "overloaded"),
        (b'{"error": "model not loaded"}', "model not loaded"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b'{"message": "nope"}', "nope"),
        (b"<html>502</html>", None),
        (b"[1, 2]", None),
    ],
)
def test_error_message_is_taken_from_the_shapes_servers_use(
    body: bytes, message: str | None
) -> None:
    assert error_message_from_body(body) == message


def test_quoted_server_message_is_truncated_and_never_holds_the_key() -> None:
    quoted = quote_server_message("refused", "x" * 290 + API_KEY + "y" * 100, API_KEY)
    assert quoted.startswith("refused: xxx")
    assert len(quoted) <= len("refused: ") + 300
    assert API_KEY[:12] not in quoted
    assert quote_server_message("refused", None, API_KEY) == "refused"


# --- the offline provider ---------------------------------------------------------------


def offline_request(text: str) -> ModelRequest:
    return ModelRequest(model="whatever", messages=[ModelMessage("user", text)])


async def test_offline_provider_is_deterministic_and_labelled() -> None:
    provider = OfflineProvider(piece_delay_s=0)
    assert isinstance(provider, ModelProvider)
    assert (provider.name, provider.needs_key) == ("offline", False)

    async def pieces() -> list[StreamEvent]:
        async with aclosing(provider.stream(offline_request("What is the  time?"))) as stream:
            return [event async for event in stream]

    first, second = await pieces(), await pieces()
    assert first == second
    *deltas, done = first
    text = "".join(delta.text for delta in deltas)
    assert text == provider.answer_text(offline_request("What is the  time?"))
    assert text.startswith("[offline provider]")
    assert "offline development provider" in text
    assert "no model key is configured" in text
    assert "anima.providers.set" in text
    assert text.endswith("You said: What is the  time?")
    words = text.split()
    assert len(deltas) == -(-len(words) // 3)
    assert all(len(delta.text.split()) <= 3 for delta in deltas)
    assert done == StreamDone(
        stop_reason="end_turn",
        usage=TokenUsage(input_tokens=4, output_tokens=len(words)),
        model="offline-echo",
    )


async def test_offline_provider_echoes_only_a_bounded_prefix_of_the_last_user_message() -> None:
    provider = OfflineProvider(piece_delay_s=0, echo_chars=20)
    request = ModelRequest(
        model="m",
        messages=[
            ModelMessage("user", "an older message"),
            ModelMessage("assistant", "a reply"),
            ModelMessage("user", "x" * 5000),
        ],
    )
    text, _ = await collect(provider.stream(request))
    assert text.endswith("You said: " + "x" * 20 + "…")
    assert "older" not in text
    text, _ = await collect(provider.stream(ModelRequest(model="m", messages=[])))
    assert text.startswith("[offline provider]")


async def test_offline_provider_paces_its_pieces_and_stops_when_cancelled() -> None:
    provider = OfflineProvider(piece_delay_s=0.05)
    arrivals: list[float] = []
    with trio.CancelScope() as scope:
        async with aclosing(provider.stream(offline_request("hello"))) as stream:
            async for _ in stream:
                arrivals.append(trio.current_time())
                if len(arrivals) == 3:
                    scope.cancel()
    assert scope.cancelled_caught
    assert len(arrivals) == 3
    assert arrivals[2] - arrivals[0] >= 0.09


async def test_offline_provider_lists_its_one_model() -> None:
    models = await OfflineProvider().list_models(None)
    assert models == [ModelInfo(id="offline-echo", name=models[0].name, provider="offline")]


# --- the HTTP providers: shared behaviour -----------------------------------------------


@dataclass(frozen=True)
class Flavour:
    """What differs between the two HTTP providers, for the tests they share."""

    name: str
    stream_path: str
    models_path: str
    make: Callable[..., HttpProvider]
    events: Callable[..., list[bytes]]
    #: Index of the first text delta in ``events(...)``.
    first_delta: int


OPENAI = Flavour(
    name="openai",
    stream_path="/v1/chat/completions",
    models_path="/v1/models",
    make=lambda base, **kw: OpenAICompatibleProvider(f"{base}/v1", **kw),
    events=openai_chunks,
    first_delta=1,
)
ANTHROPIC = Flavour(
    name="anthropic",
    stream_path="/v1/messages",
    models_path="/v1/models",
    make=lambda base, **kw: AnthropicProvider(base, **kw),
    events=anthropic_events,
    first_delta=3,
)
FLAVOURS = pytest.mark.parametrize("flavour", [OPENAI, ANTHROPIC], ids=lambda f: f.name)


def event_stream(pieces: Iterable[bytes | trio.Event], **options: Any) -> Reply:
    return Reply(headers=[("Content-Type", "text/event-stream")], body=pieces, **options)


@pytest.fixture
async def make_provider(llm_server: FakeLLMServer) -> AsyncIterator[MakeProvider]:
    """Builds providers aimed at ``llm_server`` (or another URL) and closes them afterwards."""
    created: list[HttpProvider] = []

    def make(flavour: Flavour, base_url: str | None = None, **options: Any) -> HttpProvider:
        options.setdefault("timeout_s", 5.0)
        options.setdefault("connect_timeout_s", 2.0)
        provider = flavour.make(base_url or llm_server.base_url, **options)
        created.append(provider)
        return provider

    yield make
    for provider in created:
        await provider.aclose()


@FLAVOURS
@pytest.mark.parametrize("framing", ["chunked", "close", "length"])
async def test_stream_yields_the_whole_text_and_usage(
    flavour: Flavour, framing: str, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route(
        "POST", flavour.stream_path, event_stream(flavour.events(TEXTS), framing=framing)
    )
    provider = make_provider(flavour)
    assert isinstance(provider, ModelProvider)
    text, done = await collect(provider.stream(REQUEST))
    assert text == "".join(TEXTS)
    if flavour is OPENAI:
        assert done == StreamDone("stop", TokenUsage(11, 7), "gpt-test")
    else:
        assert done == StreamDone("end_turn", TokenUsage(25, 9), "claude-test")


@FLAVOURS
@pytest.mark.parametrize("size", [1, 3, 7, 64])
async def test_stream_survives_chunks_split_anywhere(
    flavour: Flavour, size: int, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    keepalive = [b": keep-alive\n\n"]
    pieces = rechunk(keepalive + flavour.events(TEXTS) + keepalive, size)
    llm_server.route("POST", flavour.stream_path, event_stream(pieces))
    text, _ = await collect(make_provider(flavour).stream(REQUEST))
    assert text == "".join(TEXTS)


@FLAVOURS
async def test_slow_stream_delivers_each_delta_as_it_arrives(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    release = trio.Event()
    events = flavour.events(TEXTS)
    split = flavour.first_delta + 1
    pieces = [*events[:split], release, *events[split:]]
    llm_server.route("POST", flavour.stream_path, event_stream(pieces, delay_s=0.03))
    async with aclosing(make_provider(flavour).stream(REQUEST)) as stream:
        with trio.fail_after(5):
            first = await anext(stream)
        # The server holds everything else until the test has seen the first delta.
        assert first == TextDelta(TEXTS[0])
        release.set()
        text, done = await collect(stream)
    assert TEXTS[0] + text == "".join(TEXTS)
    assert isinstance(done, StreamDone)


@FLAVOURS
@pytest.mark.parametrize("framing", ["chunked", "close", "length"])
async def test_stream_cut_off_mid_answer_is_a_bad_response(
    flavour: Flavour, framing: str, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route(
        "POST",
        flavour.stream_path,
        event_stream(flavour.events(TEXTS), framing=framing, cut_after=4),
    )
    error = await provider_error(make_provider(flavour).stream(REQUEST))
    assert error.kind == "bad_response"
    assert llm_server.base_url in error.message


@FLAVOURS
async def test_malformed_json_in_the_stream_is_a_bad_response(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    events = flavour.events(TEXTS)
    broken = b"event: content_block_delta\n" if flavour is ANTHROPIC else b""
    events.insert(3, broken + b'data: {"choices": [{"delta": \n\n')
    llm_server.route("POST", flavour.stream_path, event_stream(events))
    error = await provider_error(make_provider(flavour).stream(REQUEST))
    assert error.kind == "bad_response"
    assert "malformed" in error.message


@FLAVOURS
async def test_a_json_answer_instead_of_a_stream_is_a_bad_response(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route("POST", flavour.stream_path, json_reply(200, {"error": "not streaming"}))
    error = await provider_error(make_provider(flavour).stream(REQUEST))
    assert error.kind == "bad_response"
    assert "not streaming" in error.message


@FLAVOURS
@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_is_an_auth_error_that_quotes_the_server_but_not_the_key(
    flavour: Flavour, status: int, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    message = f"Incorrect API key provided: {API_KEY}. Find yours in the console."
    llm_server.route(
        "POST", flavour.stream_path, json_reply(status, {"error": {"message": message}})
    )
    error = await provider_error(make_provider(flavour).stream(REQUEST))
    assert (error.kind, error.status, error.retry_after_ms) == ("auth", status, None)
    assert "Incorrect API key provided" in error.message
    assert API_KEY not in error.message


@FLAVOURS
async def test_rate_limit_carries_the_retry_after_hint(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route(
        "POST",
        flavour.stream_path,
        json_reply(429, {"error": {"message": "slow down"}}, headers=[("Retry-After", "3")]),
    )
    error = await provider_error(make_provider(flavour).stream(REQUEST))
    assert (error.kind, error.status, error.retry_after_ms) == ("rate_limited", 429, 3000)
    assert "slow down" in error.message


async def test_rate_limit_reads_an_http_date(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    llm_server.route(
        "POST", OPENAI.stream_path, json_reply(429, {}, headers=[("Retry-After", when)])
    )
    error = await provider_error(make_provider(OPENAI).stream(REQUEST))
    assert error.kind == "rate_limited"
    assert error.retry_after_ms is not None
    assert 15_000 <= error.retry_after_ms <= 20_000


@FLAVOURS
async def test_server_failure_is_a_server_error_with_a_truncated_quote(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    long_message = "the model crashed " + "x" * 2000
    llm_server.route(
        "POST", flavour.stream_path, json_reply(500, {"error": {"message": long_message}})
    )
    error = await provider_error(make_provider(flavour).stream(REQUEST))
    assert (error.kind, error.status) == ("server", 500)
    assert "the model crashed" in error.message
    assert len(error.message) < 500


async def test_server_failure_without_json_quotes_the_status_phrase(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route("POST", OPENAI.stream_path, Reply(502, body=[b"<html>bad</html>"]))
    error = await provider_error(make_provider(OPENAI).stream(REQUEST))
    assert (error.kind, error.status) == ("server", 502)
    assert "Bad Gateway" in error.message


@FLAVOURS
async def test_connection_refused_is_unreachable_and_names_the_url(
    flavour: Flavour, make_provider: MakeProvider
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    provider = make_provider(flavour, base_url)
    error = await provider_error(provider.stream(REQUEST))
    assert error.kind == "unreachable"
    assert base_url in error.message
    with pytest.raises(ProviderError) as caught:
        await provider.list_models(API_KEY)
    assert caught.value.kind == "unreachable"


@FLAVOURS
async def test_a_stream_that_stalls_past_the_timeout_is_unreachable(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    never = trio.Event()
    llm_server.route("POST", flavour.stream_path, event_stream([flavour.events(TEXTS)[0], never]))
    provider = make_provider(flavour, timeout_s=0.3)
    with trio.fail_after(5):
        error = await provider_error(provider.stream(REQUEST))
    assert error.kind == "unreachable"


@FLAVOURS
async def test_closing_the_stream_early_drops_the_connection(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    events = flavour.events(["tok"])
    endless = itertools.chain(
        events[: flavour.first_delta], itertools.repeat(events[flavour.first_delta])
    )
    llm_server.route("POST", flavour.stream_path, event_stream(endless, delay_s=0.01))
    provider = make_provider(flavour)
    stream = provider.stream(REQUEST)
    with trio.fail_after(5):
        assert await anext(stream) == TextDelta("tok")
        assert await anext(stream) == TextDelta("tok")
        await stream.aclose()
        assert pooled_connections(provider) == 0
        await llm_server.client_gone.wait()


@FLAVOURS
async def test_cancelling_a_stream_waiting_for_data_drops_the_connection(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    never = trio.Event()
    llm_server.route("POST", flavour.stream_path, event_stream([*flavour.events(TEXTS)[:4], never]))
    received: list[StreamEvent] = []
    provider = make_provider(flavour)
    with trio.move_on_after(0.5) as scope:
        async with aclosing(provider.stream(REQUEST)) as stream:
            async for event in stream:
                received.append(event)
    assert scope.cancelled_caught
    assert received
    assert pooled_connections(provider) == 0
    with trio.fail_after(5):
        await llm_server.client_gone.wait()


@FLAVOURS
async def test_cancelling_the_consumer_between_deltas_drops_the_connection(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    never = trio.Event()
    llm_server.route("POST", flavour.stream_path, event_stream([*flavour.events(TEXTS)[:4], never]))
    provider = make_provider(flavour)
    with trio.CancelScope() as scope:
        async with aclosing(provider.stream(REQUEST)) as stream:
            async for _ in stream:
                scope.cancel()
                await trio.sleep(1)  # cancelled here, outside the generator
    assert scope.cancelled_caught
    assert pooled_connections(provider) == 0
    with trio.fail_after(5):
        await llm_server.client_gone.wait()


# --- the OpenAI-compatible provider -----------------------------------------------------


async def test_openai_request_carries_the_key_messages_and_stream_options(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route("POST", OPENAI.stream_path, event_stream(openai_chunks(TEXTS)))
    request = ModelRequest(
        model="m", messages=REQUEST.messages, api_key=API_KEY, max_tokens=5, temperature=0.5
    )
    await collect(make_provider(OPENAI).stream(request))
    [sent] = llm_server.requests
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.json() == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 5,
        "temperature": 0.5,
    }


async def test_openai_options_for_keyless_servers_and_reasoning_models(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route("POST", OPENAI.stream_path, event_stream(openai_chunks(TEXTS)))
    provider = make_provider(
        OPENAI, needs_key=False, max_tokens_field="max_completion_tokens", include_usage=False
    )
    request = ModelRequest(model="m", messages=REQUEST.messages)
    await collect(provider.stream(request))
    [sent] = llm_server.requests
    assert "authorization" not in sent.headers
    body = sent.json()
    assert body["max_completion_tokens"] == 1024
    assert "max_tokens" not in body
    assert "stream_options" not in body
    assert "temperature" not in body


async def test_openai_stream_without_usage_or_done_still_finishes(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    events = openai_chunks(TEXTS, finish_reason="length", usage=None, done=False)
    llm_server.route("POST", OPENAI.stream_path, event_stream(events))
    text, done = await collect(make_provider(OPENAI).stream(REQUEST))
    assert text == "".join(TEXTS)
    assert done == StreamDone("length", TokenUsage(0, 0), "gpt-test")


async def test_openai_stream_without_finish_or_done_is_a_bad_response(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    events = openai_chunks(TEXTS, finish_reason=None, usage=None, done=False)
    llm_server.route("POST", OPENAI.stream_path, event_stream(events))
    error = await provider_error(make_provider(OPENAI).stream(REQUEST))
    assert error.kind == "bad_response"


async def test_openai_error_chunk_in_the_stream_raises(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    events = [*openai_chunks(TEXTS)[:3], sse({"error": {"message": "backend died"}})]
    llm_server.route("POST", OPENAI.stream_path, event_stream(events))
    error = await provider_error(make_provider(OPENAI).stream(REQUEST))
    assert error.kind == "server"
    assert "backend died" in error.message


async def test_openai_lists_models(llm_server: FakeLLMServer, make_provider: MakeProvider) -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "gpt-a", "object": "model", "created": 1, "owned_by": "me"},
            {"id": "local", "object": "model", "max_model_len": 8192},
        ],
    }
    llm_server.route("GET", OPENAI.models_path, json_reply(200, listing))
    models = await make_provider(OPENAI, name="local-llm").list_models(API_KEY)
    assert models == [
        ModelInfo(id="gpt-a", name="gpt-a", provider="local-llm"),
        ModelInfo(id="local", name="local", provider="local-llm", context_window=8192),
    ]
    assert llm_server.requests[0].headers["authorization"] == f"Bearer {API_KEY}"


@FLAVOURS
async def test_model_listing_errors_are_mapped_too(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route("GET", flavour.models_path, json_reply(401, {"error": {"message": "who?"}}))
    with pytest.raises(ProviderError) as caught:
        await make_provider(flavour).list_models(None)
    assert (caught.value.kind, caught.value.status) == ("auth", 401)
    assert "who?" in caught.value.message


@FLAVOURS
async def test_a_malformed_model_listing_is_a_bad_response(
    flavour: Flavour, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route("GET", flavour.models_path, json_reply(200, {"data": "nope"}))
    with pytest.raises(ProviderError) as caught:
        await make_provider(flavour).list_models(API_KEY)
    assert caught.value.kind == "bad_response"


# --- the Anthropic provider -------------------------------------------------------------


async def test_anthropic_request_puts_system_turns_in_the_system_field(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route("POST", ANTHROPIC.stream_path, event_stream(anthropic_events(TEXTS)))
    request = ModelRequest(
        model="claude-x",
        messages=[
            ModelMessage("system", "Be brief."),
            ModelMessage("user", "Hi."),
            ModelMessage("assistant", "Hello."),
            ModelMessage("system", "Use English."),
            ModelMessage("user", "Again."),
        ],
        api_key=API_KEY,
        temperature=0.0,
    )
    await collect(make_provider(ANTHROPIC, api_version="2099-01-01").stream(request))
    [sent] = llm_server.requests
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["anthropic-version"] == "2099-01-01"
    assert "authorization" not in sent.headers
    assert sent.json() == {
        "model": "claude-x",
        "max_tokens": 1024,
        "messages": [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again."},
        ],
        "stream": True,
        "system": "Be brief.\n\nUse English.",
        "temperature": 0.0,
    }


@pytest.mark.parametrize(
    ("error_type", "kind"),
    [
        ("overloaded_error", "server"),
        ("api_error", "server"),
        ("rate_limit_error", "rate_limited"),
        ("authentication_error", "auth"),
    ],
)
async def test_anthropic_error_event_raises_with_its_message(
    error_type: str, kind: str, llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    failure = {"type": "error", "error": {"type": error_type, "message": "Overloaded"}}
    events = [*anthropic_events(TEXTS)[:5], sse(failure, "error")]
    llm_server.route("POST", ANTHROPIC.stream_path, event_stream(events))
    error = await provider_error(make_provider(ANTHROPIC).stream(REQUEST))
    assert error.kind == kind
    assert error_type in error.message
    assert "Overloaded" in error.message


async def test_anthropic_stream_without_message_stop_is_a_bad_response(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    events = anthropic_events(TEXTS, stop=False)
    llm_server.route("POST", ANTHROPIC.stream_path, event_stream(events))
    error = await provider_error(make_provider(ANTHROPIC).stream(REQUEST))
    assert error.kind == "bad_response"
    assert "message_stop" in error.message


async def test_anthropic_ignores_unknown_events_and_non_text_deltas(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    events = anthropic_events(TEXTS)
    thinking = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "hmm"},
    }
    events[3:3] = [sse(thinking, "content_block_delta"), sse({"type": "brand_new"}, "brand_new")]
    llm_server.route("POST", ANTHROPIC.stream_path, event_stream(events))
    text, _ = await collect(make_provider(ANTHROPIC).stream(REQUEST))
    assert text == "".join(TEXTS)


async def test_anthropic_counts_cached_input_tokens(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    events = anthropic_events(TEXTS)
    usage = {"input_tokens": 3, "cache_read_input_tokens": 100, "output_tokens": 12}
    events[-2] = sse(
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": usage},
        "message_delta",
    )
    llm_server.route("POST", ANTHROPIC.stream_path, event_stream(events))
    _, done = await collect(make_provider(ANTHROPIC).stream(REQUEST))
    assert done == StreamDone("max_tokens", TokenUsage(103, 12), "claude-test")


async def test_anthropic_lists_models_across_pages(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    def page(request: RecordedRequest) -> Reply:
        if "after_id" not in request.query:
            return json_reply(
                200,
                {
                    "data": [{"id": "claude-a", "display_name": "Claude A", "type": "model"}],
                    "has_more": True,
                    "first_id": "claude-a",
                    "last_id": "claude-a",
                },
            )
        assert request.query["after_id"] == "claude-a"
        return json_reply(
            200,
            {
                "data": [{"id": "claude-b", "type": "model"}],
                "has_more": False,
                "first_id": "claude-b",
                "last_id": "claude-b",
            },
        )

    llm_server.route("GET", ANTHROPIC.models_path, page)
    models = await make_provider(ANTHROPIC).list_models(API_KEY)
    assert models == [
        ModelInfo(id="claude-a", name="Claude A", provider="anthropic"),
        ModelInfo(id="claude-b", name="claude-b", provider="anthropic"),
    ]
    assert [r.query["limit"] for r in llm_server.requests] == ["1000", "1000"]
    assert all(r.headers["x-api-key"] == API_KEY for r in llm_server.requests)


async def test_provider_can_be_reused_after_aclose(
    llm_server: FakeLLMServer, make_provider: MakeProvider
) -> None:
    llm_server.route("POST", OPENAI.stream_path, event_stream(openai_chunks(TEXTS)))
    provider = make_provider(OPENAI)
    await collect(provider.stream(REQUEST))
    await provider.aclose()
    text, _ = await collect(provider.stream(REQUEST))
    assert text == "".join(TEXTS)
