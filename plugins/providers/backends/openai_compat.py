"""A model provider for the OpenAI chat-completions API and the many servers that copy it.

OpenAI itself, and local servers such as llama.cpp, vLLM, Ollama or LM Studio, accept
``POST {base_url}/chat/completions`` with ``"stream": true`` and answer with server-sent
events, each carrying one JSON chunk, ended by ``data: [DONE]``. Only the parts every such
server agrees on are relied upon: ``choices[0].delta.content`` for text, ``finish_reason`` for
the stop reason, and a final ``usage`` chunk when the server honours ``include_usage``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any, Literal

import msgspec

from kernel.providers import (
    ModelInfo,
    ModelRequest,
    StreamDone,
    StreamEvent,
    TextDelta,
    TokenUsage,
)

from ._http import ProviderHttp, error_message_from_document, quote_server_message

__all__ = ["OpenAICompatibleProvider"]


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    model: str | None = None
    # Some servers report a failure mid-stream as a chunk carrying only an error object.
    error: Any = None


class _Model(msgspec.Struct):
    id: str
    name: str | None = None
    # Not part of OpenAI's schema; OpenRouter and vLLM respectively add them.
    context_length: int | None = None
    max_model_len: int | None = None


class _ModelList(msgspec.Struct):
    data: list[_Model]


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_model_list_decoder = msgspec.json.Decoder(_ModelList)


class OpenAICompatibleProvider:
    """Streams completions from an OpenAI-compatible ``/chat/completions`` endpoint.

    :param base_url: the API root that ``/chat/completions`` and ``/models`` hang off, such
        as ``https://api.openai.com/v1`` or ``http://127.0.0.1:8080/v1``.
    :param name: the stable identifier callers select this provider by.
    :param display_name: the name shown to people and used in error messages.
    :param needs_key: whether requests need an API key; local servers usually do not.
    :param timeout_s: longest wait for any read, including the pause between two chunks.
    :param connect_timeout_s: longest wait for the connection itself.
    :param max_tokens_field: the body field that carries ``max_tokens``; OpenAI's reasoning
        models accept only ``max_completion_tokens``, while many local servers know only
        ``max_tokens``.
    :param include_usage: ask for the final usage chunk; turn off for a server that rejects
        ``stream_options``.
    :param extra_headers: sent with every request (an ``HTTP-Referer`` some gateways want).
    """

    def __init__(
        self,
        base_url: str,
        *,
        name: str = "openai",
        display_name: str = "OpenAI-compatible",
        needs_key: bool = True,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        include_usage: bool = True,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.display_name = display_name
        self.needs_key = needs_key
        self._http = ProviderHttp(
            display_name=display_name,
            base_url=base_url,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
        )
        self._max_tokens_field = max_tokens_field
        self._include_usage = include_usage
        self._extra_headers = dict(extra_headers or {})

    @property
    def base_url(self) -> str:
        return self._http.base_url

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._http.aclose()

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Yield the completion's text deltas, then one ``StreamDone``.

        The stream counts as finished at ``data: [DONE]``, or at the end of the body once a
        ``finish_reason`` has arrived (a few servers omit ``[DONE]``); anything shorter is a
        truncated answer and raises ``bad_response``.
        """
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "stream": True,
            self._max_tokens_field: request.max_tokens,
        }
        if self._include_usage:
            body["stream_options"] = {"include_usage": True}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        headers = self._headers(request.api_key)
        headers["Accept"] = "text/event-stream"
        # Compression makes servers buffer output, which would hold deltas back.
        headers["Accept-Encoding"] = "identity"

        finish_reason: str | None = None
        saw_done = False
        usage = TokenUsage()
        model = request.model
        events = self._http.stream_events(
            f"{self.base_url}/chat/completions",
            headers=headers,
            body=msgspec.json.encode(body),
            api_key=request.api_key,
        )
        async with aclosing(events):
            async for event in events:
                if event.data == "[DONE]":
                    saw_done = True
                    break
                chunk = self._http.decode(_chunk_decoder, event.data, "stream chunk")
                if chunk.error is not None:
                    quoted = error_message_from_document({"error": chunk.error})
                    detail = quote_server_message("error in the stream", quoted, request.api_key)
                    raise self._http.error("server", detail)
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = TokenUsage(
                        chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0
                    )
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish_reason = choice.finish_reason or finish_reason
                if choice.delta is not None and choice.delta.content:
                    yield TextDelta(choice.delta.content)
        if not saw_done and finish_reason is None:
            raise self._http.error("bad_response", "the stream ended before the answer was done")
        yield StreamDone(stop_reason=finish_reason or "unknown", usage=usage, model=model)

    async def list_models(self, api_key: str | None) -> list[ModelInfo]:
        """The server's ``/models`` listing, in the order it gave."""
        body = await self._http.get_json(
            f"{self.base_url}/models", headers=self._headers(api_key), api_key=api_key
        )
        listing = self._http.decode(_model_list_decoder, body, "model list")
        return [
            ModelInfo(
                id=model.id,
                name=model.name or model.id,
                provider=self.name,
                context_window=model.context_length or model.max_model_len,
            )
            for model in listing.data
        ]

    def _headers(self, api_key: str | None) -> dict[str, str]:
        headers = dict(self._extra_headers)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers
