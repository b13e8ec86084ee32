"""Running the kernel inside a host's own trio program.

Two shapes, one underneath: ``serve_gateway`` for ``nursery.start`` (it reports the running
``Gateway``, whose ``port`` is then known), and ``open_gateway`` as an async context manager
that stops the gateway gracefully when the block ends::

    async with open_gateway(state_dir=tmp, port=0, plugins={"mine": MyPlugin()}) as gateway:
        async with open_client(f"ws://127.0.0.1:{gateway.port}", token=...) as client:
            await client.call("health")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .gateway import Gateway, GatewayStartupError

__all__ = ["open_gateway", "serve_gateway"]


async def serve_gateway(
    *,
    state_dir: Path | None = None,
    config_path: Path | None = None,
    plugins: Mapping[str, object] | None = None,
    use_entry_points: bool = True,
    host: str | None = None,
    port: int | None = None,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled or until ``gateway.request_shutdown()``; see ``Gateway``."""
    gateway = Gateway(
        state_dir=state_dir,
        config_path=config_path,
        plugins=plugins,
        use_entry_points=use_entry_points,
        host=host,
        port=port,
    )
    await gateway.serve(task_status=task_status)


@asynccontextmanager
async def open_gateway(
    *,
    state_dir: Path | None = None,
    config_path: Path | None = None,
    plugins: Mapping[str, object] | None = None,
    use_entry_points: bool = True,
    host: str | None = None,
    port: int | None = 0,
) -> AsyncIterator[Gateway]:
    """A running gateway for the duration of the block, stopped gracefully at its end.

    :raises GatewayStartupError: when the gateway cannot start (bad config, a required
        plugin failing, the port taken), as itself rather than inside an exception group.
    """
    gateway = Gateway(
        state_dir=state_dir,
        config_path=config_path,
        plugins=plugins,
        use_entry_points=use_entry_points,
        host=host,
        port=port,
    )
    failure: GatewayStartupError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(gateway.serve)
        except GatewayStartupError as exc:
            # Raised from the nursery's body it would come out wrapped in an exception group.
            failure = exc
        else:
            try:
                yield gateway
            finally:
                gateway.request_shutdown()
    if failure is not None:
        raise failure
