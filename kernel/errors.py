"""Errors a method can answer with, and the numeric codes the wire carries.

A handler raises ``GatewayError`` (or one of the helpers below) to answer a request with a
failure the caller can act on. Anything else a handler raises becomes a 500 whose message
says nothing about the internals; the traceback goes to the log only.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ERROR_REASONS",
    "GatewayError",
    "conflict",
    "forbidden",
    "internal",
    "invalid_request",
    "not_found",
    "rate_limited",
    "timed_out",
    "unauthorized",
    "unavailable",
]

#: The symbolic ``reason`` that goes with each numeric ``code`` unless a caller picks a more
#: precise one (``NOT_PAIRED`` is a 403 with its own reason, for example).
ERROR_REASONS: dict[int, str] = {
    400: "INVALID_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONFLICT",
    413: "TOO_LARGE",
    429: "RATE_LIMITED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "TIMEOUT",
}


class GatewayError(Exception):
    """A failure that is answered to the caller as an error response.

    :param code: the numeric code (400, 401, 403, 404, 409, 413, 429, 500, 503, 504).
    :param message: one sentence for a person; name the field or object involved.
    :param reason: the symbolic name; defaults to the usual one for ``code``.
    :param details: a JSON-encodable object the client may act on (``requestId``, ``field``).
    :param retryable: whether sending the same request later may succeed.
    :param retry_after_ms: how long to wait before retrying, when known.
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: Any = None,
        retryable: bool | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or ERROR_REASONS.get(code, "INTERNAL")
        self.details = details
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms

    def __repr__(self) -> str:
        return f"GatewayError({self.code}, {self.message!r}, reason={self.reason!r})"


def invalid_request(message: str, *, field: str | None = None, **kw: Any) -> GatewayError:
    """400: the frame or its params are wrong; ``field`` names the offending param."""
    if field is not None:
        kw.setdefault("details", {"field": field})
    return GatewayError(400, message, **kw)


def unauthorized(message: str, **kw: Any) -> GatewayError:
    return GatewayError(401, message, **kw)


def forbidden(message: str, **kw: Any) -> GatewayError:
    return GatewayError(403, message, **kw)


def not_found(message: str, **kw: Any) -> GatewayError:
    return GatewayError(404, message, **kw)


def conflict(message: str, **kw: Any) -> GatewayError:
    return GatewayError(409, message, **kw)


def rate_limited(message: str, *, retry_after_ms: int, **kw: Any) -> GatewayError:
    return GatewayError(429, message, retryable=True, retry_after_ms=retry_after_ms, **kw)


def internal(message: str = "internal error", **kw: Any) -> GatewayError:
    return GatewayError(500, message, **kw)


def unavailable(message: str, **kw: Any) -> GatewayError:
    """503: a back end this method needs is down or disabled."""
    kw.setdefault("retryable", True)
    return GatewayError(503, message, **kw)


def timed_out(message: str, **kw: Any) -> GatewayError:
    return GatewayError(504, message, **kw)
