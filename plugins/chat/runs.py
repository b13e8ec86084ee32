"""Runs: one agent turn, from the user's message in the transcript to the assistant's.

A run is a kernel job (``services.jobs``), so ``chat.abort`` cancels it through the job's
cancel scope and ``agent.wait`` waits on it. Runs of one session take turns (a lane per
session), so each sees the previous answer in its context and transcripts stay in order.

Every run ends with exactly one final event: ``chat.run.completed``, or ``chat.run.failed``
carrying either an ``error`` or ``aborted: true`` with the ``stopReason`` (``rpc`` for
``chat.abort``, ``stop`` for a stop word, ``timeout``, ``shutdown``). Whatever text streamed
before an abort or a failure is kept in the transcript, marked ``stopReason: aborted`` or
``error`` and ``label: partial``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from kernel import GatewayError, Job, ProviderError, Services, StreamDone, TextDelta

from .config import ChatConfig

__all__ = ["Run", "RunEngine", "SessionLanes", "provider_failure", "run_limit_s"]

logger = logging.getLogger(__name__)

#: Longest a cancelled run spends recording its partial answer and final event.
FINISH_GRACE_S = 5.0
RUN_KINDS = ("chat", "agent")


@dataclass(eq=False)
class Run:
    kind: str
    run_id: str
    session_key: str
    user_message_id: str
    user_text: str
    route: dict[str, Any]
    limit_s: float
    accepted_at: int
    extra_system: str | None = None
    parts: list[str] = field(default_factory=list)
    rotations: list[dict[str, Any]] = field(default_factory=list)
    started_at: int | None = None
    ended_at: int | None = None
    #: The one final event went out; nothing may follow it.
    finished: bool = False
    stop_reason: str | None = None
    error: GatewayError | None = None

    def base(self) -> dict[str, Any]:
        return {"runId": self.run_id, "sessionKey": self.session_key}

    def who(self) -> dict[str, Any]:
        """Which provider and model answer: stated on every run event but deltas."""
        return {
            "provider": self.route["provider"],
            "providerName": self.route.get("displayName"),
            "model": self.route["model"],
        }


def run_limit_s(timeout_ms: int | None, config: ChatConfig) -> float:
    """How long a run may take, A18-style: timeout plus grace, clamped; 0 is the maximum."""
    if timeout_ms is None:
        timeout_ms = config.default_timeout_ms
    if timeout_ms == 0:
        return config.max_run_ms / 1000
    limit = max(timeout_ms + config.timeout_grace_ms, config.min_run_ms)
    return min(limit, config.max_run_ms) / 1000


def provider_failure(exc: ProviderError) -> GatewayError:
    """A provider's failure as the run's error: 429 when rate limited, else 503."""
    code = 429 if exc.kind == "rate_limited" else 503
    details: dict[str, Any] = {"providerError": exc.kind}
    if exc.status is not None:
        details["status"] = exc.status
    return GatewayError(
        code,
        exc.message,
        details=details,
        retryable=exc.kind in ("rate_limited", "server", "unreachable"),
        retry_after_ms=exc.retry_after_ms,
    )


def error_payload(error: GatewayError) -> dict[str, Any]:
    payload: dict[str, Any] = {"code": error.code, "reason": error.reason, "message": error.message}
    if error.details is not None:
        payload["details"] = error.details
    if error.retryable is not None:
        payload["retryable"] = error.retryable
    if error.retry_after_ms is not None:
        payload["retryAfterMs"] = error.retry_after_ms
    return payload


class SessionLanes:
    """One lock per session with runs waiting or running; forgotten when none are."""

    def __init__(self) -> None:
        self._lanes: dict[str, tuple[trio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._lanes.setdefault(key, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._lanes[key]

    def __len__(self) -> int:
        return len(self._lanes)


class RunEngine:
    """Starts runs as jobs and carries each to its one final event."""

    def __init__(self, config_source: Any) -> None:
        #: ``config_source()`` gives the chat config in force (it may change at run time).
        self._config = config_source
        self.lanes = SessionLanes()

    def start(self, services: Services, run: Run) -> Job:
        return services.jobs.start(
            run.kind,
            run.run_id,
            partial(self._work, services, run),
            tags={"sessionKey": run.session_key, "run": run},
        )

    @staticmethod
    def find(services: Services, run_id: str) -> Job | None:
        """A chat or agent run by id, running or remembered."""
        for kind in RUN_KINDS:
            job = services.jobs.get(kind, run_id)
            if job is not None:
                return job
        return None

    @staticmethod
    def running_in(services: Services, session_key: str) -> list[Job]:
        return [
            job
            for kind in RUN_KINDS
            for job in services.jobs.running(kind)
            if job.tags.get("sessionKey") == session_key
        ]

    # -- the job ---------------------------------------------------------------------------

    async def _work(self, services: Services, run: Run, job: Job) -> dict[str, Any]:
        error: GatewayError
        try:
            with trio.move_on_after(run.limit_s):
                return await self._execute(services, run)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(FINISH_GRACE_S):
                await self._aborted(services, run, job.cancel_reason or "shutdown")
            raise
        except ProviderError as exc:
            error = provider_failure(exc)
        except GatewayError as exc:
            error = exc
        except Exception:
            logger.exception("run %s failed", run.run_id)
            error = GatewayError(500, "internal error while running the turn")
        else:
            # Only reached when the time limit ended the block: a return leaves otherwise.
            await self._aborted(services, run, "timeout")
            raise GatewayError(504, f"the run took longer than {run.limit_s:g} s")
        finally:
            run.ended_at = services.clock.now_ms()
        await self._failed(services, run, error)
        raise error

    async def _execute(self, services: Services, run: Run) -> dict[str, Any]:
        sessions = services.lookup("sessions")
        models = services.lookup("models")
        async with self.lanes.hold(run.session_key):
            run.started_at = services.clock.now_ms()
            services.events.emit(
                "chat.run.started",
                {
                    **run.base(),
                    **run.who(),
                    "providerReason": run.route.get("reason"),
                    "kind": run.kind,
                    "startedAt": run.started_at,
                    "userMessageId": run.user_message_id,
                },
            )
            messages = await self._context(sessions, run)
            done: StreamDone | None = None
            events = models.stream(
                run.route, messages, on_rotate=partial(self._rotated, services, run)
            )
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, TextDelta):
                        if event.text:
                            services.events.emit(
                                "chat.delta",
                                {**run.base(), "index": len(run.parts), "text": event.text},
                            )
                            run.parts.append(event.text)
                    elif isinstance(event, StreamDone):
                        done = event
            if done is None:
                raise ProviderError("bad_response", "the provider's stream ended without a result")
            # Shielded: once the answer is complete, an abort arriving now must not leave it
            # half recorded.
            with trio.CancelScope(shield=True):
                return await self._completed(services, sessions, run, done)

    async def _context(self, sessions: Any, run: Run) -> list[dict[str, str]]:
        """The transcript up to and including this run's own message, as model messages."""
        config: ChatConfig = self._config()
        history = await sessions.history(run.session_key, limit=config.context_messages)
        messages: list[dict[str, str]] = []
        found = False
        for message in history:
            if message.get("role") in ("user", "assistant", "system") and message.get("text"):
                messages.append({"role": message["role"], "content": message["text"]})
            if message.get("id") == run.user_message_id:
                found = True
                break
        if not found:
            # Queued runs of the session pushed ours out of the window; it must still go.
            messages.append({"role": "user", "content": run.user_text})
        system = "\n\n".join(p for p in (config.system_prompt, run.extra_system) if p)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def _rotated(self, services: Services, run: Run, notice: dict[str, Any]) -> None:
        run.rotations.append(notice)
        services.events.emit("chat.run.rotated", {**run.base(), **notice})

    # -- the three endings -----------------------------------------------------------------

    async def _completed(
        self, services: Services, sessions: Any, run: Run, done: StreamDone
    ) -> dict[str, Any]:
        text = "".join(run.parts)
        model = done.model or run.route["model"]
        usage = {"inputTokens": done.usage.input_tokens, "outputTokens": done.usage.output_tokens}
        stored = await sessions.append(
            run.session_key,
            {
                "role": "assistant",
                "text": text,
                "runId": run.run_id,
                "provider": run.route["provider"],
                "model": model,
                "stopReason": done.stop_reason,
                "usage": usage,
            },
        )
        now = services.clock.now_ms()
        await sessions.record_usage(
            run.session_key,
            run_id=run.run_id,
            provider=run.route["provider"],
            model=model,
            input_tokens=done.usage.input_tokens,
            output_tokens=done.usage.output_tokens,
            ts=now,
        )
        run.finished, run.stop_reason = True, done.stop_reason
        result = {
            **run.base(),
            **run.who(),
            "model": model,
            "text": text,
            "usage": usage,
            "stopReason": done.stop_reason,
            "messageId": stored.get("id"),
            "durationMs": now - (run.started_at or now),
        }
        if run.rotations:
            result["rotations"] = run.rotations
        services.events.emit("chat.run.completed", result)
        return result

    async def _keep_partial(self, services: Services, run: Run, stop_reason: str) -> str | None:
        """Put streamed text of an unfinished run in the transcript, marked partial."""
        text = "".join(run.parts)
        if not text:
            return None
        try:
            sessions = services.lookup("sessions")
            stored = await sessions.append(
                run.session_key,
                {
                    "role": "assistant",
                    "text": text,
                    "runId": run.run_id,
                    "provider": run.route["provider"],
                    "model": run.route["model"],
                    "stopReason": stop_reason,
                    "label": "partial",
                },
            )
        except Exception:
            logger.exception("run %s: the partial answer could not be saved", run.run_id)
            return None
        return stored.get("id")

    async def _aborted(self, services: Services, run: Run, stop_reason: str) -> None:
        if run.finished:
            return
        run.finished, run.stop_reason = True, stop_reason
        message_id = await self._keep_partial(services, run, "aborted")
        payload = {
            **run.base(),
            **run.who(),
            "aborted": True,
            "stopReason": stop_reason,
            "text": "".join(run.parts),
        }
        if message_id is not None:
            payload["messageId"] = message_id
        if run.rotations:
            payload["rotations"] = run.rotations
        services.events.emit("chat.run.failed", payload)

    async def _failed(self, services: Services, run: Run, error: GatewayError) -> None:
        if run.finished:
            return
        run.finished, run.error, run.stop_reason = True, error, "error"
        message_id = await self._keep_partial(services, run, "error")
        payload = {
            **run.base(),
            **run.who(),
            "error": error_payload(error),
            "text": "".join(run.parts),
        }
        if message_id is not None:
            payload["messageId"] = message_id
        if run.rotations:
            payload["rotations"] = run.rotations
        services.events.emit("chat.run.failed", payload)
