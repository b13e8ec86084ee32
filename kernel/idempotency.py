"""Idempotency keys: a retried request gets the first request's outcome.

One gateway-wide cache keyed by ``(method, key)``. A repeat while the first request still
runs waits for it instead of doing the work twice. Outcomes are kept for five minutes and at
most ``max_entries`` of them, so the cache cannot grow without bound. A request cancelled
before it finished (its caller went away) leaves nothing behind, and a waiting repeat then
does the work itself. So does a failure that a retry may mend (a back end down, a rate
limit): replaying it would turn a passing outage into one that lasts five minutes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .errors import GatewayError

__all__ = ["IdempotencyCache"]


class _Entry:
    __slots__ = ("done", "error", "finished_at", "payload")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.payload: Any = None
        self.error: GatewayError | None = None
        self.finished_at: float | None = None


class IdempotencyCache:
    def __init__(self, *, ttl_s: float = 300.0, max_entries: int = 1000) -> None:
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._ttl_s = ttl_s
        self._max_entries = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def _prune(self) -> None:
        """Drop expired outcomes, and the oldest ones past the bound.

        Called just before an entry may be added, so it leaves room for that one.
        """
        horizon = trio.current_time() - self._ttl_s
        for key in list(self._entries):
            entry = self._entries[key]
            expired = entry.finished_at is not None and entry.finished_at < horizon
            if not expired and len(self._entries) < self._max_entries:
                break
            if entry.finished_at is None and not expired:
                # Never evict a request that is still running; its waiters rely on it.
                self._entries.move_to_end(key)
                continue
            del self._entries[key]

    async def run(self, key: tuple[str, str], work: Callable[[], Awaitable[Any]]) -> Any:
        """Return the outcome stored for ``key``, waiting for it or producing it with ``work``.

        A stored failure is raised again, as the same ``GatewayError``.
        """
        while True:
            self._prune()
            entry = self._entries.get(key)
            if entry is None:
                break
            await entry.done.wait()
            if entry.finished_at is not None:
                if entry.error is not None:
                    raise entry.error
                return entry.payload
            # The first request was cancelled; loop to take its place.

        entry = _Entry()
        self._entries[key] = entry
        try:
            entry.payload = await work()
        except GatewayError as exc:
            if _worth_retrying(exc):
                del self._entries[key]
            else:
                entry.error = exc
            raise
        except BaseException:
            del self._entries[key]
            raise
        finally:
            if key in self._entries:
                entry.finished_at = trio.current_time()
            entry.done.set()
        return entry.payload


def _worth_retrying(error: GatewayError) -> bool:
    """Whether the same request sent again may succeed, so its failure is not the outcome."""
    if error.retryable is not None:
        return error.retryable
    return error.code >= 500 or error.code == 429
