"""The gateway's connection handshake and frame decoding, on top of a ``wsclient`` transport.

``open_session`` runs challenge -> ``connect`` -> ``hello-ok`` (optionally with an Ed25519
device signature over the v2 payload) and returns a ``Session`` that decodes frames with one
reusable msgspec decoder, leaving payloads raw so the load generator pays only for the
fields it reads, and checks each connection's event ``seq`` for gaps.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import trio
from wsclient import HandshakeFailed, MessageTransport, TransportClosed, open_transport

CLIENT_INFO = {"id": "test", "version": "bench", "platform": "linux", "mode": "test"}
ROLE = "operator"
SCOPES = ["operator.admin", "operator.read", "operator.write"]
CONNECT_ID = "1"
ERROR_SAMPLES_KEPT = 5
GAP_SAMPLES_KEPT = 5


class Frame(msgspec.Struct):
    """Any server frame; payload and error stay raw until someone needs them."""

    type: str
    id: str | None = None
    ok: bool | None = None
    event: str | None = None
    seq: int | None = None
    payload: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()


class ChallengePayload(msgspec.Struct):
    """``connect.challenge`` payload: only the nonce matters here."""

    nonce: str


class HelloPayload(msgspec.Struct):
    """The one field of ``hello-ok`` the generator checks."""

    type: str


_frame_decoder = msgspec.json.Decoder(Frame)
_challenge_decoder = msgspec.json.Decoder(ChallengePayload)
_hello_decoder = msgspec.json.Decoder(HelloPayload)


class SessionFailed(Exception):
    """The gateway handshake (challenge, connect, hello-ok) did not complete."""


class ErrorLog:
    """Counts every error and keeps the first few messages, so no error goes unseen."""

    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []

    def add(self, message: str) -> None:
        """Count one error, keeping its message if it is among the first few."""
        self.count += 1
        if len(self.samples) < ERROR_SAMPLES_KEPT:
            self.samples.append(message)


class SeqTracker:
    """Checks that one connection's event ``seq`` numbers rise by exactly one."""

    __slots__ = ("gaps", "label", "last", "missing", "samples")

    def __init__(self, label: str) -> None:
        self.label = label
        self.last: int | None = None
        self.gaps = 0
        self.missing = 0
        self.samples: list[str] = []

    def observe(self, seq: int) -> None:
        """Record the next event's ``seq``; anything but last + 1 is a gap."""
        last = self.last
        if last is not None and seq != last + 1:
            self.gaps += 1
            if seq > last:
                self.missing += seq - last - 1
            if len(self.samples) < GAP_SAMPLES_KEPT:
                self.samples.append(f"{self.label}: expected seq {last + 1}, got {seq}")
        self.last = seq


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DeviceIdentity:
    """A fresh Ed25519 key for this process that signs v2 ``connect`` payloads."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.device_id = hashlib.sha256(raw).hexdigest()
        self.public_key = _b64url(raw)

    def connect_block(self, nonce: str, token: str) -> dict[str, Any]:
        """Build ``params.device`` for this connection's challenge ``nonce``."""
        signed_at = int(time.time() * 1000)
        signed = "|".join(
            (
                "v2",
                self.device_id,
                CLIENT_INFO["id"],
                CLIENT_INFO["mode"],
                ROLE,
                ",".join(SCOPES),
                str(signed_at),
                token,
                nonce,
            )
        )
        return {
            "id": self.device_id,
            "publicKey": self.public_key,
            "signature": _b64url(self._key.sign(signed.encode())),
            "signedAt": signed_at,
            "nonce": nonce,
        }


@dataclass(frozen=True)
class Target:
    """Where and how to connect."""

    host: str
    port: int
    path: str
    token: str
    client_kind: str
    device: DeviceIdentity | None
    connect_timeout: float


def describe(exc: BaseException) -> str:
    """One line for an exception, unwrapping single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, TransportClosed | SessionFailed | HandshakeFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def error_text(frame: Frame) -> str:
    """The ``error`` of an ``ok:false`` response as ``code=... message``."""
    try:
        error = msgspec.json.decode(frame.error) if frame.error else None
    except msgspec.DecodeError:
        error = None
    if isinstance(error, dict):
        reason = f" ({error['reason']})" if "reason" in error else ""
        return f"code={error.get('code')!r}{reason} {error.get('message')!r}"
    return f"no usable error object: {bytes(frame.error)[:120]!r}"


def _clip(message: bytes | str) -> str:
    return repr(message[:160])


class Session:
    """An authenticated connection: transport, unread frames and the ``seq`` tracker."""

    def __init__(self, transport: MessageTransport, unread: list[bytes | str], label: str) -> None:
        self.transport = transport
        self._unread = unread
        self.seq = SeqTracker(label)

    async def send_many(self, messages: list[bytes]) -> None:
        """Send encoded frames through the transport in one batch."""
        await self.transport.send_many(messages)

    async def receive_frames(self, errors: ErrorLog) -> list[Frame]:
        """Decode the next batch of frames; undecodable ones are logged as errors."""
        if self._unread:
            messages, self._unread = self._unread, []
        else:
            messages = await self.transport.receive_many()
        frames = []
        for message in messages:
            try:
                frame = _frame_decoder.decode(message)
            except msgspec.DecodeError as exc:
                errors.add(f"undecodable frame ({exc}): {_clip(message)}")
                continue
            if frame.type == "evt" and frame.seq is not None:
                self.seq.observe(frame.seq)
            frames.append(frame)
        return frames

    async def aclose(self) -> None:
        """Close the connection (bounded in time by the transport)."""
        await self.transport.aclose()


async def _next_message(transport: MessageTransport, inbox: list[bytes | str]) -> bytes | str:
    if not inbox:
        inbox.extend(await transport.receive_many())
    return inbox.pop(0)


async def open_session(target: Target, nursery: trio.Nursery | None, label: str) -> Session:
    """Open a socket and run the gateway handshake up to ``hello-ok``.

    ``nursery`` is only needed (and then required) for the trio-websocket client.
    """
    transport = await open_transport(
        target.client_kind, target.host, target.port, target.path, nursery
    )
    try:
        inbox: list[bytes | str] = []
        first = await _next_message(transport, inbox)
        challenge = _frame_decoder.decode(first)
        if challenge.type != "evt" or challenge.event != "connect.challenge":
            raise SessionFailed(f"expected connect.challenge, got {_clip(first)}")
        nonce = _challenge_decoder.decode(challenge.payload).nonce
        params: dict[str, Any] = {
            "minProtocol": 3,
            "maxProtocol": 3,
            "client": CLIENT_INFO,
            "role": ROLE,
            "scopes": SCOPES,
            "auth": {"token": target.token},
        }
        if target.device is not None:
            params["device"] = target.device.connect_block(nonce, target.token)
        request = {"type": "req", "id": CONNECT_ID, "method": "connect", "params": params}
        await transport.send_many([msgspec.json.encode(request)])
        while True:
            message = await _next_message(transport, inbox)
            frame = _frame_decoder.decode(message)
            if frame.type == "res" and frame.id == CONNECT_ID:
                if not frame.ok:
                    raise SessionFailed(f"connect rejected: {error_text(frame)}")
                hello_type = _hello_decoder.decode(frame.payload).type
                if hello_type != "hello-ok":
                    raise SessionFailed(f"connect answered with payload type {hello_type!r}")
                return Session(transport, inbox, label)
            if frame.type != "evt":
                raise SessionFailed(f"unexpected frame before hello-ok: {_clip(message)}")
    except msgspec.DecodeError as exc:
        with trio.CancelScope(shield=True):
            await transport.aclose()
        raise SessionFailed(f"undecodable handshake frame: {exc}") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await transport.aclose()
        raise
