"""The ANIMA gateway kernel: the public API for plugins and embedding hosts.

Plugins import from here only (``from kernel import hookimpl, MethodSpec, ...``); the
modules behind it are the kernel's own and may change.
"""

from .call import Call
from .client import GatewayClient, HandshakeRefused, open_client
from .config import ConfigError
from .connection import ConnectionInfo
from .embed import open_gateway, serve_gateway
from .errors import (
    GatewayError,
    conflict,
    forbidden,
    internal,
    invalid_request,
    not_found,
    rate_limited,
    timed_out,
    unauthorized,
    unavailable,
)
from .events import UnknownEventError
from .frames import EmptyParams, NonEmptyStr, Params, Payload
from .gateway import Gateway, GatewayStartupError
from .hookspecs import hookimpl, hookspec
from .jobs import Job, JobRegistry
from .providers import (
    ModelInfo,
    ModelMessage,
    ModelProvider,
    ModelRequest,
    ProviderError,
    StreamDone,
    StreamEvent,
    TextDelta,
    TokenUsage,
)
from .services import Services
from .specs import (
    ADMIN,
    APPROVALS,
    NODE,
    PAIRING,
    READ,
    WRITE,
    ConfigSection,
    EventSpec,
    MethodSpec,
    StoreSchema,
)
from .store import Store, StoreError

__all__ = [
    "ADMIN",
    "APPROVALS",
    "NODE",
    "PAIRING",
    "READ",
    "WRITE",
    "Call",
    "ConfigError",
    "ConfigSection",
    "ConnectionInfo",
    "EmptyParams",
    "EventSpec",
    "Gateway",
    "GatewayClient",
    "GatewayError",
    "GatewayStartupError",
    "HandshakeRefused",
    "Job",
    "JobRegistry",
    "MethodSpec",
    "ModelInfo",
    "ModelMessage",
    "ModelProvider",
    "ModelRequest",
    "NonEmptyStr",
    "Params",
    "Payload",
    "ProviderError",
    "Services",
    "Store",
    "StoreError",
    "StoreSchema",
    "StreamDone",
    "StreamEvent",
    "TextDelta",
    "TokenUsage",
    "UnknownEventError",
    "conflict",
    "forbidden",
    "hookimpl",
    "hookspec",
    "internal",
    "invalid_request",
    "not_found",
    "open_client",
    "open_gateway",
    "rate_limited",
    "serve_gateway",
    "timed_out",
    "unauthorized",
    "unavailable",
]
