"""Sessions: session entries, transcripts and usage (``sessions.*``, PROTOCOL.md B6), and the
``sessions`` service that chat and providers use to append turns and record usage."""

from .plugin import SessionsPlugin
from .store import SessionStore

__all__ = ["SessionStore", "SessionsPlugin"]
