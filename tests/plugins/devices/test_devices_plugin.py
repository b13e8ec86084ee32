"""The devices plugin's methods over a real socket: scopes, params, answers, events, errors."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import trio
from devices_support import Admit, Device
from trio_websocket import ConnectionClosed

from kernel import Gateway, GatewayClient, GatewayError, open_client, open_gateway
from kernel.device_identity import sign_device_proof
from plugins.devices import DevicesPlugin

READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"
METHODS = [
    ("device.pair.list", {}),
    ("device.pair.approve", {"requestId": "r"}),
    ("device.pair.reject", {"requestId": "r"}),
    ("device.token.rotate", {"deviceId": "d", "role": "operator"}),
    ("device.token.revoke", {"deviceId": "d", "role": "operator"}),
]


def test_the_plugin_is_registered_as_an_entry_point() -> None:
    (entry,) = [e for e in metadata.entry_points(group="anima.plugins") if e.name == "devices"]
    assert entry.value == "plugins.devices:DevicesPlugin"
    assert entry.load() is DevicesPlugin


async def test_every_method_needs_the_pairing_scope(gateway: Gateway, url: str) -> None:
    async with open_client(url, token=gateway.auth.token, scopes=[READ, WRITE]) as client:
        assert not [m for m in client.hello["features"]["methods"] if m.startswith("device.")]
        assert not [e for e in client.hello["features"]["events"] if e.startswith("device.")]
        for method, params in METHODS:
            with pytest.raises(GatewayError) as refused:
                await client.call(method, params)
            assert refused.value.code == 403
            assert "operator.pairing" in refused.value.message
    async with open_client(url, token=gateway.auth.token, scopes=[ADMIN]) as admin:
        assert {m for m, _ in METHODS} <= set(admin.hello["features"]["methods"])
        assert {"device.pair.requested", "device.pair.resolved"} <= set(
            admin.hello["features"]["events"]
        )
        assert (await admin.call("device.pair.list"))["pending"] == []


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("device.pair.approve", {}, "requestId"),
        ("device.pair.approve", {"requestId": ""}, "requestId"),
        ("device.pair.reject", {"requestId": 7}, "requestId"),
        ("device.pair.list", {"limit": 0}, "limit"),
        ("device.pair.list", {"limit": 1001}, "limit"),
        ("device.pair.list", {"since": 1}, "since"),
        ("device.token.rotate", {"deviceId": "d"}, "role"),
        ("device.token.rotate", {"deviceId": "d", "role": "operator", "scopes": [""]}, "scopes.0"),
        ("device.token.revoke", {"role": "operator"}, "deviceId"),
    ],
)
async def test_bad_params_are_400_naming_the_field(
    operator: GatewayClient, method: str, params: dict[str, Any], field: str
) -> None:
    with pytest.raises(GatewayError) as refused:
        await operator.call(method, params)
    assert refused.value.code == 400
    assert refused.value.details == {"field": field}


async def test_list_shows_requests_and_devices_without_secrets(
    operator: GatewayClient, admit: Admit
) -> None:
    waiting, paired = Device(), Device()
    request = (await admit(waiting, local=False)).request
    token = (await admit(paired, local=True, scopes=[READ, WRITE])).token.token

    listing = await operator.call("device.pair.list")
    (pending,) = listing["pending"]
    assert pending["requestId"] == request["requestId"]
    assert pending["deviceId"] == waiting.device_id
    assert pending["displayName"] == "Test phone"
    assert pending["remoteIp"] == "198.51.100.7"
    (device,) = listing["paired"]
    assert device["deviceId"] == paired.device_id
    assert device["roles"] == ["operator"] and device["scopes"] == [READ, WRITE]
    (summary,) = device["tokens"]
    assert summary["role"] == "operator" and summary["scopes"] == [READ, WRITE]
    text = json.dumps(listing)
    assert token not in text and "sha256" not in text.lower() and '"token"' not in text


async def test_approve_pairs_the_device_and_tells_pairing_operators(
    gateway: Gateway, operator: GatewayClient, admit: Admit
) -> None:
    device = Device()
    request_id = (await admit(device, local=False, scopes=[READ])).request["requestId"]
    requested = await operator.next_event("device.pair.requested")
    assert requested["payload"]["requestId"] == request_id

    answer = await operator.call("device.pair.approve", {"requestId": request_id})
    assert answer["requestId"] == request_id
    assert answer["device"]["deviceId"] == device.device_id
    assert answer["device"]["scopes"] == [READ]
    resolved = await operator.next_event("device.pair.resolved")
    assert resolved["payload"]["decision"] == "approved"
    assert resolved["payload"]["requestId"] == request_id

    admitted = await admit(device, local=False, scopes=[READ])
    assert admitted.admitted and admitted.token is not None

    with pytest.raises(GatewayError) as again:
        await operator.call("device.pair.approve", {"requestId": request_id})
    assert again.value.code == 404
    assert again.value.reason == "NOT_FOUND"
    assert "unknown requestId" in again.value.message


async def test_reject_leaves_the_device_unpaired(operator: GatewayClient, admit: Admit) -> None:
    device = Device()
    request_id = (await admit(device, local=False)).request["requestId"]
    answer = await operator.call("device.pair.reject", {"requestId": request_id})
    assert answer == {"requestId": request_id, "deviceId": device.device_id}
    resolved = await operator.next_event("device.pair.resolved")
    assert resolved["payload"]["decision"] == "rejected"
    assert (await operator.call("device.pair.list"))["paired"] == []
    with pytest.raises(GatewayError) as unknown:
        await operator.call("device.pair.reject", {"requestId": "never-made"})
    assert unknown.value.code == 404


async def test_rotate_narrows_and_refuses_to_broaden(operator: GatewayClient, admit: Admit) -> None:
    device = Device()
    await admit(device, local=True, scopes=[READ, WRITE])
    narrowed = await operator.call(
        "device.token.rotate", {"deviceId": device.device_id, "role": "operator", "scopes": [READ]}
    )
    assert narrowed["scopes"] == [READ] and len(narrowed["token"]) == 43
    with pytest.raises(GatewayError) as broadened:
        await operator.call(
            "device.token.rotate",
            {"deviceId": device.device_id, "role": "operator", "scopes": [READ, ADMIN]},
        )
    assert broadened.value.code == 403
    assert "may only narrow" in broadened.value.message
    assert broadened.value.details["notApproved"] == [ADMIN]
    device_now = (await operator.call("device.pair.list"))["paired"][0]
    assert device_now["scopes"] == [READ, WRITE]
    assert device_now["tokens"][0]["scopes"] == [READ]

    for params in (
        {"deviceId": "f" * 64, "role": "operator"},
        {"deviceId": device.device_id, "role": "node"},
    ):
        with pytest.raises(GatewayError) as unknown:
            await operator.call("device.token.rotate", params)
        assert unknown.value.code == 404
        assert "unknown deviceId/role" in unknown.value.message


async def test_revoke_cuts_off_sessions_signed_in_with_the_token(
    gateway: Gateway, url: str, operator: GatewayClient, admit: Admit
) -> None:
    device = Device()
    token = (await admit(device, local=True, scopes=[READ])).token.token

    def signer(nonce: str) -> dict[str, Any]:
        return sign_device_proof(
            device.key,
            client_id="cli",
            client_mode="cli",
            role="operator",
            scopes=[READ],
            token=token,
            nonce=nonce,
            signed_at_ms=gateway.services.clock.now_ms(),
        )

    async with open_client(url, token=token, scopes=[READ], device_signer=signer) as session:
        assert session.hello["auth"]["method"] == "device-token"
        answer = await operator.call(
            "device.token.revoke", {"deviceId": device.device_id, "role": "operator"}
        )
        assert answer["disconnected"] == 1 and answer["revokedAtMs"] > 0
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            await session.ws.get_message()
        assert closed.value.reason.code == 1008
        assert closed.value.reason.reason == "device token revoked"

    with pytest.raises(GatewayError) as no_token:
        await operator.call("device.token.revoke", {"deviceId": device.device_id, "role": "node"})
    assert no_token.value.code == 404
    repeat = await operator.call(
        "device.token.revoke", {"deviceId": device.device_id, "role": "operator"}
    )
    assert repeat["revokedAtMs"] == answer["revokedAtMs"] and repeat["disconnected"] == 0


async def test_without_the_plugin_the_kernel_still_pairs_locally(tmp_path: Path) -> None:
    device = Device()
    async with open_gateway(state_dir=tmp_path, port=0, use_entry_points=False) as gw:
        url = f"ws://127.0.0.1:{gw.port}"

        def signer(nonce: str) -> dict[str, Any]:
            return sign_device_proof(
                device.key,
                client_id="cli",
                client_mode="cli",
                role="operator",
                scopes=[READ],
                token=gw.auth.token,
                nonce=nonce,
                signed_at_ms=gw.services.clock.now_ms(),
            )

        async with open_client(
            url, token=gw.auth.token, scopes=[ADMIN, READ], device_signer=None
        ) as admin:
            async with open_client(
                url, token=gw.auth.token, scopes=[READ], device_signer=signer
            ) as client:
                assert client.hello["auth"]["deviceToken"]
            with pytest.raises(GatewayError) as missing:
                await admin.call("device.pair.list")
            assert missing.value.code == 404
