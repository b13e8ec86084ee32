"""Requests after the handshake, from a client that is not ours (trio-websocket, plain JSON).

Concurrency on one socket, the error codes (404, 403, 400, 500), junk that must not cost the
connection, the payload limit (close 1009) and the per-connection bound on requests.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio

from kernel import ADMIN, READ, MethodSpec, Params, hookimpl

pytestmark = pytest.mark.usefixtures("gateway_token")


class EchoParams(Params):
    text: str


class BusyParams(Params):
    ms: int


class RequestsPlugin:
    """Methods whose behaviour the tests control: a gate, a busy counter, a failure."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.active = 0
        self.peak = 0

    @hookimpl
    def anima_methods(self):
        return [
            MethodSpec("req.boom", self.boom, READ),
            MethodSpec("req.gated", self.gated, READ),
            MethodSpec("req.fast", self.fast, READ),
            MethodSpec("req.busy", self.busy, READ, BusyParams),
            MethodSpec("req.echo", self.echo, READ, EchoParams),
            MethodSpec("req.admin", self.fast, ADMIN),
        ]

    async def boom(self, call, params):
        raise RuntimeError("secret detail in /srv/private/plugin.py")

    async def gated(self, call, params):
        await self.gate.wait()
        return {"gated": True}

    async def fast(self, call, params):
        return {"fast": True}

    async def busy(self, call, params: BusyParams):
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await trio.sleep(params.ms / 1000)
        finally:
            self.active -= 1
        return {"slept": params.ms}

    async def echo(self, call, params: EchoParams):
        return {"length": len(params.text)}


@pytest.fixture
def plugin() -> RequestsPlugin:
    return RequestsPlugin()


@pytest.fixture
async def req_gateway(start_gateway, plugin):
    async with start_gateway(plugins={"req": plugin}) as gateway:
        yield gateway


# -- concurrency ----------------------------------------------------------------------------


async def test_health_and_status_run_concurrently_on_one_socket(gateway, raw_connect):
    async with raw_connect(gateway, scopes=[READ]) as raw:
        await raw.request("a", "health")
        await raw.request("b", "status")
        health, status = await raw.response("a"), await raw.response("b")
    assert health["ok"] and status["ok"]
    assert health["payload"]["ok"] is True
    assert "uptimeMs" in status["payload"]


async def test_responses_come_back_out_of_order_matched_by_id(req_gateway, raw_connect, plugin):
    async with raw_connect(req_gateway, scopes=[READ]) as raw:
        await raw.request("slow", "req.gated")
        await raw.request("quick", "req.fast")
        quick = await raw.response("quick")
        assert quick["payload"] == {"fast": True}
        assert "slow" not in raw.responses
        plugin.gate.set()
        slow = await raw.response("slow")
        assert slow["payload"] == {"gated": True}
    order = [frame["id"] for frame in raw.frames if frame.get("type") == "res"]
    assert order == ["quick", "slow"]


async def test_more_requests_than_the_bound_all_complete(start_gateway, raw_connect, plugin):
    config = {"gateway": {"limits": {"maxInFlight": 2}}}
    async with (
        start_gateway(plugins={"req": plugin}, config=config) as gateway,
        raw_connect(gateway, scopes=[READ]) as raw,
    ):
        ids = [f"busy-{i}" for i in range(7)]
        for request_id in ids:
            await raw.request(request_id, "req.busy", {"ms": 30})
        with trio.fail_after(10):
            responses = [await raw.response(request_id) for request_id in ids]
    assert all(response["ok"] for response in responses)
    # Concurrent, but never more than the bound at once.
    assert plugin.peak == 2


# -- error codes ----------------------------------------------------------------------------


@pytest.mark.parametrize("scopes", [[ADMIN], [READ], []])
async def test_unknown_method_is_404_for_any_authenticated_caller(gateway, raw_connect, scopes):
    async with raw_connect(gateway, scopes=scopes) as raw:
        response = await raw.call("u", "no.such.method")
    assert response["ok"] is False
    assert response["error"]["code"] == 404
    assert response["error"]["reason"] == "NOT_FOUND"
    assert "no.such.method" in response["error"]["message"]


async def test_missing_scope_is_403_naming_the_scope(gateway, raw_connect):
    async with raw_connect(gateway, scopes=[READ]) as raw:
        response = await raw.call("s", "set-heartbeats", {"enabled": True})
        assert response["error"]["code"] == 403
        assert response["error"]["reason"] == "FORBIDDEN"
        assert "operator.admin" in response["error"]["message"]
        assert response["error"]["details"]["required"] == ADMIN
        # The refusal cost nothing: the connection still serves.
        assert (await raw.call("h", "health"))["ok"] is True


async def test_write_scope_meets_read_methods(gateway, raw_connect):
    async with raw_connect(gateway, scopes=["operator.write"]) as raw:
        assert (await raw.call("h", "health"))["ok"] is True


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"intervalMs": "5000"}, "intervalMs"),
        ({"enabled": "yes"}, "enabled"),
        ({"bogus": 1}, "bogus"),
    ],
)
async def test_bad_params_are_400_naming_the_field(gateway, raw_connect, params, field):
    async with raw_connect(gateway) as raw:
        response = await raw.call("p", "set-heartbeats", params)
        assert response["error"]["code"] == 400
        assert field in response["error"]["message"]
        assert response["error"]["details"] == {"field": field}
        assert (await raw.call("h", "health"))["ok"] is True


async def test_params_that_are_not_an_object_are_400(gateway, raw_connect):
    async with raw_connect(gateway) as raw:
        response = await raw.call("p", "health", [1, 2])
    assert response["error"]["code"] == 400


async def test_handler_that_raises_is_500_without_internals_on_the_wire(
    req_gateway, raw_connect, caplog
):
    caplog.set_level(logging.ERROR, logger="kernel.connection")
    async with raw_connect(req_gateway, scopes=[READ]) as raw:
        response = await raw.call("b", "req.boom")
        assert response["error"]["code"] == 500
        assert response["error"]["reason"] == "INTERNAL"
        wire = str(response)
        for leak in ("Traceback", "RuntimeError", "secret detail", "/srv/private", ".py"):
            assert leak not in wire
        assert (await raw.call("f", "req.fast"))["ok"] is True
    # The log has what the wire does not.
    failures = [r for r in caplog.records if r.exc_info and "req.boom" in r.getMessage()]
    assert failures
    assert "secret detail" in str(failures[0].exc_info[1])


# -- junk -----------------------------------------------------------------------------------

# (frame sent, id of the 400 it gets or None when no id can be read)
JUNK = [
    ("this is not json", None),
    ("[1, 2, 3]", None),
    ('"just a string"', None),
    ("{}", None),
    ('{"type": "req", "method": "health"}', None),
    ('{"type": "req", "id": "", "method": "health"}', None),
    ('{"type": "req", "id": "no-method"}', "no-method"),
    ('{"id": "no-type", "method": "health"}', "no-type"),
    ('{"type": "res", "id": "wrong-type", "ok": true}', "wrong-type"),
    ('{"type": "req", "id": "empty-method", "method": ""}', "empty-method"),
    ('{"type": "req", "id": 42, "method": "health"}', "42"),
    ('{"type": "req", "id": "truncated", "method": "he', None),
]


async def test_junk_gets_400_when_its_id_is_readable_and_the_connection_stays(gateway, raw_connect):
    async with raw_connect(gateway) as raw:
        for frame, _ in JUNK:
            await raw.send_text(frame)
        await raw.send_bytes(b"\xff\xfe\x00 binary junk")
        after = await raw.call("after-junk", "health")
        assert after["ok"] is True

    expected = {request_id for _, request_id in JUNK if request_id is not None}
    assert set(raw.responses) == expected | {"after-junk"}
    for request_id in expected:
        (response,) = raw.responses[request_id]
        assert response["ok"] is False
        assert response["error"]["code"] == 400
        assert response["error"]["reason"] == "INVALID_REQUEST"


async def test_junk_without_a_readable_id_is_logged(gateway, raw_connect, caplog):
    caplog.set_level(logging.INFO, logger="kernel.connection")
    async with raw_connect(gateway) as raw:
        conn_id = raw.hello["server"]["connId"]
        await raw.send_text("this is not json")
        await raw.send_text('{"type": "req", "method": "health"}')
        # Answered in order: by the time health is, both junk frames were dealt with.
        assert (await raw.call("h", "health"))["ok"] is True
    assert set(raw.responses) == {"h"}
    dropped = [r.getMessage() for r in caplog.records if "unreadable frame" in r.getMessage()]
    assert len(dropped) == 2
    assert all(conn_id in line for line in dropped)


# -- payload limit --------------------------------------------------------------------------


async def test_frame_over_max_payload_closes_1009(start_gateway, raw_connect, plugin):
    config = {"gateway": {"limits": {"maxPayload": 64 * 1024}}}
    async with start_gateway(plugins={"req": plugin}, config=config) as gateway:
        async with raw_connect(gateway, scopes=[READ]) as raw:
            under = await raw.call("under", "req.echo", {"text": "x" * 60_000})
            assert under["payload"] == {"length": 60_000}
            await raw.request("over", "req.echo", {"text": "x" * 70_000})
            closed = await raw.closed()
            assert closed.code == 1009
            assert "over" not in raw.responses
        # Only that client went away.
        async with raw_connect(gateway, scopes=[READ]) as other:
            assert (await other.call("h", "req.fast"))["ok"] is True


async def test_max_payload_counts_utf8_bytes_not_characters(start_gateway, raw_connect, plugin):
    config = {"gateway": {"limits": {"maxPayload": 64 * 1024}}}
    async with (
        start_gateway(plugins={"req": plugin}, config=config) as gateway,
        raw_connect(gateway, scopes=[READ]) as raw,
    ):
        # 30 000 two-byte characters: 60 000 bytes, under the limit.
        await raw.send_text(json.dumps(_echo_frame("under", "é" * 30_000), ensure_ascii=False))
        assert (await raw.response("under"))["payload"] == {"length": 30_000}
        # 40 000 characters are fewer than 65 536, but their 80 000 bytes are not.
        await raw.send_text(json.dumps(_echo_frame("over", "é" * 40_000), ensure_ascii=False))
        with trio.fail_after(10):
            closed = await raw.closed()
        assert closed.code == 1009
        assert "over" not in raw.responses


async def test_default_max_payload_is_8_mib(start_gateway, raw_connect, plugin):
    async with (
        start_gateway(plugins={"req": plugin}, use_entry_points=False) as gateway,
        raw_connect(gateway, scopes=[READ]) as raw,
    ):
        assert raw.hello["policy"]["maxPayload"] == 8 * 1024 * 1024
        envelope = len(json.dumps(_echo_frame("at", "")))
        text = "x" * (8 * 1024 * 1024 - envelope)
        # Exactly 8 MiB is allowed...
        at_limit = await raw.call("at", "req.echo", {"text": text})
        assert at_limit["payload"] == {"length": len(text)}
        # ...a few bytes more are not.
        await raw.send(_echo_frame("over", text + "x"))
        with trio.fail_after(10):
            closed = await raw.closed()
        assert closed.code == 1009
        assert "over" not in raw.responses


def _echo_frame(request_id: str, text: str) -> dict:
    return {"type": "req", "id": request_id, "method": "req.echo", "params": {"text": text}}
