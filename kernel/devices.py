"""The kernel's device registry: paired devices, pending pairing requests, device tokens.

Pairing is the kernel's job (PROTOCOL.md A11, A12), so its state lives in the kernel's own
tables of the store, versioned like a plugin's (``DEVICES_SCHEMA``). The handshake uses the
registry to verify device tokens and to admit devices; the ``devices`` plugin reaches it as
the ``"devices"`` service to list, approve, reject, rotate and revoke.

What differs from upstream, on purpose (DESIGN.md, decisions table):

- a device token is stored as its SHA-256 only, so it is shown once, when issued, and a
  copy of the database does not let anyone in;
- a revoked token stays revoked: the device gets no new token on its next shared-secret
  connect, only when an operator rotates it;
- ``rotate`` may only narrow: the scopes it asks for must be among those the device was
  approved for; widening goes through pairing again.

Every method runs its SQL in one ``store.run`` transaction, so two handshakes of one device
cannot both create a pending request or both mint a token. Events
(``device.pair.requested``, ``device.pair.resolved``) are emitted on the event loop after
the transaction has committed.

Logger ``kernel.devices``: INFO for pairing decisions and token changes, never a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import forbidden, not_found, unavailable
from .specs import StoreSchema

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "DEVICES_SCHEMA",
    "PENDING_TTL_MS",
    "Admission",
    "DeviceMeta",
    "DeviceRegistry",
    "IssuedToken",
    "TokenCheck",
    "hash_token",
    "new_device_token",
]

logger = logging.getLogger(__name__)

#: A pending pairing request is forgotten this long after it was made (5 minutes).
PENDING_TTL_MS = 300_000
#: At most this many requests wait at once; beyond it a new one is refused (503), so that a
#: client holding the shared secret cannot fill the store with throw-away keys.
MAX_PENDING = 1_000
#: Device tokens are this many random bytes, base64url without padding (43 characters).
TOKEN_BYTES = 32

EVENT_REQUESTED = "device.pair.requested"
EVENT_RESOLVED = "device.pair.resolved"

PairingReason = Literal["not-paired", "role-upgrade", "scope-upgrade"]

DEVICES_SCHEMA = StoreSchema(
    owner="kernel.devices",
    migrations=(
        """
        CREATE TABLE kernel_paired_devices (
            device_id TEXT PRIMARY KEY,
            public_key TEXT NOT NULL,
            display_name TEXT,
            platform TEXT,
            client_id TEXT,
            client_mode TEXT,
            role TEXT,
            roles TEXT NOT NULL,
            scopes TEXT NOT NULL,
            remote_ip TEXT,
            created_at_ms INTEGER NOT NULL,
            approved_at_ms INTEGER NOT NULL,
            last_seen_at_ms INTEGER
        );
        CREATE TABLE kernel_device_tokens (
            device_id TEXT NOT NULL
                REFERENCES kernel_paired_devices (device_id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            token_sha256 TEXT NOT NULL,
            scopes TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL,
            rotated_at_ms INTEGER,
            revoked_at_ms INTEGER,
            last_used_at_ms INTEGER,
            PRIMARY KEY (device_id, role)
        );
        CREATE TABLE kernel_pairing_requests (
            request_id TEXT PRIMARY KEY,
            device_id TEXT NOT NULL UNIQUE,
            public_key TEXT NOT NULL,
            display_name TEXT,
            platform TEXT,
            client_id TEXT,
            client_mode TEXT,
            role TEXT NOT NULL,
            scopes TEXT NOT NULL,
            remote_ip TEXT,
            is_repair INTEGER NOT NULL,
            reason TEXT NOT NULL,
            ts INTEGER NOT NULL
        );
        CREATE INDEX kernel_pairing_requests_by_ts ON kernel_pairing_requests (ts);
        """,
    ),
)


def new_device_token() -> str:
    """A fresh device token: 32 random bytes, base64url without padding."""
    raw = secrets.token_bytes(TOKEN_BYTES)
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def hash_token(token: str) -> str:
    """The form a device token is stored in: lowercase hex SHA-256 of its text.

    A plain hash is enough: the token is 256 random bits, so there is nothing to brute-force
    that a slow hash would protect.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _token_matches(presented: str, stored_sha256: str) -> bool:
    # Constant time over equal-length digests: the comparison leaks neither the stored hash
    # nor how much of it a guess got right.
    return hmac.compare_digest(hash_token(presented).encode(), stored_sha256.encode())


def _scope_list(scopes: Iterable[str]) -> list[str]:
    return sorted({scope for scope in scopes if scope})


def _dump(values: Iterable[str]) -> str:
    return json.dumps(_scope_list(values))


def _load(text: str | None) -> list[str]:
    return list(json.loads(text)) if text else []


@dataclass(frozen=True, slots=True)
class DeviceMeta:
    """What a connecting client says about itself; stored with its request and its record."""

    display_name: str | None = None
    platform: str | None = None
    client_id: str | None = None
    client_mode: str | None = None
    remote_ip: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A device token just minted; ``token`` exists only here, never in the store."""

    token: str
    role: str
    scopes: list[str]
    issued_at_ms: int


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The verdict on a device token presented in ``auth.token``.

    :ivar ok: the token is this device's live token for the role and covers the scopes.
    :ivar reason: which check failed (``device-token-not-paired``, ``device-token-no-token``,
        ``device-token-mismatch``, ``device-token-revoked``,
        ``device-token-scope-exceeded``).
    :ivar counts_as_failure: whether it looks like a guess and feeds the rate limiter; a
        real token that is revoked or asked for too much does not.
    :ivar has_token: the device holds a token record for the role, so the client presented
        ``auth.token`` as a device token rather than a mistyped shared secret.
    """

    ok: bool
    reason: str | None = None
    message: str | None = None
    counts_as_failure: bool = False
    has_token: bool = False
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of :meth:`DeviceRegistry.admit`.

    :ivar admitted: the device may go on; otherwise ``request`` holds the pending pairing
        request the client must wait for.
    :ivar token: a token minted for this connection, to show once in ``hello-ok``.
    :ivar token_revoked: the device's token for the role is revoked, so none was issued.
    """

    admitted: bool
    request: dict[str, Any] | None = None
    pairing_reason: PairingReason | None = None
    token: IssuedToken | None = None
    token_revoked: bool = False


def _request_payload(row: sqlite3.Row) -> dict[str, Any]:
    """A pending request as the wire shows it (``device.pair.requested``, ``.list``)."""
    payload: dict[str, Any] = {
        "requestId": row["request_id"],
        "deviceId": row["device_id"],
        "publicKey": row["public_key"],
        "role": row["role"],
        "roles": [row["role"]],
        "scopes": _load(row["scopes"]),
        "silent": False,
        "isRepair": bool(row["is_repair"]),
        "reason": row["reason"],
        "ts": row["ts"],
        "expiresAtMs": row["ts"] + PENDING_TTL_MS,
    }
    for column, key in (
        ("display_name", "displayName"),
        ("platform", "platform"),
        ("client_id", "clientId"),
        ("client_mode", "clientMode"),
        ("remote_ip", "remoteIp"),
    ):
        if row[column] is not None:
            payload[key] = row[column]
    return payload


def _token_summary(row: sqlite3.Row) -> dict[str, Any]:
    """A token record without its hash: what an operator may see."""
    summary: dict[str, Any] = {
        "role": row["role"],
        "scopes": _load(row["scopes"]),
        "createdAtMs": row["created_at_ms"],
    }
    for column, key in (
        ("rotated_at_ms", "rotatedAtMs"),
        ("revoked_at_ms", "revokedAtMs"),
        ("last_used_at_ms", "lastUsedAtMs"),
    ):
        if row[column] is not None:
            summary[key] = row[column]
    return summary


def _device_payload(row: sqlite3.Row, tokens: Sequence[sqlite3.Row] = ()) -> dict[str, Any]:
    """A paired device as an operator sees it: metadata and token summaries, no hashes."""
    payload: dict[str, Any] = {
        "deviceId": row["device_id"],
        "publicKey": row["public_key"],
        "roles": _load(row["roles"]),
        "scopes": _load(row["scopes"]),
        "createdAtMs": row["created_at_ms"],
        "approvedAtMs": row["approved_at_ms"],
    }
    for column, key in (
        ("display_name", "displayName"),
        ("platform", "platform"),
        ("client_id", "clientId"),
        ("client_mode", "clientMode"),
        ("role", "role"),
        ("remote_ip", "remoteIp"),
        ("last_seen_at_ms", "lastSeenAtMs"),
    ):
        if row[column] is not None:
            payload[key] = row[column]
    payload["tokens"] = [_token_summary(token) for token in tokens]
    return payload


class DeviceRegistry:
    """Paired devices, pending requests and device tokens on the kernel's store.

    :param store: the kernel's store, already migrated to ``DEVICES_SCHEMA``.
    :param now_ms: the wall clock in epoch milliseconds (``services.clock.now_ms``); pending
        expiry and every timestamp use it.
    :param emit: ``emit(event, payload)``, the event bus; ``None`` emits nothing.
    """

    def __init__(
        self,
        store: Store,
        now_ms: Callable[[], int],
        emit: Callable[[str, Any], object] | None = None,
        *,
        pending_ttl_ms: int = PENDING_TTL_MS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._store = store
        self._now_ms = now_ms
        self._emit = emit
        self.pending_ttl_ms = pending_ttl_ms
        self.max_pending = max_pending

    def _event(self, name: str, payload: dict[str, Any]) -> None:
        if self._emit is None:
            return
        try:
            self._emit(name, payload)
        except Exception:
            # A failed broadcast must not undo a committed pairing decision.
            logger.exception("could not emit %s", name)

    def _prune(self, db: sqlite3.Connection, now: int) -> None:
        db.execute(
            "DELETE FROM kernel_pairing_requests WHERE ts <= ?", (now - self.pending_ttl_ms,)
        )

    # -- the handshake's side ----------------------------------------------------------------

    async def verify_token(
        self, device_id: str, public_key: str, role: str, token: str, scopes: Sequence[str]
    ) -> TokenCheck:
        """Check a device token presented with a verified device block.

        The token must be the live one of this paired device (same public key) for ``role``,
        and cover every requested scope. On success its ``lastUsedAtMs`` is updated.
        """
        now = self._now_ms()
        requested = set(scopes)

        def work(db: sqlite3.Connection) -> TokenCheck:
            device = db.execute(
                "SELECT public_key FROM kernel_paired_devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if device is None or not hmac.compare_digest(device["public_key"], public_key):
                return TokenCheck(
                    False,
                    "device-token-not-paired",
                    "device token presented by a device that is not paired",
                    counts_as_failure=True,
                )
            row = db.execute(
                "SELECT * FROM kernel_device_tokens WHERE device_id = ? AND role = ?",
                (device_id, role),
            ).fetchone()
            if row is None:
                return TokenCheck(
                    False,
                    "device-token-no-token",
                    f"this device holds no device token for role {role}",
                    counts_as_failure=True,
                )
            if not _token_matches(token, row["token_sha256"]):
                return TokenCheck(
                    False,
                    "device-token-mismatch",
                    "device token mismatch (ask an operator to rotate it:"
                    " anima-gateway devices rotate DEVICE)",
                    counts_as_failure=True,
                    has_token=True,
                )
            if row["revoked_at_ms"] is not None:
                return TokenCheck(
                    False,
                    "device-token-revoked",
                    "device token revoked (an operator must rotate it before it works again)",
                    has_token=True,
                )
            granted = set(_load(row["scopes"]))
            beyond = sorted(requested - granted)
            if beyond:
                return TokenCheck(
                    False,
                    "device-token-scope-exceeded",
                    f"device token does not cover {', '.join(beyond)}; connect with the"
                    " shared secret to ask for more (the request goes to pairing)",
                    has_token=True,
                )
            db.execute(
                "UPDATE kernel_device_tokens SET last_used_at_ms = ?"
                " WHERE device_id = ? AND role = ?",
                (now, device_id, role),
            )
            return TokenCheck(True, has_token=True, scopes=tuple(sorted(granted)))

        return await self._store.run(work)

    async def admit(
        self,
        *,
        device_id: str,
        public_key: str,
        role: str,
        scopes: Sequence[str],
        meta: DeviceMeta,
        is_local: bool,
        by_device_token: bool,
    ) -> Admission:
        """Decide, for an authenticated connection with a verified device, whether it is in.

        A device is in when it is paired with this public key, approved for ``role`` and for
        every requested scope. Otherwise it needs pairing: a local connection (which holds
        the shared secret) is approved on the spot; a remote one gets a pending request, the
        existing one when the device already has one (one per device). An admitted device
        that authenticated otherwise than by its token and holds no token for ``role`` gets
        a new one, to be shown once; a revoked token is not replaced (sticky revocation).
        """
        now = self._now_ms()
        wanted = _scope_list(scopes)
        silent_request_id = str(uuid.uuid4())

        def work(db: sqlite3.Connection) -> tuple[Admission, dict[str, Any] | None, bool]:
            self._prune(db, now)
            row = db.execute(
                "SELECT * FROM kernel_paired_devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            reason = _pairing_reason(row, public_key, role, wanted)
            resolved: dict[str, Any] | None = None
            if reason is not None and not is_local:
                request, created = self._pending_for(
                    db, now, device_id, public_key, role, wanted, meta, row is not None, reason
                )
                return Admission(False, request=request, pairing_reason=reason), request, created
            if reason is not None:
                _approve_into(db, now, device_id, public_key, role, wanted, meta)
                resolved = {
                    "requestId": silent_request_id,
                    "deviceId": device_id,
                    "decision": "approved",
                    "silent": True,
                    "ts": now,
                }
            else:
                _touch(db, now, device_id, role, meta)
            issued, revoked = (None, False)
            if not by_device_token:
                issued, revoked = _ensure_token(db, now, device_id, role)
            return Admission(True, token=issued, token_revoked=revoked), resolved, False

        admission, event_payload, created = await self._store.run(work)
        if not admission.admitted:
            if created and event_payload is not None:
                logger.info(
                    "pairing requested",
                    extra={"deviceId": device_id, "requestId": event_payload["requestId"]},
                )
                self._event(EVENT_REQUESTED, event_payload)
        elif event_payload is not None:
            logger.info("device paired locally", extra={"deviceId": device_id, "role": role})
            self._event(EVENT_RESOLVED, event_payload)
        return admission

    def _pending_for(
        self,
        db: sqlite3.Connection,
        now: int,
        device_id: str,
        public_key: str,
        role: str,
        scopes: list[str],
        meta: DeviceMeta,
        is_repair: bool,
        reason: PairingReason,
    ) -> tuple[dict[str, Any], bool]:
        existing = db.execute(
            "SELECT * FROM kernel_pairing_requests WHERE device_id = ?", (device_id,)
        ).fetchone()
        if existing is not None:
            # One request per device: the operator decides on the one already shown.
            return _request_payload(existing), False
        (waiting,) = db.execute("SELECT count(*) FROM kernel_pairing_requests").fetchone()
        if waiting >= self.max_pending:
            raise unavailable(
                "too many pairing requests are waiting; try again in a few minutes",
                details={"authReason": "pairing-queue-full"},
            )
        request_id = str(uuid.uuid4())
        db.execute(
            "INSERT INTO kernel_pairing_requests (request_id, device_id, public_key,"
            " display_name, platform, client_id, client_mode, role, scopes, remote_ip,"
            " is_repair, reason, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                request_id,
                device_id,
                public_key,
                meta.display_name,
                meta.platform,
                meta.client_id,
                meta.client_mode,
                role,
                _dump(scopes),
                meta.remote_ip,
                int(is_repair),
                reason,
                now,
            ),
        )
        row = db.execute(
            "SELECT * FROM kernel_pairing_requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        return _request_payload(row), True

    async def discard_token(self, device_id: str, role: str, token: str) -> bool:
        """Forget a token that was minted but never delivered, if it is still the current one.

        :returns: whether a token was forgotten; the next connect of the device mints anew.
        """

        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "DELETE FROM kernel_device_tokens"
                " WHERE device_id = ? AND role = ? AND token_sha256 = ?",
                (device_id, role, hash_token(token)),
            )
            return cursor.rowcount > 0

        return await self._store.run(work)

    # -- the operator's side -----------------------------------------------------------------

    async def list_devices(self, *, limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        """Pending requests (newest first) and paired devices (by id, from ``cursor``).

        :returns: ``{"pending": [...], "paired": [...], "nextCursor"?: str}``; token
            summaries carry no hashes.
        """
        now = self._now_ms()

        def work(db: sqlite3.Connection) -> dict[str, Any]:
            self._prune(db, now)
            pending = db.execute(
                "SELECT * FROM kernel_pairing_requests ORDER BY ts DESC, request_id LIMIT ?",
                (limit,),
            ).fetchall()
            devices = db.execute(
                "SELECT * FROM kernel_paired_devices WHERE device_id > ?"
                " ORDER BY device_id LIMIT ?",
                (cursor or "", limit + 1),
            ).fetchall()
            more = len(devices) > limit
            devices = devices[:limit]
            paired = [_device_payload(row, _tokens_of(db, row["device_id"])) for row in devices]
            result: dict[str, Any] = {
                "pending": [_request_payload(row) for row in pending],
                "paired": paired,
            }
            if more:
                result["nextCursor"] = devices[-1]["device_id"]
            return result

        return await self._store.run(work)

    async def get(self, device_id: str) -> dict[str, Any] | None:
        """One paired device as an operator sees it, or ``None``."""

        def work(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute(
                "SELECT * FROM kernel_paired_devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            return None if row is None else _device_payload(row, _tokens_of(db, device_id))

        return await self._store.run(work)

    async def approve(self, request_id: str) -> dict[str, Any]:
        """Approve a pending request: the device is paired for its role and scopes.

        Roles and scopes are added to what the device already had. A live token for the
        role is widened to the approved scopes (the device keeps using it); a device without
        one gets its token on its next connect. A revoked token stays revoked.

        :raises GatewayError: 404 for an unknown or expired ``request_id``.
        """
        now = self._now_ms()

        def work(db: sqlite3.Connection) -> dict[str, Any]:
            self._prune(db, now)
            request = _pending_or_404(db, request_id)
            meta = DeviceMeta(
                display_name=request["display_name"],
                platform=request["platform"],
                client_id=request["client_id"],
                client_mode=request["client_mode"],
                remote_ip=request["remote_ip"],
            )
            _approve_into(
                db,
                now,
                request["device_id"],
                request["public_key"],
                request["role"],
                _load(request["scopes"]),
                meta,
            )
            db.execute("DELETE FROM kernel_pairing_requests WHERE request_id = ?", (request_id,))
            device = db.execute(
                "SELECT * FROM kernel_paired_devices WHERE device_id = ?", (request["device_id"],)
            ).fetchone()
            return _device_payload(device, _tokens_of(db, request["device_id"]))

        device = await self._store.run(work)
        logger.info("pairing approved", extra={"requestId": request_id})
        self._event(
            EVENT_RESOLVED,
            {
                "requestId": request_id,
                "deviceId": device["deviceId"],
                "decision": "approved",
                "ts": now,
            },
        )
        return {"requestId": request_id, "device": device}

    async def reject(self, request_id: str) -> dict[str, Any]:
        """Reject a pending request; the device stays as it was (unpaired, or paired as before).

        :raises GatewayError: 404 for an unknown or expired ``request_id``.
        """
        now = self._now_ms()

        def work(db: sqlite3.Connection) -> str:
            self._prune(db, now)
            request = _pending_or_404(db, request_id)
            db.execute("DELETE FROM kernel_pairing_requests WHERE request_id = ?", (request_id,))
            return str(request["device_id"])

        device_id = await self._store.run(work)
        logger.info("pairing rejected", extra={"requestId": request_id})
        self._event(
            EVENT_RESOLVED,
            {"requestId": request_id, "deviceId": device_id, "decision": "rejected", "ts": now},
        )
        return {"requestId": request_id, "deviceId": device_id}

    async def rotate(
        self, device_id: str, role: str, scopes: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Mint a new token for ``device_id`` and ``role``, replacing (and un-revoking) the old.

        ``scopes`` defaults to the old token's, else to the device's approved scopes. It may
        only narrow: a scope the device was not approved for is refused (403), because
        widening a device's access is what pairing is for.

        :returns: ``{deviceId, role, token, scopes, rotatedAtMs}``; the token is shown here
            once and only its hash is kept.
        :raises GatewayError: 404 when the device is not paired or not approved for ``role``;
            403 when ``scopes`` asks for more than the device was approved for.
        """
        now = self._now_ms()
        token = new_device_token()

        def work(db: sqlite3.Connection) -> list[str]:
            device = _device_or_404(db, device_id)
            if role not in _load(device["roles"]):
                raise not_found(
                    f"unknown deviceId/role: device {device_id} is not approved for role {role}",
                    details={"deviceId": device_id, "role": role},
                )
            approved = set(_load(device["scopes"]))
            old = db.execute(
                "SELECT * FROM kernel_device_tokens WHERE device_id = ? AND role = ?",
                (device_id, role),
            ).fetchone()
            if scopes is not None:
                granted = _scope_list(scopes)
            elif old is not None:
                granted = _load(old["scopes"])
            else:
                granted = sorted(approved)
            beyond = sorted(set(granted) - approved)
            if beyond:
                raise forbidden(
                    f"device.token.rotate may only narrow scopes: device {device_id} was not"
                    f" approved for {', '.join(beyond)} (widening goes through pairing)",
                    details={"deviceId": device_id, "notApproved": beyond},
                )
            _store_token(db, now, device_id, role, token, granted, old)
            return granted

        granted = await self._store.run(work)
        logger.info("device token rotated", extra={"deviceId": device_id, "role": role})
        return {
            "deviceId": device_id,
            "role": role,
            "token": token,
            "scopes": granted,
            "rotatedAtMs": now,
        }

    async def revoke(self, device_id: str, role: str) -> dict[str, Any]:
        """Revoke the device's token for ``role``; it stays revoked until a rotate.

        Revoking an already revoked token changes nothing and reports the first revocation.

        :raises GatewayError: 404 when the device holds no token for ``role``.
        """
        now = self._now_ms()

        def work(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT revoked_at_ms FROM kernel_device_tokens WHERE device_id = ? AND role = ?",
                (device_id, role),
            ).fetchone()
            if row is None:
                raise not_found(
                    f"unknown deviceId/role: device {device_id} holds no token for role {role}",
                    details={"deviceId": device_id, "role": role},
                )
            if row["revoked_at_ms"] is not None:
                return int(row["revoked_at_ms"])
            db.execute(
                "UPDATE kernel_device_tokens SET revoked_at_ms = ?"
                " WHERE device_id = ? AND role = ?",
                (now, device_id, role),
            )
            return now

        revoked_at = await self._store.run(work)
        logger.info("device token revoked", extra={"deviceId": device_id, "role": role})
        return {"deviceId": device_id, "role": role, "revokedAtMs": revoked_at}


# -- SQL helpers, each run inside a caller's transaction --------------------------------------


def _pairing_reason(
    row: sqlite3.Row | None, public_key: str, role: str, scopes: Sequence[str]
) -> PairingReason | None:
    """Why this device needs pairing before it may connect as asked, or ``None``."""
    if row is None or not hmac.compare_digest(row["public_key"], public_key):
        return "not-paired"
    if role not in _load(row["roles"]):
        return "role-upgrade"
    if not set(scopes) <= set(_load(row["scopes"])):
        return "scope-upgrade"
    return None


def _tokens_of(db: sqlite3.Connection, device_id: str) -> list[sqlite3.Row]:
    return db.execute(
        "SELECT * FROM kernel_device_tokens WHERE device_id = ? ORDER BY role", (device_id,)
    ).fetchall()


def _pending_or_404(db: sqlite3.Connection, request_id: str) -> sqlite3.Row:
    row = db.execute(
        "SELECT * FROM kernel_pairing_requests WHERE request_id = ?", (request_id,)
    ).fetchone()
    if row is None:
        raise not_found(
            f"unknown requestId: {request_id} (no such pending request, or it expired)",
            details={"requestId": request_id},
        )
    return row


def _device_or_404(db: sqlite3.Connection, device_id: str) -> sqlite3.Row:
    row = db.execute(
        "SELECT * FROM kernel_paired_devices WHERE device_id = ?", (device_id,)
    ).fetchone()
    if row is None:
        raise not_found(
            f"unknown deviceId/role: device {device_id} is not paired",
            details={"deviceId": device_id},
        )
    return row


def _approve_into(
    db: sqlite3.Connection,
    now: int,
    device_id: str,
    public_key: str,
    role: str,
    scopes: Sequence[str],
    meta: DeviceMeta,
) -> None:
    """Pair the device for ``role`` and ``scopes``, adding to what it already had."""
    row = db.execute(
        "SELECT * FROM kernel_paired_devices WHERE device_id = ?", (device_id,)
    ).fetchone()
    if row is not None and not hmac.compare_digest(row["public_key"], public_key):
        # The id is the key's hash, so this means the row was written by something else;
        # start over rather than keep tokens that belonged to another key.
        db.execute("DELETE FROM kernel_paired_devices WHERE device_id = ?", (device_id,))
        row = None
    if row is None:
        db.execute(
            "INSERT INTO kernel_paired_devices (device_id, public_key, display_name, platform,"
            " client_id, client_mode, role, roles, scopes, remote_ip, created_at_ms,"
            " approved_at_ms, last_seen_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device_id,
                public_key,
                meta.display_name,
                meta.platform,
                meta.client_id,
                meta.client_mode,
                role,
                _dump([role]),
                _dump(scopes),
                meta.remote_ip,
                now,
                now,
                now,
            ),
        )
    else:
        db.execute(
            "UPDATE kernel_paired_devices SET roles = ?, scopes = ?, approved_at_ms = ?"
            " WHERE device_id = ?",
            (
                _dump([*_load(row["roles"]), role]),
                _dump([*_load(row["scopes"]), *scopes]),
                now,
                device_id,
            ),
        )
        _touch(db, now, device_id, role, meta)
    token = db.execute(
        "SELECT scopes FROM kernel_device_tokens"
        " WHERE device_id = ? AND role = ? AND revoked_at_ms IS NULL",
        (device_id, role),
    ).fetchone()
    if token is not None:
        db.execute(
            "UPDATE kernel_device_tokens SET scopes = ? WHERE device_id = ? AND role = ?",
            (_dump([*_load(token["scopes"]), *scopes]), device_id, role),
        )


def _touch(db: sqlite3.Connection, now: int, device_id: str, role: str, meta: DeviceMeta) -> None:
    """Record what a paired device said about itself on this connect."""
    db.execute(
        "UPDATE kernel_paired_devices SET display_name = coalesce(?, display_name),"
        " platform = coalesce(?, platform), client_id = coalesce(?, client_id),"
        " client_mode = coalesce(?, client_mode), role = ?,"
        " remote_ip = coalesce(?, remote_ip), last_seen_at_ms = ? WHERE device_id = ?",
        (
            meta.display_name,
            meta.platform,
            meta.client_id,
            meta.client_mode,
            role,
            meta.remote_ip,
            now,
            device_id,
        ),
    )


def _ensure_token(
    db: sqlite3.Connection, now: int, device_id: str, role: str
) -> tuple[IssuedToken | None, bool]:
    """Mint the device's token for ``role`` if it holds none; never replace a revoked one."""
    row = db.execute(
        "SELECT * FROM kernel_device_tokens WHERE device_id = ? AND role = ?", (device_id, role)
    ).fetchone()
    if row is not None:
        return None, row["revoked_at_ms"] is not None
    device = db.execute(
        "SELECT scopes FROM kernel_paired_devices WHERE device_id = ?", (device_id,)
    ).fetchone()
    scopes = _load(device["scopes"])
    token = new_device_token()
    _store_token(db, now, device_id, role, token, scopes, None)
    return IssuedToken(token=token, role=role, scopes=scopes, issued_at_ms=now), False


def _store_token(
    db: sqlite3.Connection,
    now: int,
    device_id: str,
    role: str,
    token: str,
    scopes: Sequence[str],
    old: sqlite3.Row | None,
) -> None:
    if old is None:
        db.execute(
            "INSERT INTO kernel_device_tokens (device_id, role, token_sha256, scopes,"
            " created_at_ms) VALUES (?, ?, ?, ?, ?)",
            (device_id, role, hash_token(token), _dump(scopes), now),
        )
    else:
        db.execute(
            "UPDATE kernel_device_tokens SET token_sha256 = ?, scopes = ?, rotated_at_ms = ?,"
            " revoked_at_ms = NULL, last_used_at_ms = NULL WHERE device_id = ? AND role = ?",
            (hash_token(token), _dump(scopes), now, device_id, role),
        )
