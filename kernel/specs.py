"""What plugins hand the kernel: method, event, config and store declarations, and scopes.

These are plain values returned from hooks. The kernel reads them once at start-up, builds
its dispatch tables from them and never asks again, so a hook implementation stays a cheap,
side-effect-free declaration.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from .frames import EmptyParams

if TYPE_CHECKING:
    from .call import Call

__all__ = [
    "ADMIN",
    "APPROVALS",
    "NODE",
    "OPERATOR_SCOPES",
    "PAIRING",
    "READ",
    "WRITE",
    "ConfigSection",
    "EventSpec",
    "Handler",
    "MethodSpec",
    "StoreSchema",
    "event_allowed",
    "missing_permission",
]

READ = "operator.read"
WRITE = "operator.write"
ADMIN = "operator.admin"
APPROVALS = "operator.approvals"
PAIRING = "operator.pairing"
#: Not a scope but a role: a method declared with ``NODE`` may be called by nodes only.
NODE = "node"

OPERATOR_SCOPES = (ADMIN, READ, WRITE, APPROVALS, PAIRING)

Handler = Callable[["Call", Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One RPC method a plugin serves.

    :param name: the wire name, e.g. ``"chat.send"``.
    :param handler: ``async (call, params) -> payload``; the payload is anything msgspec can
        encode (a Struct, a dict, a list, ``None``).
    :param scope: the scope a caller needs (``READ``, ``WRITE``, ``ADMIN``, ``APPROVALS``,
        ``PAIRING``) or ``NODE`` for the node role. ``READ`` is also met by ``WRITE``, and
        every operator scope by ``ADMIN``.
    :param params: the msgspec Struct the params decode into; the kernel validates before
        the handler runs and answers 400 naming the field otherwise.
    :param idempotency_field: the params attribute holding an idempotency key. A repeat of a
        key gets the first request's result; a repeat while the first still runs waits for it.
    :param advertised: whether ``hello-ok.features.methods`` lists it.
    :param quick: the handler answers from memory and never waits (no store, no network,
        no sleeping), so the kernel runs it on the connection's reader instead of handing
        it to a worker task. A quick handler that does wait delays the connection's next
        requests; it is not a correctness problem, only a slow one.
    """

    name: str
    handler: Handler
    scope: str
    params: type[msgspec.Struct] = EmptyParams
    idempotency_field: str | None = None
    advertised: bool = True
    description: str = ""
    quick: bool = False


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One event type a plugin emits.

    :param scope: the scope a client needs to receive it, or ``None`` for every connected
        client, nodes included. ``READ`` is also met by ``WRITE`` and ``ADMIN``.
    :param droppable: a slow client may miss it (ticks, deltas, presence); otherwise a client
        too slow to take it is disconnected rather than silently missing it.
    """

    name: str
    scope: str | None = READ
    droppable: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class ConfigSection:
    """A plugin's own ``[plugins.NAME]`` table, decoded into ``schema`` at start-up.

    ``schema`` must be constructible with no arguments (every field has a default), so that a
    config file that does not mention the plugin still works. ``enabled`` and ``required``
    are the kernel's keys and never reach the schema.
    """

    schema: type[msgspec.Struct]


@dataclass(frozen=True, slots=True)
class StoreSchema:
    """Tables a plugin owns in the kernel's SQLite store.

    ``migrations[i]`` moves the schema from version ``i`` to ``i + 1``; the kernel applies the
    missing ones in one transaction each before the plugin starts. Never edit a released
    migration: append a new one.
    """

    owner: str
    migrations: Sequence[str] = field(default_factory=tuple)


def missing_permission(role: str, scopes: frozenset[str], required: str) -> str | None:
    """Say what a caller lacks for a method needing ``required``, or ``None`` if allowed."""
    if required == NODE:
        return None if role == "node" else "role node"
    if role == "node":
        return "role operator"
    if ADMIN in scopes or required in scopes:
        return None
    if required == READ and WRITE in scopes:
        return None
    return f"scope {required}"


def event_allowed(role: str, scopes: frozenset[str], required: str | None) -> bool:
    """Whether a connection may receive an event declared with ``required``."""
    if required is None:
        return True
    if role == "node":
        return False
    return ADMIN in scopes or required in scopes or (required == READ and WRITE in scopes)
