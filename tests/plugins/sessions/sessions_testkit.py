"""What the sessions tests share: a gateway running the sessions plugin next to a probe.

The probe is a tiny plugin that keeps the kernel's services (so a test can reach the
``sessions`` service and the job registry the way another plugin would), serves
``probe.append`` (an acknowledged append over a real socket, for the durability tests) and
starts stand-in chat runs tagged with a session key.

Also imported by ``sessions_child.py``, the process the durability tests kill.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kernel import (
    ADMIN,
    Call,
    Gateway,
    GatewayClient,
    GatewayError,
    Job,
    MethodSpec,
    Params,
    Services,
    hookimpl,
    open_client,
    open_gateway,
)
from plugins.sessions import SessionsPlugin, SessionStore

READ_ONLY = ("operator.read",)


class AppendParams(Params):
    key: str
    text: str
    role: str = "user"


class Probe:
    """A test plugin standing in for chat: it appends through the service and runs jobs."""

    def __init__(self) -> None:
        self.services: Services | None = None
        self.release = trio.Event()

    @hookimpl
    def anima_startup(self, services: Services) -> None:
        self.services = services

    @hookimpl
    def anima_methods(self) -> list[MethodSpec]:
        return [MethodSpec("probe.append", self.append, ADMIN, AppendParams)]

    async def append(self, call: Call, params: AppendParams) -> dict[str, Any]:
        sessions = call.services.lookup("sessions")
        return await sessions.append(params.key, {"role": params.role, "text": params.text})

    def start_run(self, key: str, run_id: str, *, stubborn: bool = False) -> Job:
        """A stand-in chat run of ``key``; a stubborn one ignores cancellation until
        ``release`` is set."""
        assert self.services is not None

        async def work(job: Job) -> None:
            if stubborn:
                with trio.CancelScope(shield=True):
                    await self.release.wait()
            await trio.sleep_forever()

        return self.services.jobs.start("chat", run_id, work, tags={"sessionKey": key})


@dataclass
class Running:
    gateway: Gateway
    probe: Probe

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway.port}"

    @property
    def services(self) -> Services:
        assert self.probe.services is not None
        return self.probe.services

    @property
    def sessions(self) -> SessionStore:
        return self.services.lookup("sessions")

    def client(self, scopes: tuple[str, ...] | None = None):
        kwargs: dict[str, Any] = {"token": self.gateway.auth.token}
        if scopes is not None:
            kwargs["scopes"] = scopes
        return open_client(self.url, **kwargs)


@asynccontextmanager
async def running_gateway(state_dir: Path, *, config: str | None = None) -> AsyncIterator[Running]:
    """A gateway on 127.0.0.1 port 0 with only the sessions plugin and the probe."""
    if config is not None:
        (state_dir / "config.toml").write_text(config, encoding="utf-8")
    probe = Probe()
    async with open_gateway(
        state_dir=state_dir,
        port=0,
        use_entry_points=False,
        plugins={"sessions": SessionsPlugin(), "probe": probe},
    ) as gateway:
        yield Running(gateway, probe)


async def call_error(client: GatewayClient, method: str, params: Any = None) -> GatewayError:
    """The error a call answers with; fails the test if the call succeeds."""
    try:
        payload = await client.call(method, params)
    except GatewayError as error:
        return error
    raise AssertionError(f"{method} {params!r} succeeded: {payload!r}")


async def next_event(client: GatewayClient, name: str) -> dict[str, Any]:
    # A guard against a hang, not a speed assertion.
    with trio.fail_after(10):
        return await client.next_event(name)
