"""Device identity: key formats, device ids, payloads and the connect proof check.

Every test uses real Ed25519 keys generated on the spot; nothing is mocked.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from kernel.device_identity import (
    DEFAULT_MAX_SKEW_MS,
    DeviceIdentityError,
    VerifiedDevice,
    build_signature_payload,
    derive_device_id,
    encode_public_key,
    normalize_public_key,
    sign_device_proof,
    verify_device_proof,
)

NOW_MS = 1_700_000_000_000
NONCE = "3f1c2a9e-8d4b-4c3e-9a71-0b6f5e2d1c4a"
CLIENT = {"client_id": "cli", "client_mode": "cli", "role": "operator"}
SCOPES = ["operator.read", "operator.write"]


def raw_public_key(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def pem_public_key(private_key: Any) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


@pytest.fixture
def private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed_block(
    private_key: Ed25519PrivateKey,
    *,
    nonce: str | None = NONCE,
    signed_at_ms: int = NOW_MS,
    token: str | None = "shared-token",
    scopes: list[str] = SCOPES,
) -> dict[str, Any]:
    return sign_device_proof(
        private_key,
        **CLIENT,
        scopes=scopes,
        token=token,
        nonce=nonce,
        signed_at_ms=signed_at_ms,
    )


def verify(block: dict[str, Any], **overrides: Any) -> VerifiedDevice:
    """Verify ``block`` as a remote connection with matching request fields by default."""
    arguments: dict[str, Any] = {
        "device_id": block["id"],
        "public_key": block["publicKey"],
        "signature": block["signature"],
        "signed_at_ms": block["signedAt"],
        "nonce": block.get("nonce"),
        "expected_nonce": NONCE,
        "is_local": False,
        **CLIENT,
        "scopes": SCOPES,
        "token": "shared-token",
        "now_ms": NOW_MS,
    }
    arguments.update(overrides)
    return verify_device_proof(**arguments)


def failure_reason(block: dict[str, Any], **overrides: Any) -> str:
    with pytest.raises(DeviceIdentityError) as caught:
        verify(block, **overrides)
    return caught.value.reason


# -- key formats and device ids ------------------------------------------------------------


def test_base64url_key_round_trips(private_key: Ed25519PrivateKey) -> None:
    raw = raw_public_key(private_key)
    encoded = encode_public_key(raw)
    assert "=" not in encoded
    assert "+" not in encoded and "/" not in encoded
    assert normalize_public_key(encoded) == raw


@pytest.mark.parametrize(
    "encode",
    [
        lambda raw: base64.b64encode(raw).decode("ascii"),
        lambda raw: base64.b64encode(raw).decode("ascii").rstrip("="),
        lambda raw: base64.urlsafe_b64encode(raw).decode("ascii"),
        lambda raw: "  " + b64url(raw) + "\n",
    ],
    ids=["standard-padded", "standard-unpadded", "urlsafe-padded", "surrounding-whitespace"],
)
def test_other_base64_spellings_are_accepted(encode: Any) -> None:
    # 0xfb/0xff bytes force '+' and '/' (or '-' and '_') into the encoding.
    raw = bytes([0xFB, 0xFF] * 16)
    assert normalize_public_key(encode(raw)) == raw


def test_pem_spki_key_gives_the_raw_key(private_key: Ed25519PrivateKey) -> None:
    pem = pem_public_key(private_key)
    assert "BEGIN PUBLIC KEY" in pem
    assert normalize_public_key(pem) == raw_public_key(private_key)


def test_pem_is_the_spki_prefix_plus_the_raw_key(private_key: Ed25519PrivateKey) -> None:
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert der[:12] == bytes.fromhex("302a300506032b6570032100")
    assert normalize_public_key(pem_public_key(private_key)) == der[12:]


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("", "expected 32 bytes, got 0"),
        (b64url(b"\x01" * 31), "expected 32 bytes, got 31"),
        (b64url(b"\x01" * 33), "expected 32 bytes, got 33"),
        ("not base64 at all!", "not base64"),
        ("A", "not base64"),
        ("AAAA AAAA", "not base64"),
        ("ключ", "not base64"),
        ("-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----", "not a PEM"),
        ("BEGIN", "not a PEM"),
    ],
)
def test_malformed_keys_are_refused(text: str, detail: str) -> None:
    with pytest.raises(DeviceIdentityError) as caught:
        normalize_public_key(text)
    assert caught.value.reason == "public-key-invalid"
    assert detail in caught.value.message


@pytest.mark.parametrize(
    "other_key",
    [Ed448PrivateKey.generate, lambda: generate_private_key(SECP256R1())],
    ids=["ed448", "p256"],
)
def test_pem_of_another_key_type_is_refused(other_key: Any) -> None:
    with pytest.raises(DeviceIdentityError) as caught:
        normalize_public_key(pem_public_key(other_key()))
    assert caught.value.reason == "public-key-invalid"
    assert "not Ed25519" in caught.value.message


def test_private_key_pem_is_refused(private_key: Ed25519PrivateKey) -> None:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    with pytest.raises(DeviceIdentityError, match="not a PEM public key"):
        normalize_public_key(pem)


def test_device_id_is_sha256_hex_of_the_raw_key(private_key: Ed25519PrivateKey) -> None:
    raw = raw_public_key(private_key)
    device_id = derive_device_id(raw)
    assert device_id == hashlib.sha256(raw).hexdigest()
    assert len(device_id) == 64
    assert device_id == device_id.lower()


@pytest.mark.parametrize("function", [derive_device_id, encode_public_key])
def test_raw_key_helpers_insist_on_32_bytes(function: Any) -> None:
    with pytest.raises(ValueError, match="32 bytes, got 31"):
        function(b"\x00" * 31)


# -- payloads ------------------------------------------------------------------------------


def test_v2_payload_layout() -> None:
    payload = build_signature_payload(
        version="v2",
        device_id="abc",
        client_id="cli",
        client_mode="cli",
        role="operator",
        scopes=["operator.write", "operator.read"],
        signed_at_ms=1234,
        token="tok",
        nonce="n-1",
    )
    assert payload == "v2|abc|cli|cli|operator|operator.write,operator.read|1234|tok|n-1"


def test_v1_payload_layout_with_no_scopes_and_no_token() -> None:
    payload = build_signature_payload(
        version="v1",
        device_id="abc",
        client_id="webchat",
        client_mode="webchat",
        role="node",
        scopes=[],
        signed_at_ms=0,
        token=None,
        nonce=None,
    )
    assert payload == "v1|abc|webchat|webchat|node||0|"


@pytest.mark.parametrize(("version", "nonce"), [("v2", None), ("v2", ""), ("v1", "n-1")])
def test_payload_version_and_nonce_must_agree(version: Any, nonce: str | None) -> None:
    with pytest.raises(ValueError, match="nonce"):
        build_signature_payload(
            version=version,
            device_id="abc",
            client_id="cli",
            client_mode="cli",
            role="operator",
            scopes=[],
            signed_at_ms=0,
            token=None,
            nonce=nonce,
        )


def test_signed_block_shape(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    assert set(block) == {"id", "publicKey", "signature", "signedAt", "nonce"}
    assert block["id"] == derive_device_id(raw_public_key(private_key))
    assert block["signedAt"] == NOW_MS
    assert block["nonce"] == NONCE
    assert "=" not in block["signature"]
    assert "nonce" not in signed_block(private_key, nonce=None)


# -- verifying proofs ----------------------------------------------------------------------


def test_valid_v2_proof_is_accepted(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    verified = verify(block)
    assert verified == VerifiedDevice(
        device_id=block["id"], public_key=encode_public_key(raw_public_key(private_key))
    )


def test_pem_key_is_verified_and_reported_in_base64url(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    verified = verify(block, public_key=pem_public_key(private_key))
    assert verified.public_key == block["publicKey"]


def test_standard_base64_signature_and_key_are_accepted(
    private_key: Ed25519PrivateKey,
) -> None:
    block = signed_block(private_key)
    signature = base64.urlsafe_b64decode(block["signature"] + "==")
    key = raw_public_key(private_key)
    verified = verify(
        block,
        signature=base64.b64encode(signature).decode("ascii"),
        public_key=base64.b64encode(key).decode("ascii"),
    )
    assert verified.public_key == block["publicKey"]


def test_local_connection_may_sign_v1_without_nonce(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key, nonce=None)
    assert verify(block, is_local=True).device_id == block["id"]


def test_local_connection_with_a_nonce_is_held_to_v2(private_key: Ed25519PrivateKey) -> None:
    assert verify(signed_block(private_key), is_local=True).device_id
    # A v1 signature presented alongside a nonce is checked as v2 and fails.
    v1_block = signed_block(private_key, nonce=None)
    assert failure_reason(v1_block, nonce=NONCE, is_local=True) == "signature-invalid"


def test_remote_connection_without_nonce_is_refused(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key, nonce=None)
    assert failure_reason(block) == "nonce-required"
    assert failure_reason(block, nonce="   ") == "nonce-required"


def test_v2_signature_presented_without_nonce_by_local_client_fails(
    private_key: Ed25519PrivateKey,
) -> None:
    block = signed_block(private_key)
    assert failure_reason(block, nonce=None, is_local=True) == "signature-invalid"


def test_wrong_nonce_is_refused(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key, nonce="some-other-connection")
    assert failure_reason(block) == "nonce-mismatch"
    assert failure_reason(block, is_local=True) == "nonce-mismatch"


def test_nonce_is_trimmed_before_comparison(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    assert verify(block, nonce=f"  {NONCE}  ").device_id == block["id"]


def test_device_id_must_be_derived_from_the_key(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    other = derive_device_id(raw_public_key(Ed25519PrivateKey.generate()))
    assert failure_reason(block, device_id=other) == "device-id-mismatch"
    assert failure_reason(block, device_id=block["id"].upper()) == "device-id-mismatch"


def test_malformed_public_key_is_reported_as_such(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    assert failure_reason(block, public_key="AAAA") == "public-key-invalid"


def test_key_of_another_device_fails_the_id_check(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    stranger = encode_public_key(raw_public_key(Ed25519PrivateKey.generate()))
    assert failure_reason(block, public_key=stranger) == "device-id-mismatch"


@pytest.mark.parametrize("offset_ms", [DEFAULT_MAX_SKEW_MS, -DEFAULT_MAX_SKEW_MS, 0])
def test_signature_up_to_ten_minutes_old_or_ahead_is_fresh(
    private_key: Ed25519PrivateKey, offset_ms: int
) -> None:
    block = signed_block(private_key, signed_at_ms=NOW_MS - offset_ms)
    assert verify(block).device_id == block["id"]


@pytest.mark.parametrize("offset_ms", [DEFAULT_MAX_SKEW_MS + 1, -DEFAULT_MAX_SKEW_MS - 1])
def test_signature_just_over_ten_minutes_is_expired(
    private_key: Ed25519PrivateKey, offset_ms: int
) -> None:
    block = signed_block(private_key, signed_at_ms=NOW_MS - offset_ms)
    assert failure_reason(block) == "signature-expired"


def test_skew_window_is_a_parameter(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key, signed_at_ms=NOW_MS - 5_000)
    assert failure_reason(block, max_skew_ms=4_999) == "signature-expired"
    assert verify(block, max_skew_ms=5_000).device_id == block["id"]


@pytest.mark.parametrize(
    "override",
    [
        {"client_id": "webchat"},
        {"client_mode": "backend"},
        {"role": "node"},
        {"scopes": ["operator.read", "operator.write", "operator.admin"]},
        {"scopes": ["operator.write", "operator.read"]},
        {"token": None},
        {"token": "another-token"},
    ],
    ids=lambda override: next(iter(override)),
)
def test_signature_binds_every_request_field(
    private_key: Ed25519PrivateKey, override: dict[str, Any]
) -> None:
    block = signed_block(private_key)
    assert failure_reason(block, **override) == "signature-invalid"


@pytest.mark.parametrize(
    "signature",
    ["", "!!!!", "A", b64url(b"\x00" * 64), b64url(b"\x00" * 63), "AAAA=AAAA"],
    ids=["empty", "not-base64", "bad-length-text", "zeros", "short", "inner-padding"],
)
def test_malformed_or_wrong_signatures_are_invalid(
    private_key: Ed25519PrivateKey, signature: str
) -> None:
    assert failure_reason(signed_block(private_key), signature=signature) == "signature-invalid"


def test_signature_by_another_key_is_invalid(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    forged = signed_block(Ed25519PrivateKey.generate())
    assert failure_reason(block, signature=forged["signature"]) == "signature-invalid"


def test_checks_run_in_handshake_order(private_key: Ed25519PrivateKey) -> None:
    block = signed_block(private_key)
    everything_wrong = {
        "device_id": "0" * 64,
        "signed_at_ms": 0,
        "nonce": None,
        "signature": "garbage",
    }
    assert failure_reason(block, **everything_wrong) == "device-id-mismatch"
    del everything_wrong["device_id"]
    assert failure_reason(block, **everything_wrong) == "signature-expired"
    del everything_wrong["signed_at_ms"]
    assert failure_reason(block, **everything_wrong) == "nonce-required"
    everything_wrong["nonce"] = "wrong"
    assert failure_reason(block, **everything_wrong) == "nonce-mismatch"
    del everything_wrong["nonce"]
    assert failure_reason(block, **everything_wrong) == "signature-invalid"
    assert failure_reason(block, public_key="bad", device_id="0" * 64) == "public-key-invalid"


def test_error_carries_a_readable_message(private_key: Ed25519PrivateKey) -> None:
    with pytest.raises(DeviceIdentityError) as caught:
        verify(signed_block(private_key), signed_at_ms=0)
    assert str(caught.value).startswith("device signature expired")
    assert "signature-expired" in repr(caught.value)


# -- properties ----------------------------------------------------------------------------


@given(st.binary(min_size=32, max_size=32))
def test_any_32_bytes_round_trip_through_every_base64_spelling(raw: bytes) -> None:
    assert normalize_public_key(encode_public_key(raw)) == raw
    assert normalize_public_key(base64.b64encode(raw).decode("ascii")) == raw


@given(st.one_of(st.text(), st.binary().map(lambda data: data.decode("latin-1"))))
def test_arbitrary_key_text_only_ever_raises_device_identity_error(text: str) -> None:
    for candidate in (text, f"-----BEGIN PUBLIC KEY-----\n{text}\n-----END PUBLIC KEY-----"):
        try:
            raw = normalize_public_key(candidate)
        except DeviceIdentityError as error:
            assert error.reason == "public-key-invalid"
        else:
            assert len(raw) == 32


@given(
    key_text=st.one_of(st.text(max_size=80), st.binary(max_size=48).map(b64url)),
    signature_text=st.one_of(st.text(max_size=100), st.binary(max_size=80).map(b64url)),
    nonce=st.one_of(st.none(), st.text(max_size=10), st.just(NONCE)),
    is_local=st.booleans(),
)
def test_arbitrary_device_blocks_only_ever_raise_device_identity_error(
    key_text: str, signature_text: str, nonce: str | None, is_local: bool
) -> None:
    try:
        device_id = derive_device_id(normalize_public_key(key_text))
    except DeviceIdentityError:
        device_id = "0" * 64
    with pytest.raises(DeviceIdentityError):
        verify_device_proof(
            device_id=device_id,
            public_key=key_text,
            signature=signature_text,
            signed_at_ms=NOW_MS,
            nonce=nonce,
            expected_nonce=NONCE,
            is_local=is_local,
            client_id="cli",
            client_mode="cli",
            role="operator",
            scopes=[],
            token=None,
            now_ms=NOW_MS,
        )


@given(
    scopes=st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz.", min_size=1), max_size=5),
    token=st.one_of(st.none(), st.text(max_size=40)),
    nonce=st.one_of(st.none(), st.text(min_size=1, max_size=40).filter(str.strip)),
    skew_ms=st.integers(min_value=-DEFAULT_MAX_SKEW_MS, max_value=DEFAULT_MAX_SKEW_MS),
)
def test_any_honestly_signed_proof_verifies(
    scopes: list[str], token: str | None, nonce: str | None, skew_ms: int
) -> None:
    private_key = Ed25519PrivateKey.generate()
    presented_nonce = nonce.strip() if nonce else None
    block = sign_device_proof(
        private_key,
        **CLIENT,
        scopes=scopes,
        token=token,
        nonce=presented_nonce,
        signed_at_ms=NOW_MS + skew_ms,
    )
    verified = verify_device_proof(
        device_id=block["id"],
        public_key=block["publicKey"],
        signature=block["signature"],
        signed_at_ms=block["signedAt"],
        nonce=block.get("nonce"),
        expected_nonce=presented_nonce or NONCE,
        is_local=presented_nonce is None,
        **CLIENT,
        scopes=scopes,
        token=token,
        now_ms=NOW_MS,
    )
    assert verified.device_id == block["id"]
