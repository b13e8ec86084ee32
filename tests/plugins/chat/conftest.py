"""Fixtures for the chat tests: gateways running sessions + providers + chat, and a fake LLM.

The fake model-API server is the providers tests' ``FakeLLMServer`` (a real HTTP/1.1 server
on 127.0.0.1, port 0); its folder is put on ``sys.path`` so both suites share one server.
The gateway and client fixtures (``start_gateway``, ``connect``, ``raw_connect``) come from
``tests/conftest.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "providers"))

from fake_llm_server import FakeLLMServer


@pytest.fixture
async def llm(nursery: trio.Nursery) -> FakeLLMServer:
    server = FakeLLMServer()
    await server.start(nursery)
    return server
