"""Device pairing and device tokens: ``device.pair.*`` and ``device.token.*`` for operators."""

from .plugin import DevicesPlugin

__all__ = ["DevicesPlugin"]
