"""Types shared by model providers and the plugins that drive them.

A model provider is a back end that turns a conversation into streamed text. Providers are
registered through the ``anima_model_providers`` hook, so a third party can add one without
writing a method; the plugin that runs agent turns finds them through the same hook. Both
sides speak only the types in this module, which is why it lives in the kernel's public API
rather than in either plugin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol, runtime_checkable

import msgspec

__all__ = [
    "ModelInfo",
    "ModelMessage",
    "ModelProvider",
    "ModelRequest",
    "ProviderError",
    "ProviderErrorKind",
    "StreamDone",
    "StreamEvent",
    "TextDelta",
    "TokenUsage",
]


class ModelMessage(msgspec.Struct, frozen=True):
    """One turn of a conversation as a provider sees it."""

    role: Literal["system", "user", "assistant"]
    content: str


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a provider needs for one streamed completion.

    The API key travels with the request, not the provider, so key rotation is a matter of
    sending the next request with another key.
    """

    model: str
    messages: list[ModelMessage]
    api_key: str | None = None
    max_tokens: int = 1024
    temperature: float | None = None


class TokenUsage(msgspec.Struct, frozen=True):
    input_tokens: int = 0
    output_tokens: int = 0


class TextDelta(msgspec.Struct, frozen=True, tag="delta"):
    """New text only: the increment since the previous delta."""

    text: str


class StreamDone(msgspec.Struct, frozen=True, tag="done"):
    """The last event of a successful stream.

    ``stop_reason`` is the provider's own word (``stop``, ``length``, ``end_turn``...), or
    ``unknown`` when it gave none.
    """

    stop_reason: str
    usage: TokenUsage
    model: str


StreamEvent = TextDelta | StreamDone

ProviderErrorKind = Literal[
    "auth", "rate_limited", "invalid_request", "server", "unreachable", "bad_response"
]


class ProviderError(Exception):
    """A provider call that failed in a way the caller can act on.

    ``kind`` lets the caller decide without parsing messages: ``auth`` and ``rate_limited``
    are the failures that key rotation may cure; ``invalid_request`` (unknown model, context
    too long) will fail again whatever the key, so it is never retried; ``retry_after_ms``
    carries the provider's own hint when it gave one.
    """

    def __init__(
        self,
        kind: ProviderErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after_ms = retry_after_ms


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    id: str
    name: str
    provider: str
    context_window: int | None = None
    reasoning: bool | None = None


@runtime_checkable
class ModelProvider(Protocol):
    """A back end that streams completions.

    ``name`` is the provider's stable identifier (``offline``, ``openai``, ``anthropic``);
    ``needs_key`` tells the caller whether a request without an API key can succeed.
    """

    name: str
    display_name: str
    needs_key: bool

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Yield text deltas, then exactly one ``StreamDone``; raise ``ProviderError``.

        Closing the iterator early (``aclose``) must release the upstream connection at once:
        that is how an aborted run stops paying for tokens. Consumers should iterate inside
        ``contextlib.aclosing(provider.stream(...))`` so that a ``break`` closes it now
        rather than whenever the garbage collector gets to it.
        """
        ...

    async def aclose(self) -> None:
        """Release pooled connections; called once at shutdown."""
        ...

    async def list_models(self, api_key: str | None) -> list[ModelInfo]:
        """The models this provider offers; raise ``ProviderError`` when it cannot tell."""
        ...
