"""The Sessions plugin: the ten ``sessions.*`` methods of PROTOCOL.md B6 and the
``sessions`` service other plugins use.

Methods (scopes from the seed): ``sessions.list`` and ``sessions.preview`` need
``operator.read``; ``sessions.resolve``, ``sessions.patch``, ``sessions.reset``,
``sessions.delete``, ``sessions.compact``, ``sessions.usage``, ``sessions.usage.timeseries``
and ``sessions.usage.logs`` need ``operator.admin``. ``sessions.resolve`` and the three usage
methods are not advertised in ``hello-ok``, as upstream.

Where this differs from upstream: entries and transcripts are SQLite rows, not files, so no
result carries a ``path`` (``store: "sqlite"`` instead); a method given a session that does
not exist answers 404 (``sessions.preview`` reports ``status: "missing"`` per key instead);
``reset``, ``delete`` and ``compact`` archive rather than destroy, and say what they archived.

Event ``sessions.changed`` (scope ``operator.read``, droppable) is our own: it is emitted
after every change a method makes, and carries a delta, not the whole list::

    {"key": "agent:main:main", "action": "patched" | "reset" | "deleted" | "compacted",
     "ts": <ms>, "entry": {...}?, "previousSessionId": "..."?}

``entry`` is the session entry after the change (absent for ``deleted``).

``sessions.reset`` and ``sessions.delete`` first stop the session's running agent turns:
the background jobs of kind ``chat`` or ``agent`` tagged ``{"sessionKey": <key>}`` are
cancelled, and the method waits for them (``stopRunsTimeoutMs``, default 15 s) or answers 503.

Config ``[plugins.sessions]``: ``mainKey`` (default ``agent:main:main``, the session that
cannot be deleted and that the bare key ``main`` names) and ``stopRunsTimeoutMs``.
"""

from __future__ import annotations

import datetime
import logging
import re
from typing import Annotated, Any

import msgspec
import trio

from kernel import (
    ADMIN,
    READ,
    Call,
    ConfigSection,
    EventSpec,
    GatewayError,
    MethodSpec,
    Services,
    StoreSchema,
    hookimpl,
    invalid_request,
    not_found,
    unavailable,
)

from .admin import SessionAdmin
from .keys import (
    DEFAULT_MAIN_KEY,
    MAIN_KEY_RE,
    canonical_agent_id,
    canonical_key,
    session_kind,
)
from .params import (
    CompactParams,
    CompactResult,
    DeleteParams,
    DeleteResult,
    ListParams,
    ListResult,
    PatchParams,
    PatchResult,
    PreviewParams,
    PreviewResult,
    ResetParams,
    ResetResult,
    ResolveParams,
    ResolveResult,
    TimeseriesParams,
    UsageLogsParams,
    UsageParams,
    given_fields,
)
from .rows import MIGRATIONS, SCHEMA_OWNER
from .store import SessionStore

__all__ = ["RUN_JOB_KINDS", "SessionsConfig", "SessionsPlugin"]

logger = logging.getLogger(__name__)

#: Job kinds that are agent turns of a session, tagged ``{"sessionKey": key}`` by their owner.
RUN_JOB_KINDS = ("chat", "agent")
#: The default ``sessions.usage`` window, in days, ending today (UTC).
DEFAULT_USAGE_DAYS = 30
#: The longest ``sessions.usage`` window, so that its daily list stays bounded.
MAX_USAGE_DAYS = 366
_DAY_MS = 86_400_000
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

_PATCH_FIELDS = tuple(name for name in PatchParams.__struct_fields__ if name != "key")


class SessionsConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    main_key: Annotated[str, msgspec.Meta(pattern=MAIN_KEY_RE.pattern)] = DEFAULT_MAIN_KEY
    stop_runs_timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=300_000)] = 15_000

    def __post_init__(self) -> None:
        # The pattern above gives the shape; the key rules (no "..", no format characters)
        # are canonical_key's, and a config the store would refuse must not load.
        try:
            canonical = canonical_key(self.main_key, field="mainKey")
        except GatewayError as error:
            raise ValueError(error.message) from None
        if canonical != self.main_key:
            raise ValueError(f"mainKey must be written canonically: {canonical!r}")


class SessionsPlugin:
    """Sessions, transcripts and usage; one instance per gateway."""

    def __init__(self) -> None:
        self.config = SessionsConfig()
        self._sessions: SessionStore | None = None
        self._operations: SessionAdmin | None = None

    def _store(self) -> SessionStore:
        # A method, not a property: pluggy reads every attribute of a plugin at registration.
        if self._sessions is None:
            raise unavailable("the sessions store is not open yet")
        return self._sessions

    def _admin(self) -> SessionAdmin:
        if self._operations is None:
            raise unavailable("the sessions store is not open yet")
        return self._operations

    # -- declarations ----------------------------------------------------------------------

    @hookimpl
    def anima_config_section(self) -> ConfigSection:
        return ConfigSection(SessionsConfig)

    @hookimpl
    def anima_store_schema(self) -> StoreSchema:
        return StoreSchema(SCHEMA_OWNER, MIGRATIONS)

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [
            MethodSpec(
                "sessions.list",
                self.list_sessions,
                READ,
                ListParams,
                description="list sessions, most recent first",
            ),
            MethodSpec(
                "sessions.preview",
                self.preview,
                READ,
                PreviewParams,
                description="recent messages of some sessions",
            ),
            MethodSpec(
                "sessions.resolve",
                self.resolve,
                ADMIN,
                ResolveParams,
                advertised=False,
                description="a session's canonical key",
            ),
            MethodSpec(
                "sessions.patch",
                self.patch,
                ADMIN,
                PatchParams,
                description="change a session's settings",
            ),
            MethodSpec(
                "sessions.reset",
                self.reset,
                ADMIN,
                ResetParams,
                description="start a session afresh, archiving its transcript",
            ),
            MethodSpec(
                "sessions.delete",
                self.delete,
                ADMIN,
                DeleteParams,
                description="delete a session, archiving its transcript",
            ),
            MethodSpec(
                "sessions.compact",
                self.compact,
                ADMIN,
                CompactParams,
                description="keep the last messages of a transcript, archive the rest",
            ),
            MethodSpec(
                "sessions.usage",
                self.usage,
                ADMIN,
                UsageParams,
                advertised=False,
                description="token usage per session and model",
            ),
            MethodSpec(
                "sessions.usage.timeseries",
                self.usage_timeseries,
                ADMIN,
                TimeseriesParams,
                advertised=False,
                description="a session's token usage over time",
            ),
            MethodSpec(
                "sessions.usage.logs",
                self.usage_logs,
                ADMIN,
                UsageLogsParams,
                advertised=False,
                description="a session's usage records",
            ),
        ]

    @hookimpl
    def anima_events(self) -> list[EventSpec]:
        return [
            EventSpec(
                "sessions.changed",
                READ,
                droppable=True,
                description="a session was patched, reset, deleted or compacted",
            ),
        ]

    # -- lifecycle -------------------------------------------------------------------------

    @hookimpl
    def anima_startup(self, services: Services) -> None:
        self.config = services.config.section("sessions") or SessionsConfig()
        self._sessions = SessionStore(services.store, services.clock, main_key=self.config.main_key)
        self._operations = SessionAdmin(services.store, services.clock)
        services.provide("sessions", self._sessions)

    @hookimpl
    def anima_config_changed(self, services: Services, changed: list[str]) -> None:
        if "plugins.sessions" in changed:
            self.config = services.config.section("sessions") or SessionsConfig()
            if self._sessions is not None:
                self._sessions.main_key = self._sessions.canonical_key(
                    self.config.main_key, field="mainKey"
                )

    # -- read methods ----------------------------------------------------------------------

    async def list_sessions(self, call: Call, params: ListParams) -> ListResult:
        sessions = self._store()
        agent_id = canonical_agent_id(params.agent_id) if params.agent_id is not None else None
        spawned_by = (
            sessions.canonical_key(params.spawned_by, field="spawnedBy")
            if params.spawned_by is not None
            else None
        )
        label = _clean_label(params.label, "sessions.list") if params.label is not None else None
        rows, next_cursor = await self._admin().list_entries(
            limit=params.limit,
            cursor=params.cursor,
            active_minutes=params.active_minutes,
            include_global=params.include_global,
            label=label,
            agent_id=agent_id,
            spawned_by=spawned_by,
            search=(params.search or "").strip() or None,
            include_last_message=params.include_last_message,
            include_derived_titles=params.include_derived_titles,
        )
        return ListResult(
            ts=call.services.clock.now_ms(),
            store="sqlite",
            count=len(rows),
            defaults=_model_defaults(call.services),
            sessions=rows,
            next_cursor=next_cursor,
        )

    async def preview(self, call: Call, params: PreviewParams) -> PreviewResult:
        keys: list[str] = []
        for index, key in enumerate(params.keys):
            canonical = self._store().canonical_key(key, field=f"keys.{index}")
            if canonical not in keys:
                keys.append(canonical)
        previews = await self._admin().preview(keys, limit=params.limit, max_chars=params.max_chars)
        return PreviewResult(ts=call.services.clock.now_ms(), previews=previews)

    # -- admin methods ---------------------------------------------------------------------

    async def resolve(self, call: Call, params: ResolveParams) -> ResolveResult:
        given = [
            name
            for name in ("key", "sessionId", "label")
            if getattr(params, _attr(name)) is not None
        ]
        if len(given) > 1:
            raise invalid_request(
                "invalid sessions.resolve params: Provide either key, sessionId, or label"
                f" (not multiple; got {', '.join(given)})",
                field=given[1],
            )
        if not given:
            raise invalid_request(
                "invalid sessions.resolve params: Either key, sessionId, or label is required",
                field="key",
            )
        sessions = self._store()
        key = sessions.canonical_key(params.key, field="key") if params.key is not None else None
        label = _clean_label(params.label, "sessions.resolve") if params.label else None
        resolved = await self._admin().resolve(
            key=key,
            session_id=params.session_id,
            label=label,
            agent_id=canonical_agent_id(params.agent_id) if params.agent_id else None,
            spawned_by=(
                sessions.canonical_key(params.spawned_by, field="spawnedBy")
                if params.spawned_by
                else None
            ),
            include_global=params.include_global,
        )
        return ResolveResult(ok=True, key=resolved)

    async def patch(self, call: Call, params: PatchParams) -> PatchResult:
        sessions = self._store()
        key = sessions.canonical_key(params.key, field="key")
        changes = given_fields(params, _PATCH_FIELDS)
        if changes.get("label") is not None:
            changes["label"] = _clean_label(changes["label"], "sessions.patch")
        for name in ("model", "execNode"):
            if changes.get(name) is not None:
                changes[name] = _clean_text(changes[name], name)
        if changes.get("spawnedBy") is not None:
            changes["spawnedBy"] = sessions.canonical_key(changes["spawnedBy"], field="spawnedBy")
        for name in ("spawnedBy", "spawnDepth"):
            if name in changes and not _is_subagent(key):
                raise invalid_request(
                    f"invalid sessions.patch params: {name} applies to subagent sessions"
                    f" (agent:<agentId>:subagent:...) only, not {key}",
                    field=name,
                )

        entry, changed = await self._admin().patch(key, changes)
        if changed:
            self._announce(call, key, "patched", entry=entry)
        return PatchResult(
            ok=True,
            store="sqlite",
            key=key,
            entry=entry,
            resolved=_resolved_model(entry.get("model")),
            changed=changed,
        )

    async def reset(self, call: Call, params: ResetParams) -> ResetResult:
        sessions = self._store()
        key = sessions.canonical_key(params.key, field="key")
        if await sessions.get(key) is None:
            raise not_found(f"No session found: {key}", details={"key": key})
        stopped = await self._stop_runs(call.services, key, "session reset")
        entry, previous, archive = await self._admin().reset(key, reason=params.reason)
        self._announce(call, key, "reset", entry=entry, previousSessionId=previous)
        return ResetResult(
            ok=True,
            key=key,
            entry=entry,
            previous_session_id=previous,
            archived=archive,
            stopped_runs=stopped,
        )

    async def delete(self, call: Call, params: DeleteParams) -> DeleteResult:
        sessions = self._store()
        key = sessions.canonical_key(params.key, field="key")
        if key == sessions.main_key:
            raise invalid_request(f"Cannot delete the main session ({key}).", field="key")
        if await sessions.get(key) is None:
            raise not_found(f"No session found: {key}", details={"key": key})
        stopped = await self._stop_runs(call.services, key, "session deleted")
        archive = await self._admin().delete(key, archive_transcript=params.delete_transcript)
        self._announce(call, key, "deleted")
        return DeleteResult(
            ok=True,
            key=key,
            deleted=True,
            archived=[archive["archiveId"]] if archive else [],
            archived_messages=archive["messageCount"] if archive else 0,
            stopped_runs=stopped,
        )

    async def compact(self, call: Call, params: CompactParams) -> CompactResult:
        key = self._store().canonical_key(params.key, field="key")
        outcome = await self._admin().compact(key, max_lines=params.max_lines)
        if outcome["compacted"]:
            self._announce(call, key, "compacted", entry=outcome["entry"])
        return CompactResult(
            ok=True,
            key=key,
            compacted=outcome["compacted"],
            kept=outcome["kept"],
            archived=outcome["archived"],
            reason=outcome.get("reason"),
            first_kept_id=outcome.get("firstKeptId"),
            archive_id=outcome.get("archiveId"),
        )

    async def usage(self, call: Call, params: UsageParams) -> dict[str, Any]:
        key = self._store().canonical_key(params.key, field="key") if params.key else None
        start, end = _date_range(params.start_date, params.end_date, "sessions.usage")
        if start is None or end is None:
            today = datetime.datetime.fromtimestamp(
                call.services.clock.now_ms() / 1000, datetime.UTC
            ).date()
            start, end = today - datetime.timedelta(days=DEFAULT_USAGE_DAYS - 1), today
        if (end - start).days + 1 > MAX_USAGE_DAYS:
            raise invalid_request(
                f"invalid sessions.usage params: the range startDate..endDate is over"
                f" {MAX_USAGE_DAYS} days",
                field="endDate",
            )
        summary = await self._admin().usage_summary(
            start_ms=_day_start_ms(start),
            end_ms=_day_start_ms(end) + _DAY_MS,
            key=key,
            limit=params.limit,
        )
        return {
            "updatedAt": call.services.clock.now_ms(),
            "startDate": start.isoformat(),
            "endDate": end.isoformat(),
            **({"key": key} if key else {}),
            **summary,
        }

    async def usage_timeseries(self, call: Call, params: TimeseriesParams) -> dict[str, Any]:
        key = self._store().canonical_key(params.key, field="key")
        start, end = _date_range(params.start_date, params.end_date, "sessions.usage.timeseries")
        series = await self._admin().usage_timeseries(
            key,
            start_ms=_day_start_ms(start) if start else None,
            end_ms=_day_start_ms(end) + _DAY_MS if end else None,
            max_points=params.max_points,
        )
        if start and end:
            series["startDate"], series["endDate"] = start.isoformat(), end.isoformat()
        return series

    async def usage_logs(self, call: Call, params: UsageLogsParams) -> dict[str, Any]:
        key = self._store().canonical_key(params.key, field="key")
        return {"key": key, "logs": await self._admin().usage_logs(key, limit=params.limit)}

    # -- helpers ---------------------------------------------------------------------------

    async def _stop_runs(self, services: Services, key: str, reason: str) -> int:
        """Cancel the session's running turns and wait for them to end; 503 if they won't."""
        runs = [
            job
            for kind in RUN_JOB_KINDS
            for job in services.jobs.running(kind)
            if self._tagged_key(job.tags.get("sessionKey")) == key
        ]
        for job in runs:
            job.cancel(reason)
        with trio.move_on_after(self.config.stop_runs_timeout_ms / 1000):
            for job in runs:
                await job.done.wait()
        if any(not job.done.is_set() for job in runs):
            raise unavailable(f"Session {key} is still active; try again in a moment.")
        if runs:
            logger.debug("stopped %d run(s) of %s: %s", len(runs), key, reason)
        return len(runs)

    def _tagged_key(self, tag: Any) -> str | None:
        if not isinstance(tag, str):
            return None
        try:
            return self._store().canonical_key(tag)
        except GatewayError:
            return None

    def _announce(self, call: Call, key: str, action: str, **extra: Any) -> None:
        call.emit(
            "sessions.changed",
            {"key": key, "action": action, "ts": call.services.clock.now_ms(), **extra},
        )


def _model_defaults(services: Services) -> dict[str, Any]:
    """What a run in a session without a ``model`` gets, from the ``models`` service.

    Null when no plugin provides that service (the providers plugin is disabled).
    """
    defaults: dict[str, Any] = {"modelProvider": None, "model": None, "contextTokens": None}
    models = services.lookup_optional("models")
    if models is None:
        return defaults
    try:
        provider, _reason = models.default_choice()
        defaults.update(modelProvider=provider, model=models.default_model(provider))
    except Exception:
        # A replacement models service may lack these; the listing matters more.
        logger.exception("sessions.list: the models service gave no defaults")
    return defaults


def _attr(wire_name: str) -> str:
    return {"sessionId": "session_id"}.get(wire_name, wire_name)


def _clean_label(label: str, method: str) -> str:
    cleaned = " ".join(label.split())
    if not cleaned:
        raise invalid_request(f"invalid {method} params: label is blank", field="label")
    if any(ord(char) < 32 or ord(char) == 127 for char in label):
        raise invalid_request(
            f"invalid {method} params: label has control characters", field="label"
        )
    return cleaned


def _clean_text(value: str, field: str) -> str:
    cleaned = value.strip()
    if not cleaned or any(ord(char) < 32 or ord(char) == 127 for char in cleaned):
        raise invalid_request(
            f"invalid sessions.patch params: {field} must be printable text", field=field
        )
    return cleaned


def _is_subagent(key: str) -> bool:
    return session_kind(key) != "global" and key.split(":", 2)[2].startswith("subagent:")


def _resolved_model(model: str | None) -> dict[str, Any]:
    """``provider/model`` splits into both; a bare model name has no provider."""
    if not model:
        return {}
    provider, sep, name = model.partition("/")
    if sep and provider and name:
        return {"modelProvider": provider, "model": name}
    return {"model": model}


def _parse_date(value: str | None, field: str, method: str) -> datetime.date | None:
    if value is None:
        return None
    try:
        if not _DATE_RE.fullmatch(value):
            raise ValueError(value)
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise invalid_request(
            f"invalid {method} params: {field} must be a date as YYYY-MM-DD (UTC),"
            f" got {value[:40]!r}",
            field=field,
        ) from None


def _date_range(
    start_text: str | None, end_text: str | None, method: str
) -> tuple[datetime.date | None, datetime.date | None]:
    start = _parse_date(start_text, "startDate", method)
    end = _parse_date(end_text, "endDate", method)
    if (start is None) != (end is None):
        missing = "endDate" if end is None else "startDate"
        raise invalid_request(
            f"invalid {method} params: startDate and endDate go together; {missing} is missing",
            field=missing,
        )
    if start is not None and end is not None and start > end:
        raise invalid_request(
            f"invalid {method} params: endDate {end.isoformat()} is before startDate"
            f" {start.isoformat()}",
            field="endDate",
        )
    return start, end


def _day_start_ms(day: datetime.date) -> int:
    midnight = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
    return int(midnight.timestamp() * 1000)
