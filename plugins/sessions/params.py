"""Params and results of the ``sessions.*`` methods (PROTOCOL.md B6), as msgspec Structs.

The kernel decodes params into these before a handler runs, so a wrong type, an unknown
field, a value out of range or outside an enum is a 400 naming the field without any code
here. What a Struct cannot say (a valid session key, a real calendar date range, exactly one
of several fields) the handlers check, also answering 400 with ``details.field``.

Patch fields use ``msgspec.UNSET`` for "not given", so that ``null`` can mean "clear".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from kernel import Params, Payload

__all__ = [
    "DEFAULT_COMPACT_LINES",
    "DEFAULT_LIST_LIMIT",
    "DEFAULT_LOGS_LIMIT",
    "DEFAULT_PREVIEW_LIMIT",
    "DEFAULT_USAGE_LIMIT",
    "MAX_LIST_LIMIT",
    "MAX_LOGS_LIMIT",
    "MAX_PREVIEW_KEYS",
    "MAX_TIMESERIES_POINTS",
    "CompactParams",
    "CompactResult",
    "DeleteParams",
    "DeleteResult",
    "ListParams",
    "ListResult",
    "PatchParams",
    "PatchResult",
    "PreviewParams",
    "PreviewResult",
    "ResetParams",
    "ResetResult",
    "ResolveParams",
    "ResolveResult",
    "TimeseriesParams",
    "UsageLogsParams",
    "UsageParams",
]

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 500
MAX_PREVIEW_KEYS = 64
DEFAULT_PREVIEW_LIMIT = 12
MAX_PREVIEW_LIMIT = 200
DEFAULT_PREVIEW_CHARS = 240
MAX_PREVIEW_CHARS = 20_000
DEFAULT_COMPACT_LINES = 400
MAX_COMPACT_LINES = 100_000
DEFAULT_USAGE_LIMIT = 50
MAX_USAGE_LIMIT = 1000
MAX_TIMESERIES_POINTS = 200
DEFAULT_LOGS_LIMIT = 200
MAX_LOGS_LIMIT = 1000

#: A session key as sent; ``keys.canonical_key`` does the real checking.
KeyStr = Annotated[str, Meta(min_length=1, max_length=1000)]
Label = Annotated[str, Meta(min_length=1, max_length=64)]
ShortStr = Annotated[str, Meta(min_length=1, max_length=200)]
#: A UTC calendar date ``YYYY-MM-DD``; the handler parses it (and says so when it is not one).
DateStr = Annotated[str, Meta(max_length=40)]


class ListParams(Params):
    limit: Annotated[int, Meta(ge=1, le=MAX_LIST_LIMIT)] = DEFAULT_LIST_LIMIT
    #: Opaque; the ``nextCursor`` of the previous page.
    cursor: Annotated[str, Meta(min_length=1, max_length=1000)] | None = None
    active_minutes: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    include_global: bool = False
    #: Accepted for compatibility; ``unknown`` sessions do not exist in this store.
    include_unknown: bool = False
    include_derived_titles: bool = False
    include_last_message: bool = False
    label: Label | None = None
    spawned_by: KeyStr | None = None
    agent_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    search: Annotated[str, Meta(max_length=200)] | None = None


class ListResult(Payload):
    ts: int
    store: str
    count: int
    defaults: dict[str, Any]
    sessions: list[dict[str, Any]]
    next_cursor: str | None = None


class PreviewParams(Params):
    keys: Annotated[list[KeyStr], Meta(min_length=1, max_length=MAX_PREVIEW_KEYS)]
    limit: Annotated[int, Meta(ge=1, le=MAX_PREVIEW_LIMIT)] = DEFAULT_PREVIEW_LIMIT
    max_chars: Annotated[int, Meta(ge=20, le=MAX_PREVIEW_CHARS)] = DEFAULT_PREVIEW_CHARS


class PreviewResult(Payload):
    ts: int
    previews: list[dict[str, Any]]


class ResolveParams(Params):
    key: KeyStr | None = None
    session_id: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    label: Label | None = None
    agent_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    spawned_by: KeyStr | None = None
    include_global: bool = False
    include_unknown: bool = False


class ResolveResult(Payload):
    ok: bool
    key: str


class PatchParams(Params):
    key: KeyStr
    label: Label | UnsetType | None = UNSET
    thinking_level: (
        Literal["off", "minimal", "low", "medium", "high", "xhigh"] | UnsetType | None
    ) = UNSET
    verbose_level: Literal["off", "on", "full"] | UnsetType | None = UNSET
    reasoning_level: Literal["on", "off", "stream"] | UnsetType | None = UNSET
    response_usage: Literal["off", "tokens", "full", "on"] | UnsetType | None = UNSET
    elevated_level: Literal["on", "off", "ask", "full"] | UnsetType | None = UNSET
    exec_host: Literal["sandbox", "gateway", "node"] | UnsetType | None = UNSET
    exec_security: Literal["deny", "allowlist", "full"] | UnsetType | None = UNSET
    exec_ask: Literal["off", "on-miss", "always"] | UnsetType | None = UNSET
    exec_node: ShortStr | UnsetType | None = UNSET
    model: ShortStr | UnsetType | None = UNSET
    spawned_by: KeyStr | UnsetType | None = UNSET
    spawn_depth: Annotated[int, Meta(ge=0, le=100)] | UnsetType | None = UNSET
    send_policy: Literal["allow", "deny"] | UnsetType | None = UNSET
    group_activation: Literal["mention", "always"] | UnsetType | None = UNSET


class PatchResult(Payload):
    ok: bool
    store: str
    key: str
    entry: dict[str, Any]
    resolved: dict[str, Any]
    changed: list[str]


class ResetParams(Params):
    key: KeyStr
    reason: Literal["new", "reset"] = "reset"


class ResetResult(Payload):
    ok: bool
    key: str
    entry: dict[str, Any]
    previous_session_id: str
    #: The archive the old transcript went to; ``None`` when it was empty.
    archived: dict[str, Any] | None
    stopped_runs: int


class DeleteParams(Params):
    key: KeyStr
    delete_transcript: bool = True


class DeleteResult(Payload):
    ok: bool
    key: str
    deleted: bool
    #: Archive ids the transcript went to (upstream: archived file paths).
    archived: list[str]
    archived_messages: int
    stopped_runs: int


class CompactParams(Params):
    key: KeyStr
    max_lines: Annotated[int, Meta(ge=1, le=MAX_COMPACT_LINES)] = DEFAULT_COMPACT_LINES


class CompactResult(Payload):
    ok: bool
    key: str
    compacted: bool
    kept: int
    archived: int
    reason: str | None = None
    first_kept_id: str | None = None
    archive_id: str | None = None


class UsageParams(Params):
    key: KeyStr | None = None
    start_date: DateStr | None = None
    end_date: DateStr | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_USAGE_LIMIT)] = DEFAULT_USAGE_LIMIT
    #: Accepted for compatibility; there is no context-weight report here.
    include_context_weight: bool = False


class TimeseriesParams(Params):
    key: KeyStr
    start_date: DateStr | None = None
    end_date: DateStr | None = None
    max_points: Annotated[int, Meta(ge=1, le=MAX_TIMESERIES_POINTS)] = MAX_TIMESERIES_POINTS


class UsageLogsParams(Params):
    key: KeyStr
    limit: Annotated[int, Meta(ge=1, le=MAX_LOGS_LIMIT)] = DEFAULT_LOGS_LIMIT


def given_fields(params: msgspec.Struct, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields of ``params`` that were sent (``UNSET`` left out), by wire name."""
    encode_name = dict(zip(params.__struct_fields__, params.__struct_encode_fields__, strict=True))
    return {
        encode_name[name]: value for name in names if (value := getattr(params, name)) is not UNSET
    }
