"""HTTP plumbing shared by the providers that reach a model API over the network.

``ProviderHttp`` owns one lazily created ``httpx.AsyncClient`` and turns everything that can go
wrong on the wire into a ``ProviderError`` of the right kind, so the OpenAI-compatible and the
Anthropic providers only describe their own request bodies and event formats. Messages name
the provider and its base URL and quote the server's own error message when it sent one; the
API key is never part of a message, and is blanked out if a server echoes it back.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any, TypeVar

import httpx
import msgspec
import trio

from kernel.providers import ProviderError, ProviderErrorKind

from ._sse import SSEDecoder, SSEError, SSEEvent

__all__ = [
    "ProviderHttp",
    "error_message_from_body",
    "error_message_from_document",
    "quote_server_message",
    "retry_after_ms",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How much of an error body is read to find the server's message; the rest is not needed.
ERROR_BODY_LIMIT = 64 * 1024
#: Bound on a non-streamed JSON answer (a model listing); a bigger one is refused.
JSON_BODY_LIMIT = 8 * 1024 * 1024
#: Longest server-provided message quoted in a ``ProviderError``.
QUOTED_MESSAGE_CHARS = 300
#: Closing a response only closes a socket; this bound matters only if that ever blocks.
CLOSE_GRACE_S = 2.0

_any_json = msgspec.json.Decoder()


class ProviderHttp:
    """One provider's HTTP client, with the error mapping every HTTP provider shares.

    :param display_name: the provider's name as people read it, used in error messages.
    :param base_url: the API root; quoted in messages so an operator sees which server failed.
    :param timeout_s: longest wait for any read or write, including the gap between two
        chunks of a stream.
    :param connect_timeout_s: longest wait for a connection to be established.
    """

    def __init__(
        self,
        *,
        display_name: str,
        base_url: str,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = f"{display_name} at {self.base_url}"
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        """Close the client and its pooled connections; a later request opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def error(self, kind: ProviderErrorKind, detail: str, **extra: Any) -> ProviderError:
        """A ``ProviderError`` whose message starts with this provider's label."""
        return ProviderError(kind, f"{self.label}: {detail}", **extra)

    def decode(self, decoder: msgspec.json.Decoder[T], data: bytes | str, what: str) -> T:
        """Decode ``data`` with ``decoder``, turning a malformed body into ``bad_response``."""
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise self.error("bad_response", f"malformed {what}: {exc}") from None

    async def stream_events(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        api_key: str | None,
    ) -> AsyncIterator[SSEEvent]:
        """POST ``body`` to ``url`` and yield the server-sent events of the answer.

        The response is closed when the body ends, when the iterator is closed early and when
        the caller is cancelled; closing drops the connection, so the server stops generating.
        """
        response = await self._open("POST", url, headers, body, api_key)
        try:
            if response.headers.get("content-type", "").startswith("application/json"):
                body_prefix = await _read_prefix(response, ERROR_BODY_LIMIT)
                detail = "answered with JSON instead of an event stream"
                quoted = error_message_from_body(body_prefix)
                raise self.error("bad_response", quote_server_message(detail, quoted, api_key))
            decoder = SSEDecoder()
            async with aclosing(response.aiter_bytes()) as chunks:
                async for chunk in chunks:
                    for event in decoder.feed(chunk):
                        yield event
            for event in decoder.close():
                yield event
        except httpx.TimeoutException:
            detail = f"the stream sent nothing for {self._timeout.read} s"
            raise self.error("unreachable", detail) from None
        except httpx.RequestError as exc:
            detail = f"the stream broke off: {_describe(exc)}"
            raise self.error("bad_response", detail) from None
        except SSEError as exc:
            raise self.error("bad_response", str(exc)) from None
        finally:
            await _close_response(response)

    async def get_json(self, url: str, *, headers: Mapping[str, str], api_key: str | None) -> bytes:
        """GET ``url`` and return its body, bounded by ``JSON_BODY_LIMIT``."""
        response = await self._open("GET", url, headers, None, api_key)
        try:
            body = await _read_prefix(response, JSON_BODY_LIMIT + 1)
        except httpx.TimeoutException:
            detail = f"the answer sent nothing for {self._timeout.read} s"
            raise self.error("unreachable", detail) from None
        except httpx.RequestError as exc:
            raise self.error("bad_response", f"the answer broke off: {_describe(exc)}") from None
        finally:
            await _close_response(response)
        if len(body) > JSON_BODY_LIMIT:
            raise self.error("bad_response", f"answer larger than {JSON_BODY_LIMIT} bytes")
        return body

    async def _open(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        api_key: str | None,
    ) -> httpx.Response:
        """Send a request and return its open response, or raise for a failed status."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        try:
            request = self._client.build_request(method, url, headers=headers, content=body)
            response = await self._client.send(request, stream=True)
        except httpx.InvalidURL as exc:
            raise self.error("unreachable", f"invalid URL {url!r}: {exc}") from None
        except httpx.ConnectTimeout:
            detail = f"no connection within {self._timeout.connect} s"
            raise self.error("unreachable", detail) from None
        except httpx.TimeoutException:
            detail = f"no answer within {self._timeout.read} s"
            raise self.error("unreachable", detail) from None
        except httpx.ConnectError as exc:
            raise self.error("unreachable", f"cannot connect: {_describe(exc)}") from None
        except httpx.RequestError as exc:
            raise self.error("unreachable", f"no answer: {_describe(exc)}") from None
        logger.debug("%s %s -> %d", method, url, response.status_code)
        if response.is_success:
            return response
        try:
            body = await _read_prefix(response, ERROR_BODY_LIMIT)
        except httpx.RequestError:
            body = b""
        finally:
            await _close_response(response)
        raise self._status_error(response, body, api_key)

    def _status_error(
        self, response: httpx.Response, body: bytes, api_key: str | None
    ) -> ProviderError:
        status = response.status_code
        kind: ProviderErrorKind
        if status in (401, 403):
            kind, what = "auth", "the key was refused"
        elif status == 429:
            kind, what = "rate_limited", "rate limited"
        elif status >= 500:
            kind, what = "server", "server error"
        else:
            kind, what = "server", "request refused"
        detail = f"{what} (HTTP {status})"
        quoted = error_message_from_body(body) or response.reason_phrase or None
        return self.error(
            kind,
            quote_server_message(detail, quoted, api_key),
            status=status,
            retry_after_ms=retry_after_ms(response.headers) if kind == "rate_limited" else None,
        )


def error_message_from_body(body: bytes) -> str | None:
    """The server's own message in a JSON error body, or ``None`` if it holds none."""
    try:
        return error_message_from_document(_any_json.decode(body))
    except msgspec.DecodeError:
        return None


def error_message_from_document(document: Any) -> str | None:
    """The server's own message in a decoded error document, in the shapes model APIs use.

    OpenAI, Anthropic and most compatible servers send ``{"error": {"message": ...}}``; some
    local servers send ``{"error": "..."}``, ``{"message": "..."}`` or ``{"detail": "..."}``.
    """
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    candidates = [
        error.get("message") if isinstance(error, dict) else error,
        document.get("message"),
        document.get("detail"),
    ]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip()
    return None


def retry_after_ms(headers: Mapping[str, str], *, now: float | None = None) -> int | None:
    """The server's wait hint in milliseconds, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` is either a number of seconds or an HTTP date; a date in the past means
    "now" (0). An unreadable value gives ``None`` rather than a guess.
    """
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0, round(float(milliseconds)))
        except (ValueError, OverflowError):
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0, round(float(value) * 1000))
    except OverflowError:
        return None
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0, round((moment.timestamp() - current) * 1000))


def quote_server_message(detail: str, quoted: str | None, api_key: str | None) -> str:
    """``detail``, followed by the server's message truncated and with the key blanked out."""
    if not quoted:
        return detail
    if api_key:
        quoted = quoted.replace(api_key, "[redacted]")  # before truncating, which could split it
    if len(quoted) > QUOTED_MESSAGE_CHARS:
        quoted = quoted[: QUOTED_MESSAGE_CHARS - 1] + "…"
    return f"{detail}: {quoted}"


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


async def _read_prefix(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of the body; the rest is never read."""
    parts: list[bytes] = []
    size = 0
    async with aclosing(response.aiter_bytes()) as chunks:
        async for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    return b"".join(parts)[:limit]


async def _close_response(response: httpx.Response) -> None:
    # Shielded: a cancelled run must still drop the connection, or the server keeps
    # generating (and billing) tokens nobody reads.
    with trio.move_on_after(CLOSE_GRACE_S, shield=True):
        await response.aclose()
