"""What a method handler is given: who is calling, the kernel's services, and ways to answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import ConnectionInfo
    from .services import Services

__all__ = ["Call"]


class Call:
    """One request being served.

    :ivar connection: the caller (id, role, scopes, client, device).
    :ivar services: the gateway's services.
    :ivar request_id: the request's ``id``, echoed in its response.
    :ivar method: the method name.
    """

    __slots__ = ("_send_interim", "connection", "method", "request_id", "services")

    def __init__(
        self,
        connection: ConnectionInfo,
        services: Services,
        request_id: str,
        method: str,
        send_interim: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.connection = connection
        self.services = services
        self.request_id = request_id
        self.method = method
        self._send_interim = send_interim

    def emit(self, event: str, payload: Any = None) -> int:
        """Emit a declared event to every client allowed to see it; return how many got it."""
        return self.services.events.emit(event, payload)

    async def accept(self, payload: Any) -> None:
        """Answer now with ``payload`` and keep working: the handler's return value follows
        as a second response with the same id (the two-phase calls, such as ``agent``)."""
        await self._send_interim(payload)
