"""The Chat and Agent plugin: ``chat.*``, ``agent``, ``agent.wait``, ``agent.identity.get``.

A send is acknowledged at once and the run streams as events (``runs.RunEngine``). The user's
message is in the transcript before the acknowledgement goes out, so a gateway killed
mid-run loses nothing it acknowledged. Transcripts belong to the ``sessions`` service and
model back ends to the ``models`` service; both are looked up per call, so either plugin can
be replaced, and a missing one is a 503 naming it.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

import msgspec
import trio

from kernel import (
    ADMIN,
    READ,
    WRITE,
    Call,
    ConfigSection,
    EventSpec,
    GatewayError,
    Job,
    MethodSpec,
    NonEmptyStr,
    Params,
    Services,
    hookimpl,
    invalid_request,
    not_found,
)

from .config import ChatConfig
from .runs import Run, RunEngine, run_limit_s
from .text import Attachment, clean_text, describe_attachments, is_stop_command

__all__ = ["ChatPlugin"]

logger = logging.getLogger(__name__)

#: chat.history answers at most this much JSON; the oldest messages go first (B1).
HISTORY_MAX_BYTES = 6 * 1024 * 1024
AGENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

#: An idempotency key is also the run id, seen in events and transcripts: printable only.
RunKey = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Millis = Annotated[int, msgspec.Meta(ge=0, le=7 * 86_400_000)]
OptionalText = Annotated[str, msgspec.Meta(max_length=10_000)] | None


class ChatSendParams(Params):
    session_key: NonEmptyStr
    message: Annotated[str, msgspec.Meta(max_length=2_000_000)]
    idempotency_key: RunKey
    thinking: OptionalText = None
    deliver: bool | None = None
    attachments: list[Attachment] | None = None
    timeout_ms: Millis | None = None


class ChatHistoryParams(Params):
    session_key: NonEmptyStr
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 200


class ChatAbortParams(Params):
    session_key: NonEmptyStr
    run_id: NonEmptyStr | None = None


class ChatInjectParams(Params):
    session_key: NonEmptyStr
    message: Annotated[str, msgspec.Meta(min_length=1, max_length=2_000_000)]
    label: Annotated[str, msgspec.Meta(max_length=100)] | None = None


class InputProvenance(Params):
    kind: Literal["external_user", "inter_session", "internal_system"]
    source_session_key: str | None = None
    source_channel: str | None = None
    source_tool: str | None = None


class AgentParams(Params):
    """``agent`` params (B2). Routing fields for channels are accepted for compatibility.

    # TODO(channels): deliver, to, replyTo, channel and the account/thread/group fields do
    # nothing until a channels plugin offers a delivery service.
    """

    message: Annotated[str, msgspec.Meta(min_length=1, max_length=2_000_000)]
    idempotency_key: RunKey
    agent_id: NonEmptyStr | None = None
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    session_key: NonEmptyStr | None = None
    session_id: NonEmptyStr | None = None
    thinking: OptionalText = None
    deliver: bool | None = None
    attachments: list[Attachment] | None = None
    to: OptionalText = None
    reply_to: OptionalText = None
    channel: OptionalText = None
    reply_channel: OptionalText = None
    account_id: OptionalText = None
    reply_account_id: OptionalText = None
    thread_id: OptionalText = None
    group_id: OptionalText = None
    group_channel: OptionalText = None
    group_space: OptionalText = None
    timeout: Annotated[int, msgspec.Meta(ge=0, le=7 * 86_400)] | None = None
    lane: OptionalText = None
    extra_system_prompt: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    input_provenance: InputProvenance | None = None
    label: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    spawned_by: OptionalText = None


class AgentWaitParams(Params):
    run_id: NonEmptyStr
    timeout_ms: Millis = 30_000


class AgentIdentityParams(Params):
    agent_id: NonEmptyStr | None = None
    session_key: str | None = None


def _agent_of(key: str) -> str | None:
    """The agent id in a canonical ``agent:<id>:<rest>`` key, ``None`` for ``global``."""
    if key.startswith("agent:"):
        return key.split(":", 2)[1]
    return None


def _agent_id(value: str) -> str:
    agent_id = value.strip().lower()
    if not AGENT_ID_RE.match(agent_id):
        raise invalid_request(
            f"agentId must be 1-64 of a-z, 0-9, _ and -, got {value!r}", field="agentId"
        )
    return agent_id


class ChatPlugin:
    """Chat and agent runs; one instance per gateway."""

    def __init__(self) -> None:
        self.config = ChatConfig()
        self.engine = RunEngine(lambda: self.config)
        #: Runs between "not started yet" and "job registered": a repeat waits for the first.
        self._starting: dict[tuple[str, str], trio.Event] = {}

    # -- declarations ----------------------------------------------------------------------

    @hookimpl
    def anima_config_section(self) -> ConfigSection:
        return ConfigSection(ChatConfig)

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [
            # No idempotency_field: the kernel's cache would replay a refusal (a 503 for a
            # missing key, a 400) to a corrected retry. The run itself, remembered by the
            # jobs registry, is what a repeated key finds (A17: in_flight, then its end).
            MethodSpec(
                "chat.send",
                self.chat_send,
                WRITE,
                ChatSendParams,
                description="send a message to a session and start a run",
            ),
            MethodSpec("chat.history", self.chat_history, READ, ChatHistoryParams),
            MethodSpec("chat.abort", self.chat_abort, WRITE, ChatAbortParams),
            MethodSpec("chat.inject", self.chat_inject, ADMIN, ChatInjectParams, advertised=False),
            MethodSpec("agent", self.agent, WRITE, AgentParams, description="two-phase run"),
            MethodSpec("agent.wait", self.agent_wait, WRITE, AgentWaitParams),
            MethodSpec("agent.identity.get", self.agent_identity, READ, AgentIdentityParams),
        ]

    @hookimpl
    def anima_events(self) -> list[EventSpec]:
        return [
            EventSpec("chat.run.started", READ, description="a run began: provider and model"),
            EventSpec(
                "chat.delta", READ, droppable=True, description="new text of a run, with index"
            ),
            EventSpec("chat.run.completed", READ, description="full text, usage, stop reason"),
            EventSpec("chat.run.failed", READ, description="error, or aborted with stopReason"),
            EventSpec(
                "chat.run.rotated", READ, description="a run retried on the provider's next key"
            ),
        ]

    # -- lifecycle -------------------------------------------------------------------------

    @hookimpl
    def anima_startup(self, services: Services) -> None:
        self.config = services.config.section("chat") or ChatConfig()

    @hookimpl
    def anima_config_changed(self, services: Services, changed: list[str]) -> None:
        if "plugins.chat" in changed:
            self.config = services.config.section("chat") or ChatConfig()

    # -- starting runs ---------------------------------------------------------------------

    async def _claim(self, services: Services, kind: str, run_id: str) -> Job | None:
        """The existing run with this id, or ``None`` after claiming the id for a new one."""
        while True:
            job = services.jobs.get(kind, run_id)
            if job is not None:
                return job
            pending = self._starting.get((kind, run_id))
            if pending is None:
                self._starting[(kind, run_id)] = trio.Event()
                return None
            await pending.wait()

    def _release(self, kind: str, run_id: str) -> None:
        pending = self._starting.pop((kind, run_id), None)
        if pending is not None:
            pending.set()

    async def _start(
        self,
        services: Services,
        *,
        kind: str,
        run_id: str,
        key: str,
        text: str,
        model: str | None,
        timeout_ms: int | None,
        extra_system: str | None = None,
    ) -> Run:
        """Route, append the user's message (durably), then start the job."""
        sessions = services.lookup("sessions")
        models = services.lookup("models")
        provider = None
        entry = await sessions.get(key)
        if entry and entry.get("sendPolicy") == "deny":
            raise GatewayError(
                403,
                "send blocked by session policy",
                details={"field": "sessionKey", "sendPolicy": "deny"},
            )
        if model is None and entry:
            model = entry.get("model") or None
            provider = entry.get("modelProvider") or None
        route = await models.route(provider=provider, model=model)
        stored = await sessions.append(key, {"role": "user", "text": text, "runId": run_id})
        run = Run(
            kind=kind,
            run_id=run_id,
            session_key=key,
            user_message_id=stored["id"],
            user_text=text,
            route=route,
            limit_s=run_limit_s(timeout_ms, self.config),
            accepted_at=services.clock.now_ms(),
            extra_system=extra_system,
        )
        self.engine.start(services, run)
        return run

    @staticmethod
    def _message_text(text: str, attachments: list[Attachment] | None) -> str:
        """The cleaned text plus a note per attachment; 400 when nothing is left."""
        notes = describe_attachments(attachments or [])
        body = text if text.strip() else ""
        if notes:
            body = f"{body}\n{notes}" if body else notes
        if not body:
            raise invalid_request("message or attachment required", field="message")
        return body

    # -- chat ------------------------------------------------------------------------------

    async def chat_send(self, call: Call, params: ChatSendParams) -> dict[str, Any]:
        services = call.services
        text = clean_text(params.message)
        sessions = services.lookup("sessions")
        key = sessions.canonical_key(params.session_key)
        if not params.attachments and is_stop_command(text):
            return await self._abort(services, key, None, "stop")
        body = self._message_text(text, params.attachments)
        # TODO(thinking): pass the thinking level to providers that have one.

        run_id = params.idempotency_key
        existing = await self._claim(services, "chat", run_id)
        if existing is not None:
            # A repeat starts nothing: it learns how the run is doing while the jobs registry
            # remembers it (ten minutes after its end).
            status = {"running": "in_flight", "cancelled": "aborted"}.get(
                existing.state, existing.state
            )
            route = existing.tags["run"].route
            return {
                "runId": run_id,
                "status": status,
                "provider": route["provider"],
                "model": route["model"],
            }
        try:
            run = await self._start(
                services,
                kind="chat",
                run_id=run_id,
                key=key,
                text=body,
                model=None,
                timeout_ms=params.timeout_ms,
            )
        finally:
            self._release("chat", run_id)
        return {
            "runId": run_id,
            "status": "started",
            "provider": run.route["provider"],
            "model": run.route["model"],
        }

    async def _abort(
        self, services: Services, key: str, run_id: str | None, reason: str
    ) -> dict[str, Any]:
        if run_id is not None:
            job = self.engine.find(services, run_id)
            if job is None:
                return {"ok": True, "aborted": False, "runIds": []}
            if job.tags.get("sessionKey") != key:
                raise invalid_request("runId does not match sessionKey", field="runId")
            jobs = [job] if job.state == "running" else []
        else:
            jobs = self.engine.running_in(services, key)
        aborted = [job for job in jobs if job.cancel(reason)]
        # Wait for the runs to record their partial answers and send their final events,
        # so that what the caller reads next already reflects the abort.
        with trio.move_on_after(self.config.abort_wait_ms / 1000):
            for job in aborted:
                await job.done.wait()
        return {"ok": True, "aborted": bool(aborted), "runIds": [job.job_id for job in aborted]}

    async def chat_abort(self, call: Call, params: ChatAbortParams) -> dict[str, Any]:
        sessions = call.services.lookup("sessions")
        key = sessions.canonical_key(params.session_key)
        return await self._abort(call.services, key, params.run_id, "rpc")

    async def chat_history(self, call: Call, params: ChatHistoryParams) -> dict[str, Any]:
        sessions = call.services.lookup("sessions")
        key = sessions.canonical_key(params.session_key)
        messages = await sessions.history(key, limit=params.limit)
        entry = await sessions.get(key)
        sizes = [len(msgspec.json.encode(m)) for m in messages]
        total, first = sum(sizes), 0
        while total > HISTORY_MAX_BYTES and first < len(messages):
            total -= sizes[first]
            first += 1
        result: dict[str, Any] = {"sessionKey": key, "messages": messages[first:]}
        if first:
            result["truncated"] = True
        if entry:
            for name in ("sessionId", "thinkingLevel", "verboseLevel"):
                if entry.get(name) is not None:
                    result[name] = entry[name]
        return result

    async def chat_inject(self, call: Call, params: ChatInjectParams) -> dict[str, Any]:
        services = call.services
        text = clean_text(params.message)
        if not text.strip():
            raise invalid_request("message must not be blank", field="message")
        label = clean_text(params.label, "label").strip() if params.label else None
        sessions = services.lookup("sessions")
        key = sessions.canonical_key(params.session_key)
        if await sessions.get(key) is None:
            raise not_found(f"session not found: {key}", details={"field": "sessionKey"})
        full = f"[{label}]\n\n{text}" if label else text
        message: dict[str, Any] = {
            "role": "assistant",
            "text": full,
            "provider": "gateway",
            "model": "gateway-injected",
            "stopReason": "injected",
        }
        if label:
            message["label"] = label
        try:
            stored = await sessions.append(key, message)
        except GatewayError:
            raise
        except Exception as exc:
            logger.exception("chat.inject: transcript write failed")
            raise GatewayError(503, f"failed to write transcript: {exc}") from None
        services.events.emit(
            "chat.run.completed",
            {
                "runId": f"inject-{stored['id']}",
                "sessionKey": key,
                "provider": "gateway",
                "providerName": "injected by an operator",
                "model": "gateway-injected",
                "text": full,
                "usage": {"inputTokens": 0, "outputTokens": 0},
                "stopReason": "injected",
                "messageId": stored["id"],
                "injected": True,
            },
        )
        return {"ok": True, "messageId": stored["id"]}

    # -- agent -----------------------------------------------------------------------------

    def _agent_session(self, sessions: Any, params: AgentParams) -> str:
        agent_id = _agent_id(params.agent_id) if params.agent_id is not None else None
        if params.session_key is None:
            # TODO(sessionId): resolve a sessionId to its key once the sessions service can.
            return sessions.canonical_key(f"agent:{agent_id or self.config.default_agent_id}:main")
        key = sessions.canonical_key(params.session_key)
        owner = _agent_of(key)
        if agent_id is not None and owner is not None and owner != agent_id:
            raise invalid_request(
                f"agentId {agent_id} does not match the session key's agent {owner}",
                field="agentId",
            )
        return key

    async def agent(self, call: Call, params: AgentParams) -> dict[str, Any]:
        services = call.services
        sessions = services.lookup("sessions")
        key = self._agent_session(sessions, params)
        body = self._message_text(clean_text(params.message), params.attachments)
        # TODO(reset): "/new" and "/reset" should reset the session first; the sessions
        # service offers no reset to other plugins yet, so they are sent as text.
        run_id = params.idempotency_key
        job = await self._claim(services, "agent", run_id)
        if job is None:
            try:
                run = await self._start(
                    services,
                    kind="agent",
                    run_id=run_id,
                    key=key,
                    text=body,
                    model=params.model,
                    timeout_ms=None if params.timeout is None else params.timeout * 1000,
                    extra_system=params.extra_system_prompt,
                )
                job = self.engine.find(services, run_id)
                assert job is not None
                job.tags["ack"] = {
                    "runId": run_id,
                    "status": "accepted",
                    "acceptedAt": run.accepted_at,
                }
            finally:
                self._release("agent", run_id)
        # A repeat of the key gets the same two answers as the first request.
        await call.accept(job.tags["ack"])
        await job.done.wait()
        return self._agent_outcome(job)

    @staticmethod
    def _agent_outcome(job: Job) -> dict[str, Any]:
        run: Run = job.tags["run"]
        if job.state == "ok":
            return {
                "runId": run.run_id,
                "status": "ok",
                "summary": "completed",
                "result": job.result,
            }
        if job.state == "cancelled":
            return {
                "runId": run.run_id,
                "status": "aborted",
                "summary": f"aborted ({run.stop_reason})",
                "result": {"text": "".join(run.parts), "stopReason": run.stop_reason},
            }
        error = job.error if isinstance(job.error, GatewayError) else None
        message = error.message if error else "the run failed"
        raise GatewayError(
            error.code if error else 503,
            message,
            reason=error.reason if error else None,
            details={"runId": run.run_id, "status": "error", "summary": message},
            retryable=error.retryable if error else None,
            retry_after_ms=error.retry_after_ms if error else None,
        )

    async def agent_wait(self, call: Call, params: AgentWaitParams) -> dict[str, Any]:
        job = self.engine.find(call.services, params.run_id)
        if job is None:
            raise not_found(f"no run with id {params.run_id}", details={"field": "runId"})
        with trio.move_on_after(params.timeout_ms / 1000):
            await job.done.wait()
        if not job.done.is_set():
            return {"runId": params.run_id, "status": "timeout"}
        run: Run = job.tags["run"]
        result: dict[str, Any] = {
            "runId": params.run_id,
            "status": "ok" if job.state == "ok" else "error",
            "startedAt": run.started_at,
            "endedAt": run.ended_at,
        }
        if job.state == "cancelled":
            result.update(aborted=True, stopReason=run.stop_reason)
        elif job.state == "error":
            error = job.error if isinstance(job.error, GatewayError) else None
            result["error"] = {
                "code": error.code if error else 500,
                "reason": error.reason if error else "INTERNAL",
                "message": error.message if error else "the run failed",
            }
        return result

    async def agent_identity(self, call: Call, params: AgentIdentityParams) -> dict[str, Any]:
        agent_id = _agent_id(params.agent_id) if params.agent_id is not None else None
        if params.session_key:
            sessions = call.services.lookup("sessions")
            owner = _agent_of(sessions.canonical_key(params.session_key))
            if agent_id is not None and owner is not None and owner != agent_id:
                raise invalid_request(
                    f"agentId {agent_id} does not match the session key's agent {owner}",
                    field="agentId",
                )
            agent_id = agent_id or owner
        identity = self.config.identity
        # TODO(agents): per-agent identities once an agents plugin provides them.
        result: dict[str, Any] = {
            "agentId": agent_id or self.config.default_agent_id,
            "name": identity.name,
        }
        if identity.emoji:
            result["emoji"] = identity.emoji
        if identity.avatar:
            result["avatar"] = identity.avatar
        return result
