"""The plugin contract, each shape shown by a small plugin over real sockets.

A handler that answers at once and streams events afterwards (chat runs); work cancelled when
its caller leaves or by id from another method (chat.abort); a two-phase call whose result a
second method waits for (agent / agent.wait); idempotency keys; a node-only method; and the
event bus: scope filtering, per-connection ``seq`` without gaps, targeted events.
"""

from __future__ import annotations

import pytest
import trio

from kernel import (
    ADMIN,
    NODE,
    READ,
    WRITE,
    EventSpec,
    GatewayError,
    MethodSpec,
    Params,
    UnknownEventError,
    conflict,
    hookimpl,
    not_found,
)

pytestmark = pytest.mark.usefixtures("gateway_token")


class StreamParams(Params):
    run_id: str
    chunks: int = 3
    hold: bool = False


class RunIdParams(Params):
    run_id: str


class WaitParams(Params):
    run_id: str
    timeout_ms: int = 5_000


class IdemParams(Params):
    idempotency_key: str | None = None
    value: str = ""


class BroadcastParams(Params):
    events: list[str]


class PokeParams(Params):
    conn_id: str


class ContractPlugin:
    """One plugin showing every shape of method the later categories need."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.task_gate = trio.Event()
        self.idem_gate = trio.Event()
        self.idem_gate.set()
        self.idem_runs = 0
        self.cancelled: list[str] = []
        self.cancel_seen = trio.Event()

    @hookimpl
    def anima_methods(self):
        return [
            MethodSpec("stream.start", self.stream_start, WRITE, StreamParams),
            MethodSpec("stream.abort", self.stream_abort, WRITE, RunIdParams),
            MethodSpec("hold.request", self.hold_request, READ),
            MethodSpec("task.run", self.task_run, WRITE, RunIdParams),
            MethodSpec("task.wait", self.task_wait, WRITE, WaitParams),
            MethodSpec(
                "idem.do", self.idem_do, WRITE, IdemParams, idempotency_field="idempotency_key"
            ),
            MethodSpec("node.report", self.node_report, NODE),
            MethodSpec("contract.ping", self.ping, READ),
            MethodSpec("contract.broadcast", self.broadcast, READ, BroadcastParams),
            MethodSpec("contract.poke", self.poke, READ, PokeParams),
        ]

    @hookimpl
    def anima_events(self):
        return [
            EventSpec("stream.delta", READ, droppable=True),
            EventSpec("stream.completed", READ),
            EventSpec("stream.aborted", READ),
            EventSpec("contract.public", READ),
            EventSpec("contract.secret", ADMIN),
            EventSpec("contract.everyone", None),
        ]

    # -- a run that streams, cancellable -----------------------------------------------------

    async def stream_start(self, call, params: StreamParams):
        services = call.services

        async def run(job):
            try:
                await self.release.wait()
                for index in range(params.chunks):
                    services.events.emit(
                        "stream.delta", {"runId": job.job_id, "index": index, "text": f"t{index}"}
                    )
                    await trio.sleep(0)
                if params.hold:
                    await trio.sleep_forever()
                services.events.emit("stream.completed", {"runId": job.job_id})
                return {"chunks": params.chunks}
            except trio.Cancelled:
                self.cancelled.append(f"stream:{job.job_id}:{job.cancel_reason}")
                self.cancel_seen.set()
                services.events.emit("stream.aborted", {"runId": job.job_id})
                raise

        services.jobs.start("stream", params.run_id, run, owner=call.connection.conn_id)
        return {"runId": params.run_id, "status": "started"}

    async def stream_abort(self, call, params: RunIdParams):
        job = call.services.jobs.get("stream", params.run_id)
        if job is None:
            raise not_found(f"no run {params.run_id}")
        aborted = call.services.jobs.cancel("stream", params.run_id, "aborted")
        await job.done.wait()
        return {"aborted": aborted, "state": job.state}

    async def hold_request(self, call, params):
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled.append(f"request:{call.request_id}")
            self.cancel_seen.set()
            raise

    # -- two-phase ---------------------------------------------------------------------------

    async def task_run(self, call, params: RunIdParams):
        jobs = call.services.jobs

        async def work(job):
            await self.task_gate.wait()
            return {"answer": 42}

        # Not bound to the caller: the work outlives the request and its connection.
        jobs.start("task", params.run_id, work)
        await call.accept({"runId": params.run_id, "status": "accepted"})
        job = await jobs.wait("task", params.run_id, timeout_s=30)
        return {"runId": params.run_id, "status": job.state, "result": job.result}

    async def task_wait(self, call, params: WaitParams):
        job = await call.services.jobs.wait("task", params.run_id, params.timeout_ms / 1000)
        if job is None:
            return {"runId": params.run_id, "status": "timeout"}
        return {"runId": params.run_id, "status": job.state, "result": job.result}

    # -- idempotency -------------------------------------------------------------------------

    async def idem_do(self, call, params: IdemParams):
        self.idem_runs += 1
        run = self.idem_runs
        await self.idem_gate.wait()
        if params.value == "fail":
            raise conflict(f"refused on run {run}")
        if params.value == "unavailable":
            raise GatewayError(503, f"back end down on run {run}")
        return {"run": run, "value": params.value}

    # -- roles and events --------------------------------------------------------------------

    async def node_report(self, call, params):
        return {"from": call.connection.role}

    async def ping(self, call, params):
        return {"pong": True}

    async def broadcast(self, call, params: BroadcastParams):
        return {"delivered": [call.emit(name, {"name": name}) for name in params.events]}

    async def poke(self, call, params: PokeParams):
        delivered = call.services.events.emit(
            "contract.public", {"poke": True}, to=[params.conn_id]
        )
        return {"delivered": delivered}


@pytest.fixture
def plugin() -> ContractPlugin:
    return ContractPlugin()


@pytest.fixture
async def contract_gateway(start_gateway, plugin):
    async with start_gateway(plugins={"contract": plugin}, use_entry_points=False) as gateway:
        yield gateway


async def _wait_until(predicate, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.005)


# -- answer at once, stream afterwards --------------------------------------------------------


async def test_handler_answers_at_once_and_streams_events_afterwards(
    contract_gateway, connect, plugin
):
    async with connect(contract_gateway) as client:
        answer = await client.call("stream.start", {"runId": "r1", "chunks": 3})
        assert answer == {"runId": "r1", "status": "started"}
        # Answered while the run had not yet produced anything.
        assert client.events_nowait() == []
        plugin.release.set()
        deltas = [await client.next_event("stream.delta") for _ in range(3)]
        completed = await client.next_event("stream.completed")
    assert [d["payload"]["index"] for d in deltas] == [0, 1, 2]
    assert [d["payload"]["text"] for d in deltas] == ["t0", "t1", "t2"]
    assert completed["payload"] == {"runId": "r1"}
    job = contract_gateway.jobs.get("stream", "r1")
    assert job.state == "ok" and job.result == {"chunks": 3}


# -- cancellation -----------------------------------------------------------------------------


async def test_request_handler_is_cancelled_when_its_caller_disconnects(
    contract_gateway, raw_connect, plugin
):
    async with raw_connect(contract_gateway, scopes=[READ]) as raw:
        await raw.request("held", "hold.request")
        conn_id = raw.hello["server"]["connId"]
        await _wait_until(lambda: contract_gateway.connections[conn_id].in_flight == 1)
    with trio.fail_after(5):
        await plugin.cancel_seen.wait()
    assert plugin.cancelled == ["request:held"]


async def test_owner_bound_job_is_cancelled_when_its_owner_disconnects(
    contract_gateway, connect, plugin
):
    plugin.release.set()
    async with connect(contract_gateway) as client:
        await client.call("stream.start", {"runId": "r2", "hold": True})
        await client.next_event("stream.delta")
    with trio.fail_after(5):
        await plugin.cancel_seen.wait()
    assert plugin.cancelled == ["stream:r2:owner disconnected"]
    assert contract_gateway.jobs.get("stream", "r2").state == "cancelled"


async def test_job_is_cancelled_by_id_from_another_connection(contract_gateway, connect, plugin):
    plugin.release.set()
    async with connect(contract_gateway) as owner, connect(contract_gateway) as other:
        await owner.call("stream.start", {"runId": "r3", "hold": True})
        await owner.next_event("stream.delta")
        result = await other.call("stream.abort", {"runId": "r3"})
        assert result == {"aborted": True, "state": "cancelled"}
        aborted = await owner.next_event("stream.aborted")
        assert aborted["payload"] == {"runId": "r3"}
        # The owner's connection is unharmed, and a second abort finds nothing running.
        assert await owner.call("contract.ping") == {"pong": True}
        again = await other.call("stream.abort", {"runId": "r3"})
        assert again == {"aborted": False, "state": "cancelled"}
        with pytest.raises(GatewayError) as missing:
            await other.call("stream.abort", {"runId": "never-started"})
        assert missing.value.code == 404
    assert plugin.cancelled == ["stream:r3:aborted"]


# -- two-phase --------------------------------------------------------------------------------


async def test_two_phase_call_sends_two_responses_with_one_id(
    contract_gateway, raw_connect, plugin
):
    async with raw_connect(contract_gateway) as raw:
        await raw.request("t1", "task.run", {"runId": "job-1"})
        accepted = await raw.response("t1")
        assert accepted["ok"] is True
        assert accepted["payload"] == {"runId": "job-1", "status": "accepted"}
        assert len(raw.responses["t1"]) == 1
        plugin.task_gate.set()
        final = await raw.response("t1", nth=2)
    assert final["ok"] is True
    assert final["payload"] == {"runId": "job-1", "status": "ok", "result": {"answer": 42}}


async def test_another_method_waits_for_the_work_that_outlived_its_request(
    contract_gateway, raw_connect, connect, plugin
):
    async with raw_connect(contract_gateway) as starter:
        await starter.request("t", "task.run", {"runId": "job-2"})
        assert (await starter.response("t"))["payload"]["status"] == "accepted"
    # The caller is gone; the work goes on and can still be waited for.
    async with connect(contract_gateway) as waiter:
        early = await waiter.call("task.wait", {"runId": "job-2", "timeoutMs": 20})
        assert early == {"runId": "job-2", "status": "timeout"}
        async with trio.open_nursery() as nursery:
            results = []

            async def wait_for_it():
                results.append(await waiter.call("task.wait", {"runId": "job-2"}))

            nursery.start_soon(wait_for_it)
            await trio.sleep(0.02)
            assert results == []
            plugin.task_gate.set()
        assert results == [{"runId": "job-2", "status": "ok", "result": {"answer": 42}}]
        # A late wait still finds the outcome; an unknown id is 404.
        late = await waiter.call("task.wait", {"runId": "job-2", "timeoutMs": 0})
        assert late["status"] == "ok"
        with pytest.raises(GatewayError) as unknown:
            await waiter.call("task.wait", {"runId": "nope"})
        assert unknown.value.code == 404


# -- idempotency ------------------------------------------------------------------------------


async def test_retried_request_gets_the_first_result(contract_gateway, connect, plugin):
    async with connect(contract_gateway) as first, connect(contract_gateway) as second:
        one = await first.call("idem.do", {"idempotencyKey": "k1", "value": "a"})
        retry = await first.call("idem.do", {"idempotencyKey": "k1", "value": "a"})
        # The cache is the gateway's, not the connection's.
        elsewhere = await second.call("idem.do", {"idempotencyKey": "k1", "value": "a"})
        other_key = await first.call("idem.do", {"idempotencyKey": "k2", "value": "b"})
        no_key = await first.call("idem.do", {"value": "c"})
    assert one == retry == elsewhere == {"run": 1, "value": "a"}
    assert other_key == {"run": 2, "value": "b"}
    assert no_key == {"run": 3, "value": "c"}
    assert plugin.idem_runs == 3


async def test_concurrent_duplicate_waits_and_gets_the_same_result(
    contract_gateway, connect, plugin
):
    plugin.idem_gate = trio.Event()
    results = []
    async with connect(contract_gateway) as first, connect(contract_gateway) as second:

        async def call(client):
            results.append(await client.call("idem.do", {"idempotencyKey": "k3", "value": "x"}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, first)
            nursery.start_soon(call, second)
            connections = list(contract_gateway.connections.values())
            await _wait_until(lambda: all(c.in_flight == 1 for c in connections))
            assert plugin.idem_runs == 1
            plugin.idem_gate.set()
    assert results == [{"run": 1, "value": "x"}] * 2
    assert plugin.idem_runs == 1


async def test_a_failure_is_replayed_for_the_same_key(contract_gateway, connect, plugin):
    async with connect(contract_gateway) as client:
        errors = []
        for _ in range(2):
            with pytest.raises(GatewayError) as failed:
                await client.call("idem.do", {"idempotencyKey": "k4", "value": "fail"})
            errors.append((failed.value.code, failed.value.message))
    assert errors == [(409, "refused on run 1")] * 2
    assert plugin.idem_runs == 1


async def test_a_failure_a_retry_may_mend_is_not_replayed(contract_gateway, connect, plugin):
    async with connect(contract_gateway) as client:
        with pytest.raises(GatewayError) as failed:
            await client.call("idem.do", {"idempotencyKey": "k5", "value": "unavailable"})
        assert failed.value.code == 503
        retried = await client.call("idem.do", {"idempotencyKey": "k5", "value": "ok"})
        again = await client.call("idem.do", {"idempotencyKey": "k5", "value": "ok"})
    assert retried == again == {"run": 2, "value": "ok"}
    assert plugin.idem_runs == 2


# -- the node role ----------------------------------------------------------------------------


async def test_node_method_is_for_the_node_role_only(contract_gateway, connect):
    async with connect(contract_gateway, role="node", scopes=[], mode="node") as node:
        assert await node.call("node.report") == {"from": "node"}
        with pytest.raises(GatewayError) as refused:
            await node.call("contract.ping")
        assert refused.value.code == 403
    async with connect(contract_gateway, scopes=[ADMIN]) as admin:
        with pytest.raises(GatewayError) as refused:
            await admin.call("node.report")
        assert refused.value.code == 403
        assert "node" in refused.value.message


async def test_node_with_operator_scopes_still_cannot_call_operator_methods(
    contract_gateway, connect
):
    async with connect(contract_gateway, role="node", scopes=[ADMIN], mode="node") as node:
        with pytest.raises(GatewayError) as refused:
            await node.call("contract.ping")
    assert refused.value.code == 403


# -- events -----------------------------------------------------------------------------------


async def test_events_are_scope_filtered_and_seq_has_no_gaps(contract_gateway, connect):
    sequence = [
        "contract.public",
        "contract.secret",
        "contract.secret",
        "contract.public",
        "contract.everyone",
        "contract.secret",
        "contract.public",
    ]
    async with (
        connect(contract_gateway, scopes=[READ]) as reader,
        connect(contract_gateway, scopes=[ADMIN]) as admin,
        connect(contract_gateway, role="node", scopes=[], mode="node") as node,
    ):
        result = await reader.call("contract.broadcast", {"events": sequence})
        assert result["delivered"] == [2, 1, 1, 2, 3, 1, 2]
        admin_events = [await admin.next_event() for _ in sequence]
        reader_events = [await reader.next_event() for _ in range(4)]
        node_events = [await node.next_event()]
        # Nothing more is on its way to the reader or the node.
        await reader.call("contract.ping")
        assert reader.events_nowait() == node.events_nowait() == []

    assert [e["event"] for e in admin_events] == sequence
    assert [e["seq"] for e in admin_events] == list(range(1, len(sequence) + 1))
    assert [e["event"] for e in reader_events] == [
        "contract.public",
        "contract.public",
        "contract.everyone",
        "contract.public",
    ]
    assert [e["seq"] for e in reader_events] == [1, 2, 3, 4]
    assert [(e["event"], e["seq"]) for e in node_events] == [("contract.everyone", 1)]


async def test_emit_reports_how_many_connections_got_the_event(contract_gateway, connect):
    async with (
        connect(contract_gateway, scopes=[READ]) as reader,
        connect(contract_gateway, scopes=[ADMIN]),
    ):
        result = await reader.call(
            "contract.broadcast",
            {"events": ["contract.public", "contract.secret", "contract.everyone"]},
        )
    assert result == {"delivered": [2, 1, 2]}


async def test_targeted_emit_reaches_only_the_connection_named(contract_gateway, connect):
    async with (
        connect(contract_gateway, scopes=[READ]) as target,
        connect(contract_gateway, scopes=[READ]) as bystander,
        connect(contract_gateway, scopes=[ADMIN]) as sender,
    ):
        target_id = target.hello["server"]["connId"]
        assert await sender.call("contract.poke", {"connId": target_id}) == {"delivered": 1}
        poke = await target.next_event("contract.public")
        assert poke["payload"] == {"poke": True}
        assert poke["seq"] == 1
        # A marker everyone gets shows the bystander and the sender got nothing before it.
        await sender.call("contract.broadcast", {"events": ["contract.everyone"]})
        assert (await bystander.next_event())["event"] == "contract.everyone"
        assert (await sender.next_event())["event"] == "contract.everyone"
        assert await sender.call("contract.poke", {"connId": "no-such-conn"}) == {"delivered": 0}


async def test_targeted_emit_still_honours_the_event_scope(contract_gateway, connect):
    async with (
        connect(contract_gateway, role="node", scopes=[], mode="node") as node,
        connect(contract_gateway, scopes=[READ]) as sender,
    ):
        node_id = node.hello["server"]["connId"]
        assert await sender.call("contract.poke", {"connId": node_id}) == {"delivered": 0}


async def test_emitting_an_undeclared_event_is_refused(contract_gateway):
    with pytest.raises(UnknownEventError):
        contract_gateway.services.events.emit("never.declared", {})
