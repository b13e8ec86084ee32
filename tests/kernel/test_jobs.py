"""Background jobs and the idempotency cache: outcomes kept for a while, and only so many.

No sockets here, so trio's autojump clock stands in for minutes of waiting.
"""

from __future__ import annotations

import pytest
import trio

from kernel import GatewayError, JobRegistry
from kernel.idempotency import IdempotencyCache


async def _answer(job):
    return f"done {job.job_id}"


async def _sleep_long(job):
    await trio.sleep(3600)
    return "late"


@pytest.fixture
def jobs(nursery) -> JobRegistry:
    registry = JobRegistry(keep_finished_s=60, max_finished=3)
    registry.attach(nursery)
    return registry


async def test_outcome_is_kept_for_a_while_then_forgotten(jobs, autojump_clock):
    job = jobs.start("run", "a", _answer)
    await job.done.wait()
    assert jobs.get("run", "a") is job
    assert (job.state, job.result) == ("ok", "done a")
    await trio.sleep(59)
    assert jobs.get("run", "a") is job
    await trio.sleep(2)
    assert jobs.get("run", "a") is None
    with pytest.raises(GatewayError) as missing:
        await jobs.wait("run", "a", 1)
    assert missing.value.code == 404


async def test_only_so_many_outcomes_are_kept(jobs, autojump_clock):
    for n in range(5):
        await jobs.start("run", str(n), _answer).done.wait()
    assert [jobs.get("run", str(n)) is not None for n in range(5)] == [False, False] + [True] * 3
    assert jobs.statistics() == {"running": 0, "finished": 3}


async def test_wait_gives_up_after_its_timeout_and_the_job_goes_on(jobs, autojump_clock):
    job = jobs.start("run", "slow", _sleep_long)
    assert await jobs.wait("run", "slow", 5) is None
    assert job.state == "running"
    assert await jobs.wait("run", "slow", 7200) is job
    assert job.result == "late"


async def test_a_running_id_cannot_be_started_twice(jobs, autojump_clock):
    jobs.start("run", "x", _sleep_long)
    with pytest.raises(GatewayError) as clash:
        jobs.start("run", "x", _sleep_long)
    assert clash.value.code == 409
    # The same id of another kind is another job.
    jobs.start("other", "x", _sleep_long)


async def test_jobs_of_an_owner_are_cancelled_with_it(jobs, autojump_clock):
    mine = [jobs.start("run", str(n), _sleep_long, owner="conn-1") for n in range(2)]
    theirs = jobs.start("run", "t", _sleep_long, owner="conn-2")
    assert jobs.cancel_owned_by("conn-1") == 2
    for job in mine:
        await job.done.wait()
        assert (job.state, job.cancel_reason) == ("cancelled", "owner disconnected")
    assert theirs.state == "running"


async def test_a_failing_job_records_its_error(jobs, autojump_clock):
    async def fail(job):
        raise GatewayError(503, "back end down")

    job = jobs.start("run", "f", fail)
    await job.done.wait()
    assert job.state == "error"
    assert job.error.code == 503


# -- idempotency ------------------------------------------------------------------------------


async def test_idempotent_outcome_expires_after_its_ttl(autojump_clock):
    cache = IdempotencyCache(ttl_s=300, max_entries=10)
    runs = []

    async def work():
        runs.append(trio.current_time())
        return len(runs)

    assert await cache.run(("m", "k"), work) == 1
    await trio.sleep(299)
    assert await cache.run(("m", "k"), work) == 1
    await trio.sleep(2)
    assert await cache.run(("m", "k"), work) == 2


async def test_idempotency_cache_is_bounded(autojump_clock):
    cache = IdempotencyCache(ttl_s=300, max_entries=3)

    async def work():
        return "x"

    for n in range(10):
        await cache.run(("m", str(n)), work)
        assert len(cache) <= 3


async def test_waiter_takes_over_when_the_first_request_is_cancelled(autojump_clock):
    cache = IdempotencyCache()
    outcomes = []

    async def slow():
        await trio.sleep(3600)
        return "first"

    async def quick():
        return "second"

    first_scope = trio.CancelScope()

    async def first():
        with first_scope:
            outcomes.append(await cache.run(("m", "k"), slow))

    async def second():
        outcomes.append(await cache.run(("m", "k"), quick))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.sleep(1)
        nursery.start_soon(second)
        await trio.sleep(1)
        # The first caller goes away: its waiter does the work itself.
        first_scope.cancel()
    assert outcomes == ["second"]
    assert len(cache) == 1
