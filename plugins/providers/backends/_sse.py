"""An incremental parser for server-sent events, shared by the HTTP model providers.

Both the OpenAI-compatible and the Anthropic APIs stream completions as ``text/event-stream``.
The network hands the body over in chunks that may end anywhere: inside a line, between the
``\\r`` and ``\\n`` of a line ending, or inside a multi-byte UTF-8 character. ``SSEDecoder``
takes those chunks as they come and returns each event once its closing blank line arrives,
so a provider can yield text the moment the server sends it.

The rules follow the WHATWG event-stream format: lines end in CRLF, LF or CR; a line starting
with ``:`` is a comment (servers send them as keep-alives); ``data`` lines of one event are
joined with ``\\n``; ``id`` and ``retry`` are ignored because nothing here reconnects.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEError", "SSEEvent"]

_LINE_END = re.compile(r"\r\n|\r|\n")

#: Longest event (or unterminated line) the decoder buffers before giving up on the stream.
DEFAULT_MAX_EVENT_CHARS = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its type (``message`` when the server named none) and data."""

    event: str
    data: str


class SSEError(ValueError):
    """The stream broke the format in a way that cannot be recovered (an oversized event)."""


class SSEDecoder:
    """Turns body chunks into events, keeping what an incomplete line or event needs.

    :param max_event_chars: bound on buffered text, so a server that never ends a line cannot
        make the gateway hold an unbounded amount of memory.
    """

    def __init__(self, *, max_event_chars: int = DEFAULT_MAX_EVENT_CHARS) -> None:
        self._max_event_chars = max_event_chars
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial_line = ""
        self._at_stream_start = True
        self._event_type = ""
        self._data_lines: list[str] = []
        self._data_chars = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume one chunk of the body; return the events it completed, in order."""
        text = self._partial_line + self._utf8.decode(chunk)
        if self._at_stream_start and text:
            self._at_stream_start = False
            text = text.removeprefix("\ufeff")
        events: list[SSEEvent] = []
        position = 0
        while match := _LINE_END.search(text, position):
            if match.group() == "\r" and match.end() == len(text):
                break  # the "\n" of a CRLF may be the first byte of the next chunk
            self._take_line(text[position : match.start()], events)
            position = match.end()
        self._partial_line = text[position:]
        if len(self._partial_line) > self._max_event_chars:
            raise SSEError(f"event-stream line longer than {self._max_event_chars} characters")
        return events

    def close(self) -> list[SSEEvent]:
        """Finish at the end of the body; return an event the server left unterminated.

        An event whose lines all arrived but whose closing blank line did not is still
        dispatched, since some servers omit it after the last event. A line cut off in the
        middle is dropped: it is the sign of a truncated stream, not of a lax server.
        """
        tail = self._partial_line + self._utf8.decode(b"", final=True)
        self._partial_line = ""
        events: list[SSEEvent] = []
        if tail.endswith("\r"):
            self._take_line(tail[:-1], events)
        self._take_line("", events)
        return events

    def _take_line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._data_lines:
                events.append(SSEEvent(self._event_type or "message", "\n".join(self._data_lines)))
            self._event_type = ""
            self._data_lines = []
            self._data_chars = 0
            return
        if line.startswith(":"):
            return
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data_chars += len(value) + 1
            if self._data_chars > self._max_event_chars:
                raise SSEError(f"event-stream event longer than {self._max_event_chars} characters")
            self._data_lines.append(value)
        elif field == "event":
            self._event_type = value
