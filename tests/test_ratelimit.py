"""Authentication rate limiting (PROTOCOL.md A9, on by default here).

Time is trio's ``MockClock``: the ``mock_clock`` fixture only moves when a test calls
``jump``; ``autojump_clock`` skips ahead whenever every task sleeps.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.ratelimit import AuthRateLimiter, RateLimiterStatistics, RateLimitStatus

SHARED = "shared-secret"
DEVICE = "device-token"
CLIENT_IP = "203.0.113.7"


def fail(limiter: AuthRateLimiter, times: int, ip: str | None = CLIENT_IP) -> None:
    for _ in range(times):
        limiter.record_failure(SHARED, ip)


async def test_nine_failures_are_tolerated_the_tenth_locks_out(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 9)
    assert limiter.check(SHARED, CLIENT_IP) == RateLimitStatus(allowed=True, retry_after_ms=0)
    fail(limiter, 1)
    assert limiter.check(SHARED, CLIENT_IP) == RateLimitStatus(
        allowed=False, retry_after_ms=300_000
    )


async def test_lockout_counts_down_and_expires(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 10)
    mock_clock.jump(120)
    assert limiter.check(SHARED, CLIENT_IP).retry_after_ms == 180_000
    mock_clock.jump(179.9995)
    assert limiter.check(SHARED, CLIENT_IP) == RateLimitStatus(allowed=False, retry_after_ms=1)
    mock_clock.jump(0.001)
    assert limiter.check(SHARED, CLIENT_IP).allowed


async def test_lock_expiry_clears_history(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 10)
    mock_clock.jump(300)
    fail(limiter, 9)
    assert limiter.check(SHARED, CLIENT_IP).allowed
    fail(limiter, 1)
    assert not limiter.check(SHARED, CLIENT_IP).allowed


async def test_failures_during_lockout_neither_count_nor_extend_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 10)
    mock_clock.jump(100)
    fail(limiter, 50)
    assert limiter.check(SHARED, CLIENT_IP).retry_after_ms == 200_000
    mock_clock.jump(200)
    fail(limiter, 9)  # would lock at once if the 50 had been counted
    assert limiter.check(SHARED, CLIENT_IP).allowed


async def test_failure_recorded_after_expiry_without_a_check_starts_afresh(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 10)
    mock_clock.jump(301)
    fail(limiter, 1)
    assert limiter.check(SHARED, CLIENT_IP).allowed
    assert limiter.statistics().locked_keys == 0


async def test_window_slides(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 5)
    mock_clock.jump(30)
    fail(limiter, 4)
    mock_clock.jump(30)  # the first five are now exactly 60 s old: out of the window
    fail(limiter, 1)
    assert limiter.check(SHARED, CLIENT_IP).allowed
    fail(limiter, 4)  # 4 + 1 + 4 = 9 in window
    assert limiter.check(SHARED, CLIENT_IP).allowed
    fail(limiter, 1)
    assert not limiter.check(SHARED, CLIENT_IP).allowed


async def test_failures_just_inside_the_window_count(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 9)
    mock_clock.jump(59.999)
    fail(limiter, 1)
    assert not limiter.check(SHARED, CLIENT_IP).allowed


async def test_success_forgets_the_failures(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 9)
    limiter.reset(SHARED, CLIENT_IP)
    assert limiter.statistics().tracked_keys == 0
    fail(limiter, 9)
    assert limiter.check(SHARED, CLIENT_IP).allowed


async def test_reset_lifts_a_lockout(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 10)
    limiter.reset(SHARED, CLIENT_IP)
    assert limiter.check(SHARED, CLIENT_IP).allowed


async def test_scopes_and_addresses_are_counted_separately(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 10)
    assert limiter.check(DEVICE, CLIENT_IP).allowed
    assert limiter.check(SHARED, "203.0.113.8").allowed
    assert not limiter.check(SHARED, CLIENT_IP).allowed


async def test_spellings_of_one_address_share_a_key(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 5, ip="::ffff:203.0.113.7")
    fail(limiter, 5, ip=" 203.0.113.7 ")
    assert not limiter.check(SHARED, CLIENT_IP).allowed
    fail(limiter, 10, ip="2001:DB8::1")
    assert not limiter.check(SHARED, "[2001:db8:0:0:0:0:0:1]").allowed


async def test_clients_without_an_address_share_the_unknown_key(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 5, ip=None)
    fail(limiter, 5, ip="")
    assert not limiter.check(SHARED, None).allowed
    assert limiter.check(SHARED, CLIENT_IP).allowed


@pytest.mark.parametrize("loopback_ip", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_loopback_is_exempt_by_default(
    mock_clock: trio.testing.MockClock, loopback_ip: str
) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 100, ip=loopback_ip)
    assert limiter.check(SHARED, loopback_ip).allowed
    assert limiter.statistics().tracked_keys == 0


async def test_loopback_exemption_can_be_turned_off(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter(exempt_loopback=False)
    fail(limiter, 10, ip="127.0.0.1")
    assert not limiter.check(SHARED, "127.0.0.1").allowed


@pytest.mark.parametrize("loopback_ip", ["127.0.0.1", "::1"])
async def test_loopback_relaying_someone_else_is_not_exempt(
    mock_clock: trio.testing.MockClock, loopback_ip: str
) -> None:
    # A proxy or tunnel on this host: the peer is loopback, the connection is not local.
    limiter = AuthRateLimiter()
    for _ in range(10):
        limiter.record_failure(SHARED, loopback_ip, local=False)
    status = limiter.check(SHARED, loopback_ip, local=False)
    assert status == RateLimitStatus(allowed=False, retry_after_ms=300_000)
    assert limiter.check(SHARED, loopback_ip).allowed  # the operator on the host still can
    fail(limiter, 10, ip="203.0.113.9")  # and local=True changes nothing for other addresses
    assert not limiter.check(SHARED, "203.0.113.9").allowed


async def test_custom_limits(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter(max_attempts=2, window_ms=1_000, lockout_ms=5_000)
    fail(limiter, 1)
    mock_clock.jump(1)
    fail(limiter, 1)
    assert limiter.check(SHARED, CLIENT_IP).allowed
    fail(limiter, 1)
    assert limiter.check(SHARED, CLIENT_IP) == RateLimitStatus(allowed=False, retry_after_ms=5_000)


@pytest.mark.parametrize("setting", ["max_attempts", "window_ms", "lockout_ms", "max_keys"])
def test_limits_must_be_positive(setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        AuthRateLimiter(**{setting: 0})


async def test_key_cap_forgets_the_least_recently_failing_client(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = AuthRateLimiter(max_keys=3)
    fail(limiter, 8, ip="198.51.100.1")
    fail(limiter, 9, ip="198.51.100.2")
    fail(limiter, 1, ip="198.51.100.3")
    fail(limiter, 1, ip="198.51.100.1")  # .1 is now the most recent, with 9 failures
    fail(limiter, 1, ip="198.51.100.4")  # table full: .2, the least recent, is forgotten
    assert limiter.statistics() == RateLimiterStatistics(
        tracked_keys=3, locked_keys=0, evicted_keys=1, max_keys=3
    )
    fail(limiter, 1, ip="198.51.100.2")
    assert limiter.check(SHARED, "198.51.100.2").allowed  # its 9 failures went with it
    fail(limiter, 1, ip="198.51.100.1")
    assert not limiter.check(SHARED, "198.51.100.1").allowed  # kept all along
    assert limiter.statistics().evicted_keys == 2  # .2 coming back pushed out .3


async def test_address_spray_cannot_grow_memory(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    for index in range(25_000):
        limiter.record_failure(SHARED, f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}")
    statistics = limiter.statistics()
    assert statistics.tracked_keys == 10_000
    assert statistics.evicted_keys == 15_000


async def test_prune_drops_only_stale_clients(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 10, ip="198.51.100.1")  # locked until t=300 s
    fail(limiter, 3, ip="198.51.100.2")  # ages out at t=60 s
    mock_clock.jump(59)
    fail(limiter, 1, ip="198.51.100.3")  # ages out at t=119 s
    assert limiter.prune() == 0
    mock_clock.jump(1)
    assert limiter.prune() == 1
    assert limiter.statistics().tracked_keys == 2
    mock_clock.jump(240)
    assert limiter.prune() == 2
    assert limiter.statistics() == RateLimiterStatistics(
        tracked_keys=0, locked_keys=0, evicted_keys=0, max_keys=10_000
    )


async def test_stale_clients_are_pruned_as_new_failures_arrive(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 1, ip="198.51.100.1")  # ages out at t=60 s
    fail(limiter, 10, ip="198.51.100.2")  # locked until t=300 s
    mock_clock.jump(59)
    fail(limiter, 1, ip="198.51.100.3")  # under a minute since the last prune: none
    assert limiter.statistics().tracked_keys == 3
    mock_clock.jump(1)
    fail(limiter, 1, ip="198.51.100.4")  # a minute on: .1 is dropped, the lockout kept
    assert limiter.statistics().tracked_keys == 3
    assert not limiter.check(SHARED, "198.51.100.2").allowed
    mock_clock.jump(59)
    fail(limiter, 1, ip="198.51.100.5")  # .3 aged out, but the last prune was 59 s ago
    assert limiter.statistics().tracked_keys == 4
    mock_clock.jump(241)
    fail(limiter, 1, ip="198.51.100.6")  # t=360 s: all but the newest are stale
    assert limiter.statistics() == RateLimiterStatistics(
        tracked_keys=1, locked_keys=0, evicted_keys=0, max_keys=10_000
    )


async def test_statistics_count_only_live_lockouts(mock_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    fail(limiter, 10, ip="198.51.100.1")
    fail(limiter, 10, ip="198.51.100.2")
    fail(limiter, 1, ip="198.51.100.3")
    assert limiter.statistics().locked_keys == 2
    mock_clock.jump(300)
    statistics = limiter.statistics()
    assert statistics.locked_keys == 0
    assert statistics.tracked_keys == 3  # expired, but not pruned yet


async def test_lockout_across_real_sleeps(autojump_clock: trio.testing.MockClock) -> None:
    limiter = AuthRateLimiter()
    for _ in range(10):
        limiter.record_failure(DEVICE, CLIENT_IP)
        await trio.sleep(1)
    status = limiter.check(DEVICE, CLIENT_IP)
    assert not status.allowed
    await trio.sleep(status.retry_after_ms / 1000)
    assert limiter.check(DEVICE, CLIENT_IP).allowed


# -- property: the limiter agrees with a direct reading of A9 ------------------------------

MAX_ATTEMPTS = 3
WINDOW_S = 10
LOCKOUT_S = 30

events = st.lists(
    st.tuples(st.sampled_from(["fail", "check", "reset"]), st.integers(0, 2 * WINDOW_S)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_matches_a_reference_model(steps: list[tuple[str, int]]) -> None:
    """Replay random failures, checks and resets against a plain model of the rules.

    Clock steps are whole seconds so the float clock is exact and boundaries line up.
    """

    async def replay() -> None:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        limiter = AuthRateLimiter(
            max_attempts=MAX_ATTEMPTS, window_ms=WINDOW_S * 1000, lockout_ms=LOCKOUT_S * 1000
        )
        now = 0
        failures: list[int] = []
        locked_until: int | None = None
        for action, gap in steps:
            clock.jump(gap)
            now += gap
            if locked_until is not None and now >= locked_until:
                locked_until, failures = None, []
            if action == "fail":
                limiter.record_failure(SHARED, CLIENT_IP)
                if locked_until is None:
                    failures = [t for t in failures if now - t < WINDOW_S] + [now]
                    if len(failures) >= MAX_ATTEMPTS:
                        locked_until, failures = now + LOCKOUT_S, []
            elif action == "reset":
                limiter.reset(SHARED, CLIENT_IP)
                locked_until, failures = None, []
            expected = (
                RateLimitStatus(allowed=True)
                if locked_until is None
                else RateLimitStatus(allowed=False, retry_after_ms=(locked_until - now) * 1000)
            )
            assert limiter.check(SHARED, CLIENT_IP) == expected
            assert limiter.statistics().tracked_keys <= 1

    trio.run(replay, clock=trio.testing.MockClock())


@settings(max_examples=50, deadline=None)
@given(
    max_keys=st.integers(1, 20),
    addresses=st.lists(st.ip_addresses().map(str), max_size=80),
)
def test_table_never_exceeds_its_cap(max_keys: int, addresses: list[str]) -> None:
    async def spray() -> None:
        limiter = AuthRateLimiter(max_keys=max_keys, exempt_loopback=False)
        for address in addresses:
            limiter.record_failure(SHARED, address)
            assert limiter.statistics().tracked_keys <= max_keys

    trio.run(spray, clock=trio.testing.MockClock())
