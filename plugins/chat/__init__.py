"""Chat and Agent: ``chat.send|history|abort|inject``, ``agent``, ``agent.wait``,
``agent.identity.get``; runs streamed as ``chat.run.*`` and ``chat.delta`` events."""

from .plugin import ChatPlugin

__all__ = ["ChatPlugin"]
