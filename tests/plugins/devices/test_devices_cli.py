"""``anima-gateway devices ...`` as a real process against a gateway running in the test.

The CLI finds the shared token in the state directory, as an operator on the gateway's own
machine would (no ``--token``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import trio
from devices_support import Admit, Device

from kernel import Gateway

READ, WRITE, ADMIN = "operator.read", "operator.write", "operator.admin"


async def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMA_")}
    command = [
        sys.executable,
        "-m",
        "kernel.cli",
        "devices",
        *args,
        "--url",
        f"ws://127.0.0.1:{gateway.port}",
        "--state-dir",
        str(gateway.state_dir),
    ]
    with trio.fail_after(60):  # a hang guard, not a speed assertion
        return await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, env=env
        )


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


async def test_list_approve_rotate_revoke_from_the_shell(gateway: Gateway, admit: Admit) -> None:
    device = Device()
    request_id = (await admit(device, local=False, scopes=[READ, WRITE])).request["requestId"]

    listed = await cli(gateway, "list")
    assert listed.returncode == 0, err(listed)
    assert "pending requests: 1" in out(listed) and request_id in out(listed)
    assert "paired devices: 0" in out(listed)

    approved = await cli(gateway, "approve", request_id[:8])  # a unique prefix will do
    assert approved.returncode == 0, err(approved)
    assert f"approved request {request_id}" in out(approved)
    assert (await admit(device, local=False, scopes=[READ])).token is not None

    as_json: dict[str, Any] = json.loads(out(await cli(gateway, "list", "--json")))
    assert as_json["pending"] == []
    (paired,) = as_json["paired"]
    assert paired["deviceId"] == device.device_id

    rotated = await cli(gateway, "rotate", device.device_id[:12], "--scopes", READ)
    assert rotated.returncode == 0, err(rotated)
    token = next(
        line.split(":", 1)[1].strip() for line in out(rotated).splitlines() if "token:" in line
    )
    check = await gateway.devices.verify_token(
        device.device_id, device.public_key, "operator", token, [READ]
    )
    assert check.ok
    assert "shown once" in out(rotated)

    revoked = await cli(gateway, "revoke", device.device_id, "--role", "operator")
    assert revoked.returncode == 0, err(revoked)
    assert "revoked the operator token" in out(revoked)
    check = await gateway.devices.verify_token(
        device.device_id, device.public_key, "operator", token, [READ]
    )
    assert check.reason == "device-token-revoked"
    assert "revoked" in out(await cli(gateway, "list"))


async def test_refusals_exit_non_zero_and_say_why(gateway: Gateway, admit: Admit) -> None:
    unknown = await cli(gateway, "approve", "no-such-request")
    assert unknown.returncode == 1
    assert "404 NOT_FOUND" in err(unknown) and "unknown requestId" in err(unknown)

    device = Device()
    await admit(device, local=True, scopes=[READ])
    broadened = await cli(gateway, "rotate", device.device_id, "--scopes", f"{READ},{ADMIN}")
    assert broadened.returncode == 1
    assert "403" in err(broadened) and "may only narrow" in err(broadened)

    wrong_token = await cli(gateway, "list", "--token", "not-the-token")
    assert wrong_token.returncode == 1
    assert "connect refused" in err(wrong_token) and "token mismatch" in err(wrong_token)


async def test_reject_from_the_shell_leaves_the_device_unpaired(
    gateway: Gateway, admit: Admit
) -> None:
    device = Device()
    request_id = (await admit(device, local=False, scopes=[READ])).request["requestId"]

    rejected = await cli(gateway, "reject", request_id[:8])
    assert rejected.returncode == 0, err(rejected)
    assert f"request {request_id} (device {device.device_id})" in out(rejected)
    listing: dict[str, Any] = json.loads(out(await cli(gateway, "list", "--json")))
    assert listing == {"pending": [], "paired": []}
    assert not (await admit(device, local=False, scopes=[READ])).admitted  # asks afresh

    again = await cli(gateway, "reject", request_id)
    assert again.returncode == 1 and "unknown requestId" in err(again)


async def test_reject_says_rejected(gateway: Gateway, admit: Admit) -> None:
    request_id = (await admit(Device(), local=False)).request["requestId"]
    rejected = await cli(gateway, "reject", request_id)
    assert out(rejected).startswith(f"rejected request {request_id}")
