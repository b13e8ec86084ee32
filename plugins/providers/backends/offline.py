"""The offline development provider: a plainly labelled local answer when no key is set.

A fresh install has no model key, yet a chat sent to it should come back at once and say
what happened rather than fail. This provider calls no model: it answers with a fixed
explanation that names itself, says how to configure a real provider, and echoes the start of
the last user message, so a client can see its message went through. The answer is streamed in
word groups with a short pause between them, so streaming, ``chat.delta`` ordering and
``chat.abort`` behave as they would against a real model.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import trio

from kernel.providers import (
    ModelInfo,
    ModelRequest,
    StreamDone,
    StreamEvent,
    TextDelta,
    TokenUsage,
)

__all__ = ["OFFLINE_MODEL_ID", "OfflineProvider"]

#: The model id this provider reports, whatever model the request named.
OFFLINE_MODEL_ID = "offline-echo"

_WORD_WITH_SPACE = re.compile(r"\S+\s*")

_EXPLANATION = (
    "[offline provider] This answer comes from the built-in offline development provider, "
    "not from a language model: no model key is configured. To get real answers, add an API "
    "key for OpenAI, Anthropic or an OpenAI-compatible server with anima.providers.set, or "
    "configure a provider in the gateway's config file."
)


class OfflineProvider:
    """Answers every request with the same explanation plus an echo; needs no key.

    :param piece_delay_s: pause before each streamed piece; 0 still yields to the scheduler,
        so a cancelled run stops between pieces.
    :param words_per_piece: how many words each ``TextDelta`` carries.
    :param echo_chars: how much of the last user message is echoed back.
    """

    name = "offline"
    display_name = "Offline development provider"
    needs_key = False

    def __init__(
        self,
        *,
        piece_delay_s: float = 0.02,
        words_per_piece: int = 3,
        echo_chars: int = 200,
    ) -> None:
        if words_per_piece < 1:
            raise ValueError("words_per_piece must be at least 1")
        self._piece_delay_s = piece_delay_s
        self._words_per_piece = words_per_piece
        self._echo_chars = echo_chars

    async def aclose(self) -> None:
        """Nothing to release; present so callers can close every provider alike."""

    def answer_text(self, request: ModelRequest) -> str:
        """The full answer to ``request``, the same every time for the same messages."""
        last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        echo = last_user.strip()
        if len(echo) > self._echo_chars:
            echo = echo[: self._echo_chars].rstrip() + "…"
        if not echo:
            return f"{_EXPLANATION} Your request held no user message to echo."
        return f"{_EXPLANATION} You said: {echo}"

    def pieces(self, text: str) -> list[str]:
        """``text`` cut into groups of ``words_per_piece`` words that join back to ``text``."""
        words = _WORD_WITH_SPACE.findall(text)
        step = self._words_per_piece
        return ["".join(words[i : i + step]) for i in range(0, len(words), step)]

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Stream the answer piece by piece, then a ``StreamDone`` with estimated usage.

        Token counts are whitespace-separated words: deterministic, and close enough for a
        usage display that has nothing better to show.
        """
        text = self.answer_text(request)
        for piece in self.pieces(text):
            await trio.sleep(self._piece_delay_s)
            yield TextDelta(piece)
        usage = TokenUsage(
            input_tokens=sum(len(m.content.split()) for m in request.messages),
            output_tokens=len(text.split()),
        )
        yield StreamDone(stop_reason="end_turn", usage=usage, model=OFFLINE_MODEL_ID)

    async def list_models(self, api_key: str | None) -> list[ModelInfo]:
        """The single pseudo-model this provider answers as."""
        return [
            ModelInfo(
                id=OFFLINE_MODEL_ID, name="Offline echo (no language model)", provider=self.name
            )
        ]
