"""Ed25519 device identity: key formats, device ids, signed connect proofs.

A device proves who it is on ``connect`` by signing a payload that binds its key to this
connection (the challenge nonce), to what it asks for (client, role, scopes, token) and to a
point in time. This module holds the whole of that check as pure functions, so the handshake
only has to map a failure ``reason`` to a response and every refusal says which check failed.

Wire formats (PROTOCOL.md A10): public keys are the raw 32-byte key in base64url without
padding, standard base64, or a PEM SPKI block; signatures are base64url without padding,
standard base64 accepted. The device id is the lowercase hex SHA-256 of the raw key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "DEFAULT_MAX_SKEW_MS",
    "DeviceIdentityError",
    "DeviceIdentityFailure",
    "SignatureVersion",
    "VerifiedDevice",
    "build_signature_payload",
    "derive_device_id",
    "encode_public_key",
    "normalize_public_key",
    "sign_device_proof",
    "verify_device_proof",
]

#: How far ``signedAt`` may be from the server's clock, in either direction (10 minutes).
DEFAULT_MAX_SKEW_MS = 600_000

_RAW_KEY_LENGTH = 32
_SIGNATURE_LENGTH = 64

SignatureVersion = Literal["v1", "v2"]

DeviceIdentityFailure = Literal[
    "public-key-invalid",
    "device-id-mismatch",
    "signature-expired",
    "nonce-required",
    "nonce-mismatch",
    "signature-invalid",
]


class DeviceIdentityError(Exception):
    """A device block that does not prove the identity it claims.

    :param reason: which check failed, as a short machine string a client can act on.
    :param message: one sentence for a person.
    """

    def __init__(self, reason: DeviceIdentityFailure, message: str) -> None:
        super().__init__(message)
        self.reason: DeviceIdentityFailure = reason
        self.message = message

    def __repr__(self) -> str:
        return f"DeviceIdentityError({self.reason!r}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class VerifiedDevice:
    """A device whose proof checked out.

    ``public_key`` is the normalised base64url form, the one that is stored and compared
    when looking up a paired device, whatever format the client sent.
    """

    device_id: str
    public_key: str


def _decode_base64(text: str) -> bytes:
    """Decode base64url or standard base64, padded or not; raise ``ValueError`` otherwise."""
    compact = text.strip()
    unpadded = compact.rstrip("=")
    standard = unpadded.replace("-", "+").replace("_", "/")
    padded = standard + "=" * (-len(standard) % 4)
    # validate=True refuses stray characters instead of silently skipping them, so two
    # different strings cannot both decode to the same key or signature by accident.
    return base64.b64decode(padded, validate=True)


def _require_raw_key(raw: bytes) -> None:
    if len(raw) != _RAW_KEY_LENGTH:
        raise ValueError(f"an Ed25519 public key is {_RAW_KEY_LENGTH} bytes, got {len(raw)}")


def _invalid_key(detail: str) -> DeviceIdentityError:
    return DeviceIdentityError("public-key-invalid", f"device public key invalid: {detail}")


def normalize_public_key(text: str) -> bytes:
    """Return the raw 32-byte Ed25519 key from any accepted wire format.

    A string containing ``BEGIN`` is read as a PEM SubjectPublicKeyInfo block; anything else
    as base64url or standard base64 of the raw key.

    :raises DeviceIdentityError: with reason ``public-key-invalid`` when the text is not one
        of those formats, or is one but does not hold an Ed25519 public key.
    """
    if "BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text.strip().encode("utf-8"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise _invalid_key("not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise _invalid_key("the PEM key is not Ed25519")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = _decode_base64(text)
    except (ValueError, binascii.Error) as exc:
        raise _invalid_key("not base64") from exc
    if len(raw) != _RAW_KEY_LENGTH:
        raise _invalid_key(f"expected {_RAW_KEY_LENGTH} bytes, got {len(raw)}")
    return raw


def encode_public_key(raw: bytes) -> str:
    """Encode a raw 32-byte key the way it is stored and sent: base64url, no padding."""
    _require_raw_key(raw)
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def derive_device_id(raw: bytes) -> str:
    """Return the device id of a raw 32-byte key: its SHA-256 in lowercase hex."""
    _require_raw_key(raw)
    return hashlib.sha256(raw).hexdigest()


def build_signature_payload(
    *,
    version: SignatureVersion,
    device_id: str,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    signed_at_ms: int,
    token: str | None,
    nonce: str | None,
) -> str:
    """Return the exact string a device signs on connect (PROTOCOL.md A10).

    ``v2`` carries the connection's challenge nonce and is what every remote client signs;
    ``v1`` has no nonce and is only accepted from local connections. Scopes keep the order
    the client sends them in; ``token`` is ``auth.token`` (never the password) or nothing.

    :raises ValueError: for a ``v2`` payload without a nonce or a ``v1`` payload with one,
        since either would be a signature the server can never accept.
    """
    if version == "v2" and not nonce:
        raise ValueError("a v2 payload needs the challenge nonce")
    if version == "v1" and nonce:
        raise ValueError("a v1 payload carries no nonce")
    fields = [
        version,
        device_id,
        client_id,
        client_mode,
        role,
        ",".join(scopes),
        str(signed_at_ms),
        token or "",
    ]
    if version == "v2":
        fields.append(nonce or "")
    return "|".join(fields)


def verify_device_proof(
    *,
    device_id: str,
    public_key: str,
    signature: str,
    signed_at_ms: int,
    nonce: str | None,
    expected_nonce: str,
    is_local: bool,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    token: str | None,
    now_ms: int,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
) -> VerifiedDevice:
    """Check the ``device`` block of a connect request; return the verified identity.

    The first five keyword arguments are the device block as sent (``id``, ``publicKey``,
    ``signature``, ``signedAt``, ``nonce``); ``expected_nonce`` is the nonce this connection's
    challenge carried; ``role`` is the effective role and ``scopes`` the requested scopes in
    the order sent; ``token`` is ``auth.token`` if any.

    Checks run in the handshake's order (PROTOCOL.md A5 row 7), except that the key is read
    first: a key that cannot be decoded has no device id to compare, and saying
    ``public-key-invalid`` is more useful than a mismatch. Then: ``device-id-mismatch``,
    ``signature-expired`` (more than ``max_skew_ms`` either side of ``now_ms``),
    ``nonce-required`` (a non-local connection sent no nonce), ``nonce-mismatch``,
    ``signature-invalid``. A supplied nonce is verified against the v2 payload only, and no
    nonce against v1 only, so a remote client cannot fall back to the replayable form.

    :raises DeviceIdentityError: naming the first check that failed.
    """
    raw_key = normalize_public_key(public_key)
    if derive_device_id(raw_key) != device_id:
        raise DeviceIdentityError(
            "device-id-mismatch", "device identity mismatch: id is not derived from the key"
        )
    if abs(now_ms - signed_at_ms) > max_skew_ms:
        raise DeviceIdentityError(
            "signature-expired", "device signature expired: signedAt is too far from now"
        )
    presented_nonce = (nonce or "").strip()
    if not presented_nonce and not is_local:
        raise DeviceIdentityError(
            "nonce-required", "device nonce required: sign the connect.challenge nonce"
        )
    if presented_nonce and presented_nonce != expected_nonce:
        raise DeviceIdentityError(
            "nonce-mismatch", "device nonce mismatch: not this connection's challenge"
        )
    payload = build_signature_payload(
        version="v2" if presented_nonce else "v1",
        device_id=device_id,
        client_id=client_id,
        client_mode=client_mode,
        role=role,
        scopes=scopes,
        signed_at_ms=signed_at_ms,
        token=token,
        nonce=presented_nonce or None,
    )
    if not _signature_matches(raw_key, payload, signature):
        raise DeviceIdentityError("signature-invalid", "device signature invalid")
    return VerifiedDevice(device_id=device_id, public_key=encode_public_key(raw_key))


def _signature_matches(raw_key: bytes, payload: str, signature: str) -> bool:
    try:
        signature_bytes = _decode_base64(signature)
    except (ValueError, binascii.Error):
        return False
    if len(signature_bytes) != _SIGNATURE_LENGTH:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(signature_bytes, payload.encode("utf-8"))
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_device_proof(
    private_key: Ed25519PrivateKey,
    *,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    token: str | None,
    nonce: str | None,
    signed_at_ms: int,
) -> dict[str, str | int]:
    """Build the ``device`` block a client sends on connect, signed with ``private_key``.

    With a ``nonce`` (the ``connect.challenge`` nonce) the block is signed as v2 and carries
    it; without one it is signed as v1, which only a local connection may use.
    """
    raw_key = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    device_id = derive_device_id(raw_key)
    payload = build_signature_payload(
        version="v2" if nonce else "v1",
        device_id=device_id,
        client_id=client_id,
        client_mode=client_mode,
        role=role,
        scopes=scopes,
        signed_at_ms=signed_at_ms,
        token=token,
        nonce=nonce or None,
    )
    signature = private_key.sign(payload.encode("utf-8"))
    block: dict[str, str | int] = {
        "id": device_id,
        "publicKey": encode_public_key(raw_key),
        "signature": base64.urlsafe_b64encode(signature).decode("ascii").rstrip("="),
        "signedAt": signed_at_ms,
    }
    if nonce:
        block["nonce"] = nonce
    return block
