"""Shared by the devices plugin tests: a device key, and the ``admit`` fixture's type."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["Admit", "Device"]


class Device:
    """A device key and the id derived from it."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        self.device_id = hashlib.sha256(raw).hexdigest()


#: ``await admit(device, local=..., scopes=[...], role=..., by_device_token=...)``
Admit = Callable[..., Awaitable[Any]]
