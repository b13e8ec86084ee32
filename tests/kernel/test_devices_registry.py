"""The kernel's device registry on a real SQLite store, with a clock the test moves by hand.

Covers what the handshake tests cannot see from the wire: that only token hashes reach the
database, one pending request per device, the 5-minute expiry to the millisecond, narrow-only
rotation, sticky revocation, and which decisions emit which events.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kernel import GatewayError, Store
from kernel.devices import (
    DEVICES_SCHEMA,
    PENDING_TTL_MS,
    DeviceMeta,
    DeviceRegistry,
    hash_token,
    new_device_token,
)

READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"
START_MS = 1_700_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = START_MS

    def __call__(self) -> int:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, payload: dict[str, Any]) -> None:
        self.events.append((name, payload))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(tmp_path / "gateway.sqlite3")
    await store.open()
    await store.migrate(DEVICES_SCHEMA.owner, DEVICES_SCHEMA.migrations)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> Recorder:
    return Recorder()


@pytest.fixture
def registry(store: Store, clock: FakeClock, events: Recorder) -> DeviceRegistry:
    return DeviceRegistry(store, clock, events)


def device(n: int) -> tuple[str, str]:
    """A device id and public key pair; the registry trusts the handshake to have checked
    that one derives from the other."""
    key = f"key-{n}"
    return hashlib.sha256(key.encode()).hexdigest(), key


async def admit(
    registry: DeviceRegistry,
    n: int,
    *,
    scopes: list[str] | None = None,
    role: str = "operator",
    local: bool,
    by_device_token: bool = False,
) -> Any:
    device_id, public_key = device(n)
    return await registry.admit(
        device_id=device_id,
        public_key=public_key,
        role=role,
        scopes=scopes if scopes is not None else [READ],
        meta=DeviceMeta(display_name=f"device {n}", platform="test", remote_ip="203.0.113.4"),
        is_local=local,
        by_device_token=by_device_token,
    )


async def pair_remotely(registry: DeviceRegistry, n: int, scopes: list[str]) -> str:
    pending = await admit(registry, n, scopes=scopes, local=False)
    assert not pending.admitted
    await registry.approve(pending.request["requestId"])
    admitted = await admit(registry, n, scopes=scopes, local=False)
    assert admitted.admitted and admitted.token is not None
    return admitted.token.token


def test_device_tokens_are_32_random_bytes_in_base64url() -> None:
    tokens = {new_device_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(len(t) == 43 and "=" not in t and "+" not in t and "/" not in t for t in tokens)
    token = tokens.pop()
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()


async def test_only_the_hash_of_a_token_is_stored(
    registry: DeviceRegistry, store: Store, tmp_path: Path
) -> None:
    token = (await admit(registry, 1, local=True)).token.token
    rotated = (await registry.rotate(device(1)[0], "operator"))["token"]

    def rows(db: sqlite3.Connection) -> list[sqlite3.Row]:
        return db.execute("SELECT * FROM kernel_device_tokens").fetchall()

    (row,) = await store.run(rows)
    assert row["token_sha256"] == hash_token(rotated)
    await store.aclose()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for secret in (token, rotated):
        assert secret.encode() not in raw
    assert hash_token(rotated).encode() in raw
    await store.open()


async def test_the_schema_is_versioned_and_migrating_again_changes_nothing(store: Store) -> None:
    assert await store.migrate(DEVICES_SCHEMA.owner, DEVICES_SCHEMA.migrations) == 1

    def version(db: sqlite3.Connection) -> int:
        return db.execute(
            "SELECT version FROM schema_versions WHERE owner = ?", (DEVICES_SCHEMA.owner,)
        ).fetchone()[0]

    assert await store.run(version) == 1


async def test_a_local_device_is_paired_on_the_spot_and_gets_a_token(
    registry: DeviceRegistry, events: Recorder
) -> None:
    admission = await admit(registry, 1, scopes=[WRITE, READ, READ], local=True)
    assert admission.admitted
    assert admission.token.scopes == [READ, WRITE]
    assert events.names() == ["device.pair.resolved"]
    assert events.events[0][1]["decision"] == "approved"

    device_id = device(1)[0]
    check = await registry.verify_token(
        device_id, device(1)[1], "operator", admission.token.token, [READ]
    )
    assert check.ok
    listed = await registry.get(device_id)
    assert listed["roles"] == ["operator"] and listed["scopes"] == [READ, WRITE]
    assert listed["tokens"][0]["lastUsedAtMs"] == START_MS
    assert "remoteIp" in listed and "token" not in listed["tokens"][0]


async def test_a_remote_device_waits_with_one_request_and_one_event(
    registry: DeviceRegistry, events: Recorder, clock: FakeClock
) -> None:
    first = await admit(registry, 1, local=False)
    assert not first.admitted and first.pairing_reason == "not-paired"
    again = await admit(registry, 1, scopes=[ADMIN], local=False)
    assert again.request["requestId"] == first.request["requestId"]
    assert again.request["scopes"] == [READ]  # the request the operator saw, unchanged
    assert events.names() == ["device.pair.requested"]
    payload = events.events[0][1]
    assert payload["deviceId"] == device(1)[0]
    assert payload["displayName"] == "device 1"
    assert payload["expiresAtMs"] == START_MS + PENDING_TTL_MS

    clock.now += 1
    other = await admit(registry, 2, local=False)
    assert other.request["requestId"] != first.request["requestId"]
    listing = await registry.list_devices()
    assert [r["deviceId"] for r in listing["pending"]] == [device(2)[0], device(1)[0]]  # newest
    assert listing["paired"] == []


async def test_pending_requests_expire_after_exactly_five_minutes(
    registry: DeviceRegistry, clock: FakeClock
) -> None:
    first = await admit(registry, 1, local=False)
    request_id = first.request["requestId"]
    clock.now += PENDING_TTL_MS - 1
    assert len((await registry.list_devices())["pending"]) == 1
    clock.now += 1
    assert (await registry.list_devices())["pending"] == []
    for decide in (registry.approve, registry.reject):
        with pytest.raises(GatewayError) as refused:
            await decide(request_id)
        assert refused.value.code == 404
    renewed = await admit(registry, 1, local=False)
    assert renewed.request["requestId"] != request_id


async def test_approve_and_reject_resolve_once_and_unknown_ids_are_404(
    registry: DeviceRegistry, events: Recorder
) -> None:
    request_id = (await admit(registry, 1, local=False)).request["requestId"]
    approved = await registry.approve(request_id)
    assert approved["device"]["deviceId"] == device(1)[0]
    assert approved["device"]["tokens"] == []  # its token comes on its next connect
    with pytest.raises(GatewayError) as again:
        await registry.approve(request_id)
    assert again.value.code == 404 and "unknown requestId" in again.value.message

    rejected_id = (await admit(registry, 2, local=False)).request["requestId"]
    assert await registry.reject(rejected_id) == {
        "requestId": rejected_id,
        "deviceId": device(2)[0],
    }
    assert not (await admit(registry, 2, local=False)).admitted  # still not paired
    with pytest.raises(GatewayError) as unknown:
        await registry.reject("no-such-request")
    assert unknown.value.code == 404
    decisions = [p["decision"] for name, p in events.events if name == "device.pair.resolved"]
    assert decisions == ["approved", "rejected"]


async def test_upgrades_need_pairing_and_approval_widens_the_live_token(
    registry: DeviceRegistry,
) -> None:
    token = await pair_remotely(registry, 1, [READ])
    device_id, public_key = device(1)
    upgrade = await admit(registry, 1, scopes=[READ, WRITE], local=False)
    assert upgrade.pairing_reason == "scope-upgrade"
    assert upgrade.request["isRepair"] is True
    await registry.approve(upgrade.request["requestId"])
    widened = await registry.verify_token(device_id, public_key, "operator", token, [READ, WRITE])
    assert widened.ok

    node = await admit(registry, 1, scopes=[], role="node", local=False)
    assert node.pairing_reason == "role-upgrade"


async def test_verify_token_names_each_failure(registry: DeviceRegistry) -> None:
    token = await pair_remotely(registry, 1, [READ])
    device_id, public_key = device(1)

    async def reason(**changes: Any) -> tuple[str | None, bool]:
        args = {
            "device_id": device_id,
            "public_key": public_key,
            "role": "operator",
            "token": token,
            "scopes": [READ],
        } | changes
        check = await registry.verify_token(**args)
        return check.reason, check.counts_as_failure

    assert await reason() == (None, False)
    assert await reason(device_id=device(2)[0]) == ("device-token-not-paired", True)
    assert await reason(public_key="another key") == ("device-token-not-paired", True)
    assert await reason(role="node") == ("device-token-no-token", True)
    assert await reason(token=new_device_token()) == ("device-token-mismatch", True)
    assert await reason(scopes=[READ, ADMIN]) == ("device-token-scope-exceeded", False)
    await registry.revoke(device_id, "operator")
    assert await reason() == ("device-token-revoked", False)
    # A wrong token is a mismatch whether or not the real one is revoked.
    assert await reason(token=new_device_token()) == ("device-token-mismatch", True)


async def test_revocation_is_sticky_until_an_operator_rotates(
    registry: DeviceRegistry, clock: FakeClock
) -> None:
    token = await pair_remotely(registry, 1, [READ, WRITE])
    device_id, public_key = device(1)
    clock.now += 10
    revoked = await registry.revoke(device_id, "operator")
    assert revoked == {"deviceId": device_id, "role": "operator", "revokedAtMs": clock.now}
    clock.now += 10
    assert (await registry.revoke(device_id, "operator"))["revokedAtMs"] == revoked["revokedAtMs"]

    for local in (False, True):
        again = await admit(registry, 1, scopes=[READ], local=local)
        assert again.admitted and again.token is None and again.token_revoked

    rotated = await registry.rotate(device_id, "operator")
    assert rotated["scopes"] == [READ, WRITE]  # the old token's scopes
    assert rotated["token"] != token
    assert (await registry.verify_token(device_id, public_key, "operator", rotated["token"], [])).ok
    summary = (await registry.get(device_id))["tokens"][0]
    assert "revokedAtMs" not in summary and summary["rotatedAtMs"] == clock.now


async def test_rotate_may_only_narrow(registry: DeviceRegistry) -> None:
    await pair_remotely(registry, 1, [READ, WRITE])
    device_id, public_key = device(1)
    narrowed = await registry.rotate(device_id, "operator", [READ])
    assert narrowed["scopes"] == [READ]
    check = await registry.verify_token(
        device_id, public_key, "operator", narrowed["token"], [WRITE]
    )
    assert check.reason == "device-token-scope-exceeded"
    # Back up to what was approved is still narrowing relative to the approval.
    assert (await registry.rotate(device_id, "operator", [WRITE, READ]))["scopes"] == [READ, WRITE]

    with pytest.raises(GatewayError) as broadened:
        await registry.rotate(device_id, "operator", [READ, ADMIN])
    assert broadened.value.code == 403
    assert "may only narrow" in broadened.value.message and ADMIN in broadened.value.message
    assert broadened.value.details["notApproved"] == [ADMIN]
    device_after = await registry.get(device_id)
    assert device_after["scopes"] == [READ, WRITE]  # nothing was widened

    with pytest.raises(GatewayError) as unknown_device:
        await registry.rotate(device(9)[0], "operator")
    assert unknown_device.value.code == 404
    with pytest.raises(GatewayError) as unknown_role:
        await registry.rotate(device_id, "node")
    assert unknown_role.value.code == 404 and "role node" in unknown_role.value.message
    with pytest.raises(GatewayError) as no_token:
        await registry.revoke(device(9)[0], "operator")
    assert no_token.value.code == 404


async def test_a_device_token_connect_mints_nothing(registry: DeviceRegistry) -> None:
    await pair_remotely(registry, 1, [READ])
    again = await admit(registry, 1, local=False, by_device_token=True)
    assert again.admitted and again.token is None and not again.token_revoked


async def test_the_pending_queue_is_bounded(store: Store, clock: FakeClock) -> None:
    registry = DeviceRegistry(store, clock, None, max_pending=2)
    await admit(registry, 1, local=False)
    await admit(registry, 2, local=False)
    with pytest.raises(GatewayError) as full:
        await admit(registry, 3, local=False)
    assert full.value.code == 503
    assert (await admit(registry, 1, local=False)).request is not None  # its own still works
    clock.now += PENDING_TTL_MS
    assert not (await admit(registry, 3, local=False)).admitted


async def test_paired_devices_are_listed_in_pages(registry: DeviceRegistry) -> None:
    for n in range(5):
        await admit(registry, n, local=True)
    seen: list[str] = []
    cursor = None
    while True:
        page = await registry.list_devices(limit=2, cursor=cursor)
        seen.extend(d["deviceId"] for d in page["paired"])
        cursor = page.get("nextCursor")
        if cursor is None:
            break
    assert seen == sorted(device(n)[0] for n in range(5))


async def test_an_undelivered_token_is_discarded_and_minted_again(
    registry: DeviceRegistry,
) -> None:
    first = (await admit(registry, 1, local=True)).token
    device_id = device(1)[0]
    assert not await registry.discard_token(device_id, "operator", new_device_token())
    assert (await admit(registry, 1, local=True)).token is None  # still holds the first
    assert await registry.discard_token(device_id, "operator", first.token)
    second = (await admit(registry, 1, local=True)).token
    assert second is not None and second.token != first.token
