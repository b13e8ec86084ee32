"""The ``[plugins.chat]`` config section: the agent's identity, its prompt, and run limits."""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["ChatConfig", "Identity"]

Millis = Annotated[int, msgspec.Meta(ge=0, le=7 * 86_400_000)]


class _Section(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


class Identity(_Section):
    """Who the agent says it is (``agent.identity.get``)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = "ANIMA"
    emoji: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    #: A URL or a data: URI; clients show it as is.
    avatar: Annotated[str, msgspec.Meta(max_length=2_000_000)] | None = None


class ChatConfig(_Section):
    """``[plugins.chat]``.

    Run time limits follow the upstream gateway (A18): a run may take its ``timeoutMs``
    (default ``defaultTimeoutMs``) plus ``timeoutGraceMs``, but never less than
    ``minRunMs`` nor more than ``maxRunMs``; ``timeoutMs: 0`` means ``maxRunMs``.
    """

    identity: Identity = msgspec.field(default_factory=Identity)
    #: The agent a session key without one (``agent`` without ``sessionKey``) belongs to.
    default_agent_id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")] = "main"
    system_prompt: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    #: How many transcript messages (the new one included) a run sends to the model.
    context_messages: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50
    default_timeout_ms: Millis = 600_000
    timeout_grace_ms: Millis = 60_000
    min_run_ms: Millis = 120_000
    max_run_ms: Annotated[int, msgspec.Meta(ge=1, le=7 * 86_400_000)] = 86_400_000
    #: How long ``chat.abort`` waits for an aborted run to record its partial answer.
    abort_wait_ms: Millis = 5_000
