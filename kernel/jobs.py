"""Work that outlives the request that started it: runs, approvals, logins.

A job runs in the gateway's background nursery under its own cancel scope, so another
method can cancel it by id (``chat.abort``) and a third can wait for its outcome
(``agent.wait``). A job may be bound to the connection that started it, which cancels it
when that client goes away. Finished jobs are kept for a while, and only so many, so that a
late ``wait`` still finds the outcome without memory growing for days.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from .errors import GatewayError

__all__ = ["Job", "JobRegistry"]

logger = logging.getLogger(__name__)

JobState = Literal["running", "ok", "error", "cancelled"]


@dataclass(eq=False)
class Job:
    kind: str
    job_id: str
    owner: str | None
    started_at: float
    state: JobState = "running"
    result: Any = None
    error: BaseException | None = None
    ended_at: float | None = None
    cancel_reason: str | None = None
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Free for the job's owner plugin to keep its own bookkeeping (session key, ...).
    tags: dict[str, Any] = field(default_factory=dict)

    def cancel(self, reason: str = "cancelled") -> bool:
        if self.state != "running":
            return False
        self.cancel_reason = reason
        self.scope.cancel()
        return True


class JobRegistry:
    """Jobs by ``(kind, id)``.

    :param keep_finished_s: how long an outcome stays after the job ends.
    :param max_finished: how many outcomes are kept at most, oldest forgotten first.
    """

    def __init__(self, *, keep_finished_s: float = 600.0, max_finished: int = 2000) -> None:
        self._running: dict[tuple[str, str], Job] = {}
        self._finished: OrderedDict[tuple[str, str], Job] = OrderedDict()
        self._keep_finished_s = keep_finished_s
        self._max_finished = max_finished
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start(
        self,
        kind: str,
        job_id: str,
        work: Callable[[Job], Awaitable[Any]],
        *,
        owner: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> Job:
        """Start ``work(job)`` in the background and return its job at once.

        :param owner: a connection id; the job is cancelled when that connection closes.
        :raises GatewayError: 409 when a job of that kind and id is still running.
        """
        if self._nursery is None:
            raise GatewayError(503, "background jobs are not running")
        key = (kind, job_id)
        if key in self._running:
            raise GatewayError(409, f"{kind} {job_id} is already running")
        self._finished.pop(key, None)

        job = Job(kind, job_id, owner, trio.current_time(), tags=dict(tags or {}))
        self._running[key] = job
        self._nursery.start_soon(self._run, job, work, name=f"job {kind}:{job_id}")
        return job

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[Any]]) -> None:
        try:
            with job.scope:
                job.result = await work(job)
                job.state = "ok"
        except Exception as exc:
            job.state, job.error = "error", exc
            if not isinstance(exc, GatewayError):
                logger.exception("%s %s failed", job.kind, job.job_id)
        finally:
            if job.state == "running":
                job.state = "cancelled"
            job.ended_at = trio.current_time()
            self._running.pop((job.kind, job.job_id), None)
            self._remember(job)
            job.done.set()

    def _remember(self, job: Job) -> None:
        self._finished[(job.kind, job.job_id)] = job
        self._prune()

    def _prune(self) -> None:
        horizon = trio.current_time() - self._keep_finished_s
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if len(self._finished) <= self._max_finished and (oldest.ended_at or 0) >= horizon:
                break
            self._finished.popitem(last=False)

    def get(self, kind: str, job_id: str) -> Job | None:
        key = (kind, job_id)
        job = self._running.get(key)
        if job is None:
            self._prune()
            job = self._finished.get(key)
        return job

    def running(self, kind: str) -> list[Job]:
        return [job for (k, _), job in self._running.items() if k == kind]

    def cancel(self, kind: str, job_id: str, reason: str = "cancelled") -> bool:
        job = self._running.get((kind, job_id))
        return job.cancel(reason) if job else False

    def cancel_owned_by(self, owner: str, reason: str = "owner disconnected") -> int:
        jobs = [job for job in self._running.values() if job.owner == owner]
        return sum(job.cancel(reason) for job in jobs)

    async def wait(self, kind: str, job_id: str, timeout_s: float) -> Job | None:
        """The job once it ended, or ``None`` if it did not end within ``timeout_s``.

        :raises GatewayError: 404 when no such job runs or was remembered.
        """
        job = self.get(kind, job_id)
        if job is None:
            raise GatewayError(404, f"no {kind} with id {job_id}")
        with trio.move_on_after(timeout_s):
            await job.done.wait()
        return job if job.done.is_set() else None

    def statistics(self) -> dict[str, int]:
        return {"running": len(self._running), "finished": len(self._finished)}
