"""Health & Status: ``health``, ``status``, heartbeats, presence and system events."""

from .plugin import HealthPlugin

__all__ = ["HealthPlugin"]
