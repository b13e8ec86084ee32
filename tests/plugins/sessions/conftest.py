"""Fixtures for the sessions tests: a real gateway (real SQLite file in ``tmp_path``, real
socket on 127.0.0.1 port 0) and real clients, one with every operator scope and one that
may only read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sessions_testkit import READ_ONLY, Running, running_gateway

from kernel import GatewayClient


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_gateway(tmp_path) as running:
        yield running


@pytest.fixture
async def admin(gw: Running) -> AsyncIterator[GatewayClient]:
    async with gw.client() as client:
        yield client


@pytest.fixture
async def reader(gw: Running) -> AsyncIterator[GatewayClient]:
    async with gw.client(READ_ONLY) as client:
        yield client
