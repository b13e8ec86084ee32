"""Lockout after repeated authentication failures from one client (PROTOCOL.md A9).

Guessing a shared secret or a device token costs one connect per guess, so the handshake
counts failures per client IP and refuses further attempts for a while once there are too
many. Unlike upstream this is on by default, with upstream's numbers: 10 failures within
60 s lock the client out for 5 minutes; loopback clients are exempt.

The clock is trio's (``trio.current_time()``), so tests drive it with ``MockClock``. Memory
is bounded: at most ``max_keys`` clients are tracked and the least recently failing one is
forgotten first, so an attacker spraying addresses cannot grow the table without limit.
Stale clients (failures aged out, lockout over) are dropped at most every
``PRUNE_INTERVAL_MS`` as failures are recorded, so they do not crowd out live lockouts.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import trio

from kernel.locality import is_loopback, normalize_ip

__all__ = [
    "PRUNE_INTERVAL_MS",
    "AuthRateLimiter",
    "RateLimitStatus",
    "RateLimiterStatistics",
]


#: How often, at most, recording a failure also drops stale clients (upstream: every 60 s).
PRUNE_INTERVAL_MS = 60_000


@dataclass(frozen=True, slots=True)
class RateLimitStatus:
    """The answer to "may this client try to authenticate now?".

    ``retry_after_ms`` is how long the lockout still lasts, ``0`` when allowed.
    """

    allowed: bool
    retry_after_ms: int = 0


@dataclass(frozen=True, slots=True)
class RateLimiterStatistics:
    """A snapshot of the limiter's table, for ``health`` and for tests.

    :param tracked_keys: clients with recent failures or an active lockout.
    :param locked_keys: clients locked out right now.
    :param evicted_keys: clients forgotten since start because the table was full.
    :param max_keys: the table's capacity.
    """

    tracked_keys: int
    locked_keys: int
    evicted_keys: int
    max_keys: int


@dataclass(slots=True)
class _Entry:
    failures_ms: deque[float] = field(default_factory=deque)
    locked_until_ms: float | None = None


def _now_ms() -> float:
    return trio.current_time() * 1000.0


class AuthRateLimiter:
    """Per-client failure counter with a sliding window and a lockout.

    A client is identified by ``<scope>:<ip>`` (``unknown`` when there is no IP), so the
    shared-secret and device-token paths (scopes ``shared-secret``, ``device-token``) lock
    out independently. The handshake calls :meth:`check` before verifying a credential,
    :meth:`record_failure` when it is wrong and :meth:`reset` when it is right.

    :param max_attempts: failures within ``window_ms`` that trigger a lockout.
    :param window_ms: how far back failures count.
    :param lockout_ms: how long a lockout lasts; its end also clears the failure history.
    :param exempt_loopback: never limit loopback clients (the operator on the host must
        always be able to get in). Each method's ``local`` says whether the connection is
        local (PROTOCOL.md A7); a loopback address on a connection that is not (a proxy or
        tunnel on this host relaying someone else) is not exempt.
    :param max_keys: how many clients are tracked at most.
    """

    def __init__(
        self,
        *,
        max_attempts: int = 10,
        window_ms: int = 60_000,
        lockout_ms: int = 300_000,
        exempt_loopback: bool = True,
        max_keys: int = 10_000,
    ) -> None:
        for name, value in (
            ("max_attempts", max_attempts),
            ("window_ms", window_ms),
            ("lockout_ms", lockout_ms),
            ("max_keys", max_keys),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.max_attempts = max_attempts
        self.window_ms = window_ms
        self.lockout_ms = lockout_ms
        self.exempt_loopback = exempt_loopback
        self.max_keys = max_keys
        # Ordered from least to most recently failing, which is the eviction order.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._evicted = 0
        # Built outside trio too (config checks), so the first failure starts the interval.
        self._pruned_at_ms: float | None = None

    def _key(self, scope: str, ip: str | None) -> str:
        address = normalize_ip(ip) if ip else ""
        return f"{scope}:{address or 'unknown'}"

    def _is_exempt(self, ip: str | None, local: bool) -> bool:
        return self.exempt_loopback and local and ip is not None and is_loopback(ip)

    def _forget_old_failures(self, entry: _Entry, now_ms: float) -> None:
        window_start = now_ms - self.window_ms
        while entry.failures_ms and entry.failures_ms[0] <= window_start:
            entry.failures_ms.popleft()

    def _is_stale(self, entry: _Entry, now_ms: float) -> bool:
        if entry.locked_until_ms is not None:
            return now_ms >= entry.locked_until_ms
        self._forget_old_failures(entry, now_ms)
        return not entry.failures_ms

    def check(self, scope: str, ip: str | None, *, local: bool = True) -> RateLimitStatus:
        """Say whether ``ip`` may attempt authentication in ``scope`` now.

        Does not count as an attempt; only :meth:`record_failure` does.
        """
        if self._is_exempt(ip, local):
            return RateLimitStatus(allowed=True)
        key = self._key(scope, ip)
        entry = self._entries.get(key)
        if entry is None or entry.locked_until_ms is None:
            return RateLimitStatus(allowed=True)
        now_ms = _now_ms()
        if now_ms >= entry.locked_until_ms:
            del self._entries[key]
            return RateLimitStatus(allowed=True)
        retry_after_ms = max(1, math.ceil(entry.locked_until_ms - now_ms))
        return RateLimitStatus(allowed=False, retry_after_ms=retry_after_ms)

    def record_failure(self, scope: str, ip: str | None, *, local: bool = True) -> None:
        """Count one failed attempt; lock the client out once the window holds too many.

        Failures while locked out are not counted, so hammering a locked client does not
        extend its lockout.
        """
        if self._is_exempt(ip, local):
            return
        key = self._key(scope, ip)
        now_ms = _now_ms()
        if self._pruned_at_ms is None:
            self._pruned_at_ms = now_ms
        elif now_ms - self._pruned_at_ms >= PRUNE_INTERVAL_MS:
            self.prune()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._insert(key)
        elif entry.locked_until_ms is not None:
            if now_ms < entry.locked_until_ms:
                return
            entry.locked_until_ms = None
            entry.failures_ms.clear()
        self._forget_old_failures(entry, now_ms)
        entry.failures_ms.append(now_ms)
        if len(entry.failures_ms) >= self.max_attempts:
            entry.locked_until_ms = now_ms + self.lockout_ms
            entry.failures_ms.clear()  # the lock's end clears history anyway
        self._entries.move_to_end(key)

    def reset(self, scope: str, ip: str | None) -> None:
        """Forget ``ip``'s failures in ``scope``: it has just authenticated."""
        self._entries.pop(self._key(scope, ip), None)

    def prune(self) -> int:
        """Drop clients whose failures have aged out or whose lockout has ended.

        Runs by itself when a failure is recorded at least ``PRUNE_INTERVAL_MS`` after the
        last run (upstream prunes every 60 s); returns how many were dropped.
        """
        now_ms = _now_ms()
        self._pruned_at_ms = now_ms
        stale = [key for key, entry in self._entries.items() if self._is_stale(entry, now_ms)]
        for key in stale:
            del self._entries[key]
        return len(stale)

    def statistics(self) -> RateLimiterStatistics:
        """Return counts describing the current table."""
        now_ms = _now_ms()
        locked = sum(
            1
            for entry in self._entries.values()
            if entry.locked_until_ms is not None and now_ms < entry.locked_until_ms
        )
        return RateLimiterStatistics(
            tracked_keys=len(self._entries),
            locked_keys=locked,
            evicted_keys=self._evicted,
            max_keys=self.max_keys,
        )

    def _insert(self, key: str) -> _Entry:
        while len(self._entries) >= self.max_keys:
            self._entries.popitem(last=False)
            self._evicted += 1
        entry = _Entry()
        self._entries[key] = entry
        return entry
