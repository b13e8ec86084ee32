"""A model provider for Anthropic's Messages API.

``POST {base_url}/v1/messages`` with ``"stream": true`` answers with named server-sent events:
``message_start`` (model, input tokens), ``content_block_delta`` (text), ``message_delta``
(stop reason, output tokens), ``message_stop``, ``ping`` keep-alives, and ``error`` when the
API fails after the stream has begun. System turns are not messages in this API; they travel
in the top-level ``system`` field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any
from urllib.parse import urlencode

import msgspec

from kernel.providers import (
    ModelInfo,
    ModelRequest,
    ProviderErrorKind,
    StreamDone,
    StreamEvent,
    TextDelta,
    TokenUsage,
)

from ._http import ProviderHttp, quote_server_message

__all__ = ["AnthropicProvider"]

#: Page size asked of ``/v1/models`` (the API's maximum) and the most pages followed.
MODEL_PAGE_SIZE = 1000
MODEL_PAGE_LIMIT = 10

#: How an ``error`` event's ``error.type`` maps onto the kinds callers act on.
_ERROR_KINDS: dict[str, ProviderErrorKind] = {
    "authentication_error": "auth",
    "permission_error": "auth",
    "rate_limit_error": "rate_limited",
}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def prompt_tokens(self) -> int | None:
        """Every input token the model read, cached or not, as OpenAI's ``prompt_tokens``."""
        parts = (
            self.input_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        )
        if all(part is None for part in parts):
            return None
        return sum(part or 0 for part in parts)


class _Message(msgspec.Struct):
    model: str | None = None
    usage: _Usage | None = None


class _MessageStart(msgspec.Struct):
    message: _Message


class _BlockDelta(msgspec.Struct):
    type: str
    text: str | None = None


class _ContentBlockDelta(msgspec.Struct):
    delta: _BlockDelta


class _MessageDeltaBody(msgspec.Struct):
    stop_reason: str | None = None


class _MessageDelta(msgspec.Struct):
    delta: _MessageDeltaBody | None = None
    usage: _Usage | None = None


class _ErrorBody(msgspec.Struct):
    type: str = "api_error"
    message: str | None = None


class _ErrorEvent(msgspec.Struct):
    error: _ErrorBody


class _EventType(msgspec.Struct):
    type: str = ""


class _Model(msgspec.Struct):
    id: str
    display_name: str | None = None


class _ModelPage(msgspec.Struct):
    data: list[_Model]
    has_more: bool = False
    last_id: str | None = None


_message_start_decoder = msgspec.json.Decoder(_MessageStart)
_block_delta_decoder = msgspec.json.Decoder(_ContentBlockDelta)
_message_delta_decoder = msgspec.json.Decoder(_MessageDelta)
_error_decoder = msgspec.json.Decoder(_ErrorEvent)
_event_type_decoder = msgspec.json.Decoder(_EventType)
_model_page_decoder = msgspec.json.Decoder(_ModelPage)


class AnthropicProvider:
    """Streams completions from the Anthropic Messages API.

    :param base_url: the API root, without ``/v1``.
    :param api_version: sent as ``anthropic-version``; it fixes the wire format parsed here.
    :param name: the stable identifier callers select this provider by.
    :param display_name: the name shown to people and used in error messages.
    :param timeout_s: longest wait for any read, including the pause between two events.
    :param connect_timeout_s: longest wait for the connection itself.
    """

    needs_key = True

    def __init__(
        self,
        base_url: str = "https://api.anthropic.com",
        *,
        api_version: str = "2023-06-01",
        name: str = "anthropic",
        display_name: str = "Anthropic",
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self.display_name = display_name
        self._api_version = api_version
        self._http = ProviderHttp(
            display_name=display_name,
            base_url=base_url,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
        )

    @property
    def base_url(self) -> str:
        return self._http.base_url

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._http.aclose()

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Yield the answer's text deltas, then one ``StreamDone`` at ``message_stop``.

        A stream that ends without ``message_stop`` is a truncated answer (``bad_response``);
        an ``error`` event raises at once with the API's own message.
        """
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [m for m in request.messages if m.role != "system"],
            "stream": True,
        }
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        headers = self._headers(request.api_key)
        headers["Accept"] = "text/event-stream"
        headers["Accept-Encoding"] = "identity"

        model = request.model
        input_tokens = 0
        output_tokens = 0
        stop_reason: str | None = None
        stopped = False
        events = self._http.stream_events(
            f"{self.base_url}/v1/messages",
            headers=headers,
            body=msgspec.json.encode(body),
            api_key=request.api_key,
        )
        async with aclosing(events):
            async for event in events:
                event_type = event.event
                if event_type == "message":
                    event_type = self._http.decode(_event_type_decoder, event.data, "event").type
                match event_type:
                    case "content_block_delta":
                        delta = self._http.decode(_block_delta_decoder, event.data, event_type)
                        if delta.delta.type == "text_delta" and delta.delta.text:
                            yield TextDelta(delta.delta.text)
                    case "message_start":
                        start = self._http.decode(_message_start_decoder, event.data, event_type)
                        model = start.message.model or model
                        if start.message.usage is not None:
                            input_tokens = start.message.usage.prompt_tokens() or input_tokens
                            output_tokens = start.message.usage.output_tokens or output_tokens
                    case "message_delta":
                        update = self._http.decode(_message_delta_decoder, event.data, event_type)
                        if update.delta is not None:
                            stop_reason = update.delta.stop_reason or stop_reason
                        if update.usage is not None:
                            # Counts in message_delta are cumulative, so they replace.
                            input_tokens = update.usage.prompt_tokens() or input_tokens
                            output_tokens = update.usage.output_tokens or output_tokens
                    case "message_stop":
                        stopped = True
                        break
                    case "error":
                        failure = self._http.decode(_error_decoder, event.data, event_type).error
                        kind = _ERROR_KINDS.get(failure.type, "server")
                        detail = quote_server_message(
                            f"{failure.type} in the stream", failure.message, request.api_key
                        )
                        raise self._http.error(kind, detail)
                    case _:
                        pass  # ping, content_block_start/stop, and types added later
        if not stopped:
            raise self._http.error("bad_response", "the stream ended before message_stop")
        yield StreamDone(
            stop_reason=stop_reason or "unknown",
            usage=TokenUsage(input_tokens, output_tokens),
            model=model,
        )

    async def list_models(self, api_key: str | None) -> list[ModelInfo]:
        """The models ``/v1/models`` lists, following its pages up to ``MODEL_PAGE_LIMIT``."""
        headers = self._headers(api_key)
        models: list[ModelInfo] = []
        after_id: str | None = None
        for _ in range(MODEL_PAGE_LIMIT):
            query = {"limit": str(MODEL_PAGE_SIZE)}
            if after_id is not None:
                query["after_id"] = after_id
            url = f"{self.base_url}/v1/models?{urlencode(query)}"
            body = await self._http.get_json(url, headers=headers, api_key=api_key)
            page = self._http.decode(_model_page_decoder, body, "model list")
            models.extend(
                ModelInfo(id=model.id, name=model.display_name or model.id, provider=self.name)
                for model in page.data
            )
            if not page.has_more or not page.last_id:
                break
            after_id = page.last_id
        return models

    def _headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": self._api_version}
        if api_key:
            headers["x-api-key"] = api_key
        return headers
