"""The frames on the wire and the ``connect`` handshake's params and result.

Every frame is a msgspec Struct; decoders and encoders are built once at import and reused,
because they sit on the per-frame path. Field names on the wire are camelCase; Python
attributes are snake_case through ``rename="camel"``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from .errors import GatewayError

__all__ = [
    "PROTOCOL_VERSIONS",
    "AuthBlock",
    "ClientInfo",
    "ConnectParams",
    "DeviceBlock",
    "EmptyParams",
    "ErrorShape",
    "EventFrame",
    "NonEmptyStr",
    "Params",
    "Payload",
    "RequestFrame",
    "ResponseFrame",
    "decode_params",
    "decode_request",
    "encode_frame",
    "error_shape",
    "validation_message",
]

#: Wire protocol versions this kernel speaks; they are identical on our wire.
PROTOCOL_VERSIONS = range(1, 4)


class Params(msgspec.Struct, forbid_unknown_fields=True, rename="camel", kw_only=True):
    """Base for every method's params: camelCase on the wire, unknown fields refused."""


class Payload(msgspec.Struct, rename="camel", kw_only=True, omit_defaults=True):
    """Base for result and event payloads: camelCase on the wire, unset fields left out."""


class EmptyParams(Params):
    """Params of a method that takes none."""


NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


class RequestFrame(msgspec.Struct):
    # A plain field, not a tag: msgspec lets a lone tagged struct decode without its tag, and
    # a frame missing ``type`` is junk like any frame missing a field.
    type: Literal["req"]
    id: NonEmptyStr
    method: NonEmptyStr
    params: msgspec.Raw = msgspec.Raw(b"{}")


class ErrorShape(msgspec.Struct, rename="camel", omit_defaults=True):
    code: int
    reason: str
    message: str
    details: Any = None
    retryable: bool | None = None
    retry_after_ms: int | None = None


class ResponseFrame(msgspec.Struct, tag_field="type", tag="res", omit_defaults=True):
    id: str
    ok: bool
    payload: Any = None
    error: ErrorShape | None = None


class EventFrame(msgspec.Struct, tag_field="type", tag="evt", omit_defaults=True):
    event: str
    payload: msgspec.Raw | None = None
    seq: int | None = None


class ClientInfo(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """Who is connecting: the client program, not the person."""

    id: str
    version: str
    platform: str
    mode: str
    display_name: str | None = None
    device_family: str | None = None
    model_identifier: str | None = None
    instance_id: str | None = None


class DeviceBlock(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """A device's proof of identity: its key and a signature over this connection's nonce."""

    id: str
    public_key: str
    signature: str
    signed_at: int
    nonce: str | None = None


class AuthBlock(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    token: str | None = None
    password: str | None = None


class ConnectParams(Params):
    min_protocol: int
    max_protocol: int
    client: ClientInfo
    role: Literal["operator", "node"] = "operator"
    scopes: list[str] = msgspec.field(default_factory=list)
    caps: list[str] = msgspec.field(default_factory=list)
    commands: list[str] = msgspec.field(default_factory=list)
    permissions: dict[str, bool] = msgspec.field(default_factory=dict)
    path_env: str | None = None
    device: DeviceBlock | None = None
    auth: AuthBlock | None = None
    locale: str | None = None
    user_agent: str | None = None


_request_decoder = msgspec.json.Decoder(RequestFrame)
_encoder = msgspec.json.Encoder()
_params_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def decode_request(data: str | bytes) -> RequestFrame:
    """Decode one client frame; raises ``msgspec.DecodeError`` (or ``ValidationError``)."""
    return _request_decoder.decode(data)


def encode_frame(frame: msgspec.Struct) -> bytes:
    return _encoder.encode(frame)


_PATH_RE = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]+)`")


def validation_message(error: msgspec.MsgspecError) -> tuple[str, str | None]:
    """Turn a msgspec error into a sentence for a client and the dotted field it names."""
    text = str(error)
    field: str | None = None

    path = _PATH_RE.search(text)
    if path:
        # msgspec does not name dict keys in its paths, only "[...]"; say "any key" plainly.
        dotted = path.group(1).replace("[...]", ".*").replace("[", ".").replace("]", "")
        field = dotted or None
        text = text[: path.start()]

    inner = _MISSING_RE.search(text) or _UNKNOWN_RE.search(text)
    if inner:
        field = f"{field}.{inner.group(1)}" if field else inner.group(1)

    if field:
        return f"{text} (at {field})", field
    return text, None


def decode_params(method: str, raw: msgspec.Raw | bytes, params_type: type) -> Any:
    """Decode and validate a method's params, or raise a 400 that names the field."""
    decoder = _params_decoders.get(params_type)
    if decoder is None:
        decoder = _params_decoders[params_type] = msgspec.json.Decoder(params_type)
    try:
        return decoder.decode(raw)
    except msgspec.MsgspecError as exc:
        message, field = validation_message(exc)
        raise GatewayError(
            400,
            f"invalid {method} params: {message}",
            details={"field": field} if field else None,
        ) from None


def error_shape(error: GatewayError) -> ErrorShape:
    return ErrorShape(
        code=error.code,
        reason=error.reason,
        message=error.message,
        details=error.details,
        retryable=error.retryable,
        retry_after_ms=error.retry_after_ms,
    )
