"""Fixtures for the devices plugin: a gateway running it, an operator, devices to pair.

Devices are put into the registry the way the handshake would (``gateway.devices.admit``),
so these tests can concentrate on the operator's side; the handshake itself, with a foreign
client, is tested in ``tests/kernel/test_devices_handshake.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from devices_support import Admit, Device

from kernel import Gateway, GatewayClient, open_client, open_gateway
from kernel.devices import DeviceMeta
from plugins.devices import DevicesPlugin


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with open_gateway(
        state_dir=tmp_path, port=0, use_entry_points=False, plugins={"devices": DevicesPlugin()}
    ) as gw:
        yield gw


@pytest.fixture
def url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}"


@pytest.fixture
async def operator(gateway: Gateway, url: str) -> AsyncIterator[GatewayClient]:
    async with open_client(url, token=gateway.auth.token, scopes=["operator.pairing"]) as client:
        yield client


@pytest.fixture
def admit(gateway: Gateway) -> Admit:
    """``await admit(device, local=..., scopes=[...])``: a device connecting, as the
    handshake reports it to the registry once its signature and secret checked out."""

    async def admit(
        device: Device,
        *,
        local: bool,
        scopes: list[str] | None = None,
        role: str = "operator",
        by_device_token: bool = False,
    ) -> Any:
        return await gateway.devices.admit(
            device_id=device.device_id,
            public_key=device.public_key,
            role=role,
            scopes=scopes if scopes is not None else ["operator.read"],
            meta=DeviceMeta(display_name="Test phone", platform="ios", remote_ip="198.51.100.7"),
            is_local=local,
            by_device_token=by_device_token,
        )

    return admit
