"""The event bus: plugins emit declared events; the kernel fans them out by scope.

An event's payload is encoded once per emit, whatever the number of recipients; each
recipient's frame differs only in its ``seq``, appended to a shared prefix. Emitting never
waits, so it is safe from handlers and background tasks alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from .connection import event_prefix
from .specs import EventSpec

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["EventBus", "UnknownEventError"]

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


class UnknownEventError(LookupError):
    """An event was emitted that no plugin declared."""


class EventBus:
    def __init__(self, specs: Mapping[str, EventSpec], connections: Mapping[str, Connection]):
        self._specs = specs
        self._connections = connections
        self.emitted = 0

    def spec(self, event: str) -> EventSpec:
        try:
            return self._specs[event]
        except KeyError:
            raise UnknownEventError(f"event {event!r} was not declared by any plugin") from None

    def emit(self, event: str, payload: Any = None, *, to: Iterable[str] | None = None) -> int:
        """Send ``event`` to every connection allowed to receive it, or only to ``to``.

        :param to: connection ids; a targeted event still honours the event's scope.
        :returns: how many connections it was queued for.
        """
        spec = self.spec(event)
        encoded = None if payload is None else _encoder.encode(payload)
        prefix = event_prefix(event, encoded)
        self.emitted += 1

        if to is None:
            recipients: Iterable[Connection] = self._connections.values()
        else:
            recipients = (c for i in to if (c := self._connections.get(i)) is not None)

        delivered = 0
        for connection in recipients:
            if event in connection.info.allowed_events and connection.send_event_frame(
                prefix, spec.droppable
            ):
                delivered += 1
        return delivered
