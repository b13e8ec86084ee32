"""docs/security.md's remote pairing, step by step, with the page's own Python client.

The client code is taken from the page and run as written, so a change to the signed string
or the connect params that the page does not follow fails here. "Remote" is a connection to
127.0.0.1 whose Host header names another machine; the gateway runs on port 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from kernel import open_client, open_gateway
from plugins.devices import DevicesPlugin

SECURITY_MD = Path(__file__).resolve().parents[1] / "docs" / "security.md"


def documented_client() -> dict[str, Any]:
    """Run the page's ``python`` block; return its namespace (``connect_request``...)."""
    (code,) = re.findall(r"```python\n(.*?)```", SECURITY_MD.read_text(encoding="utf-8"), re.S)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(SECURITY_MD), "exec"), namespace)
    return namespace


async def connect_once(port: int, host: str, request: Callable[[str], str]) -> dict[str, Any]:
    """Open a socket, answer the challenge with ``request(nonce)``; return the answer."""
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = await wrap_client_stream(nursery, stream, host, "/")
        challenge = json.loads(await ws.get_message())
        await ws.send_message(request(challenge["payload"]["nonce"]))
        answer: dict[str, Any] = json.loads(await ws.get_message())
        if not answer["ok"]:
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                answer["closeCode"] = closed.reason.code
        await ws.aclose()
        nursery.cancel_scope.cancel()
    return answer


async def test_the_documented_client_pairs_remotely_step_by_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANIMA_GATEWAY_TOKEN", raising=False)  # step 1 reads the token file
    client = documented_client()
    scopes = ["operator.read"]
    async with open_gateway(
        state_dir=tmp_path, port=0, use_entry_points=False, plugins={"devices": DevicesPlugin()}
    ) as gw:
        shared = (tmp_path / "gateway.token").read_text().strip()  # step 1
        remote = f"gateway.example.net:{gw.port}"

        def with_token(token: str) -> Callable[[str], str]:
            return lambda nonce: client["connect_request"](nonce, token, scopes)

        async with open_client(
            f"ws://127.0.0.1:{gw.port}", token=shared, scopes=["operator.pairing"]
        ) as operator:
            refused = await connect_once(gw.port, remote, with_token(shared))  # steps 3-4
            assert refused["error"]["reason"] == "NOT_PAIRED"
            assert refused["closeCode"] == 1008
            request_id = refused["error"]["details"]["requestId"]
            requested = await operator.next_event("device.pair.requested")
            assert requested["payload"]["deviceId"] == client["device_id"]
            await operator.call("device.pair.approve", {"requestId": request_id})  # step 5

        paired = await connect_once(gw.port, remote, with_token(shared))  # step 6
        assert paired["ok"], paired
        device_token = paired["payload"]["auth"]["deviceToken"]

        alone = await connect_once(gw.port, remote, with_token(device_token))  # step 7
        assert alone["ok"], alone
        assert alone["payload"]["auth"]["method"] == "device-token"
        assert alone["payload"]["auth"]["scopes"] == scopes
