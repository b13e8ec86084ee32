"""The ``connect`` handshake, seen by a client that is not ours (trio-websocket, plain JSON).

Challenge first; the first request must be ``connect``; protocol versions 1 to 3; the
shared token; the time limit; and what ``hello-ok`` tells each kind of client.
"""

from __future__ import annotations

import uuid

import pytest
import trio

from kernel import ADMIN, NODE, READ, EventSpec, MethodSpec, hookimpl
from kernel.gateway import gateway_version

pytestmark = pytest.mark.usefixtures("gateway_token")


async def _ok(call, params):
    return {"ok": True}


class HelloPlugin:
    """Declares one event per audience and a node-only method, and adds to the snapshot."""

    @hookimpl
    def anima_methods(self):
        return [
            MethodSpec("hello.read", _ok, READ),
            MethodSpec("hello.admin", _ok, ADMIN),
            MethodSpec("hello.node", _ok, NODE),
            MethodSpec("hello.hidden", _ok, READ, advertised=False),
        ]

    @hookimpl
    def anima_events(self):
        return [
            EventSpec("hello.public", READ),
            EventSpec("hello.secret", ADMIN),
            EventSpec("hello.everyone", None),
        ]

    @hookimpl
    def anima_hello_snapshot(self, connection):
        return {"helloPlugin": {"role": connection.role}}


@pytest.fixture
async def hello_gateway(start_gateway):
    async with start_gateway(plugins={"hello": HelloPlugin()}) as gateway:
        yield gateway


# -- challenge and first frame ------------------------------------------------------------


async def test_challenge_comes_first_with_a_fresh_nonce(gateway, raw_connect):
    async with (
        raw_connect(gateway, handshake=False) as first,
        raw_connect(gateway, handshake=False) as second,
    ):
        for raw in (first, second):
            assert raw.challenge["type"] == "evt"
            assert raw.challenge["event"] == "connect.challenge"
            assert "seq" not in raw.challenge
            assert isinstance(raw.challenge["payload"]["ts"], int)
            uuid.UUID(raw.challenge["payload"]["nonce"])
        assert first.challenge["payload"]["nonce"] != second.challenge["payload"]["nonce"]


async def test_first_request_must_be_connect(gateway, raw_connect):
    async with raw_connect(gateway, handshake=False) as raw:
        response = await raw.call("h1", "health")
        assert response["ok"] is False
        assert response["error"]["code"] == 400
        assert "first request must be connect" in response["error"]["message"]
        closed = await raw.closed()
        assert closed.code == 1008


@pytest.mark.parametrize("frame", ["not json at all", "[1, 2, 3]", '{"type": "req"}', '"connect"'])
async def test_first_frame_that_is_no_request_closes_1008(gateway, raw_connect, frame):
    async with raw_connect(gateway, handshake=False) as raw:
        await raw.send_text(frame)
        closed = await raw.closed()
        assert closed.code == 1008
        assert raw.responses == {}


async def test_connect_params_are_validated_naming_the_field(gateway, raw_connect):
    async with raw_connect(gateway, handshake=False) as raw:
        params = {"minProtocol": 3, "maxProtocol": 3, "auth": {"token": "x"}}
        response = await raw.call("c1", "connect", params)
        assert response["error"]["code"] == 400
        assert "client" in response["error"]["message"]
        assert (await raw.closed()).code == 1008


# -- protocol versions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high", "agreed"),
    [(1, 1, 1), (2, 2, 2), (3, 3, 3), (1, 3, 3), (1, 2, 2), (2, 9, 3)],
)
async def test_protocol_versions_one_to_three_and_highest_shared_wins(
    gateway, raw_connect, low, high, agreed
):
    async with raw_connect(gateway, handshake=False) as raw:
        response = await raw.handshake(min_protocol=low, max_protocol=high)
        assert response["ok"], response
        assert response["payload"]["protocol"] == agreed


@pytest.mark.parametrize(("low", "high"), [(4, 5), (0, 0)])
async def test_no_shared_protocol_is_400_then_close_1002(gateway, raw_connect, low, high):
    async with raw_connect(gateway, handshake=False) as raw:
        response = await raw.handshake(min_protocol=low, max_protocol=high)
        assert response["ok"] is False
        assert response["error"]["code"] == 400
        assert "protocol" in response["error"]["message"]
        closed = await raw.closed()
        assert closed.code == 1002


# -- the token ----------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "what_failed"), [("wrong-token", "mismatch"), (None, "missing")])
async def test_wrong_or_missing_token_is_401_then_close_1008(
    gateway, raw_connect, token, what_failed
):
    async with raw_connect(gateway, handshake=False) as raw:
        response = await raw.handshake(token=token)
        assert response["ok"] is False
        assert response["error"]["code"] == 401
        # The reason says which check failed (its exact spelling is the auth layer's).
        auth_reason = response["error"]["details"]["authReason"]
        assert "token" in auth_reason and what_failed in auth_reason
        closed = await raw.closed()
        assert closed.code == 1008
    assert gateway.connections == {}


async def test_silent_client_is_closed_when_the_handshake_time_is_up(start_gateway, raw_connect):
    config = {"gateway": {"limits": {"handshakeTimeoutMs": 150}}}
    async with (
        start_gateway(config=config) as gateway,
        raw_connect(gateway, handshake=False) as raw,
    ):
        with trio.fail_after(5):
            closed = await raw.closed()
        assert closed.code == 1000
        assert raw.responses == {}


async def test_connected_client_is_not_closed_by_the_handshake_timer(start_gateway, raw_connect):
    config = {"gateway": {"limits": {"handshakeTimeoutMs": 100}}}
    async with start_gateway(config=config) as gateway, raw_connect(gateway) as raw:
        await trio.sleep(0.3)
        response = await raw.call("h", "health")
        assert response["ok"] is True


# -- hello-ok -----------------------------------------------------------------------------


async def test_hello_ok_describes_server_policy_and_auth(start_gateway, raw_connect):
    limits = {"maxPayload": 100_000, "maxBufferedBytes": 200_000, "tickIntervalMs": 12_345}
    async with (
        start_gateway(config={"gateway": {"limits": limits}}) as gateway,
        raw_connect(gateway, scopes=[READ]) as raw,
    ):
        hello = raw.hello
        assert hello["type"] == "hello-ok"
        assert hello["protocol"] == 3
        assert hello["server"]["version"] == gateway_version()
        assert set(gateway.connections) == {hello["server"]["connId"]}
        assert hello["policy"] == {
            "maxPayload": 100_000,
            "maxBufferedBytes": 200_000,
            "tickIntervalMs": 12_345,
        }
        assert hello["auth"]["role"] == "operator"
        assert hello["auth"]["scopes"] == [READ]
        assert hello["snapshot"]["authMode"] == "token"
        assert isinstance(hello["snapshot"]["uptimeMs"], int)


async def test_snapshot_carries_what_plugins_contribute(hello_gateway, raw_connect):
    async with raw_connect(hello_gateway, scopes=[READ]) as raw:
        snapshot = raw.hello["snapshot"]
        assert snapshot["helloPlugin"] == {"role": "operator"}
        # The health plugin's contributions.
        assert {"presence", "health", "stateVersion"} <= set(snapshot)
        assert any(entry["mode"] == "gateway" for entry in snapshot["presence"])


async def test_read_client_sees_only_what_it_may_use(hello_gateway, raw_connect):
    async with raw_connect(hello_gateway, scopes=[READ]) as raw:
        methods = set(raw.hello["features"]["methods"])
        events = set(raw.hello["features"]["events"])
    assert {"health", "status", "hello.read"} <= methods
    assert not methods & {"set-heartbeats", "system-event", "hello.admin", "hello.node"}
    assert "hello.hidden" not in methods
    assert {"hello.public", "hello.everyone", "tick", "shutdown", "health.changed"} <= events
    assert "hello.secret" not in events


async def test_admin_sees_admin_methods_and_events(hello_gateway, raw_connect):
    async with raw_connect(hello_gateway, scopes=[ADMIN]) as raw:
        methods = set(raw.hello["features"]["methods"])
        events = set(raw.hello["features"]["events"])
    assert {"health", "set-heartbeats", "system-event", "hello.admin", "hello.read"} <= methods
    assert "hello.node" not in methods
    assert {"hello.secret", "hello.public", "hello.everyone"} <= events


async def test_node_sees_node_methods_and_unscoped_events_only(hello_gateway, raw_connect):
    async with raw_connect(hello_gateway, role="node", scopes=[]) as raw:
        assert raw.hello["auth"]["role"] == "node"
        assert raw.hello["features"]["methods"] == ["hello.node"]
        events = set(raw.hello["features"]["events"])
    assert "hello.everyone" in events
    assert not events & {"hello.public", "hello.secret", "health.changed"}


async def test_client_without_scopes_is_admitted_with_none(hello_gateway, raw_connect):
    async with raw_connect(hello_gateway, scopes=[]) as raw:
        assert raw.hello["auth"]["scopes"] == []
        assert raw.hello["features"]["methods"] == []
        response = await raw.call("r", "hello.read")
        assert response["error"]["code"] == 403


async def test_second_connect_is_refused_and_the_connection_stays(gateway, raw_connect):
    async with raw_connect(gateway) as raw:
        again = await raw.handshake()
        assert again["ok"] is False
        assert "first request" in again["error"]["message"]
        response = await raw.call("h", "health")
        assert response["ok"] is True
