"""Fixtures for the provider tests: a fake model-API server started in the test's nursery."""

from __future__ import annotations

import pytest
import trio
from fake_llm_server import FakeLLMServer


@pytest.fixture
async def llm_server(nursery: trio.Nursery) -> FakeLLMServer:
    server = FakeLLMServer()
    await server.start(nursery)
    return server
