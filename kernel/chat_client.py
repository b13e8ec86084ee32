"""``anima-gateway chat``: an interactive terminal chat with the agent on a running gateway.

Each line typed is sent with ``chat.send``; the answer is printed as its ``chat.delta``
events arrive, followed by a line saying which provider and model answered. Ctrl-C while an
answer streams aborts that run (``chat.abort``) and keeps the program going; Ctrl-D (end of
input) or ``/quit`` ends it. Input may be piped, which is how the tests drive it.

It speaks to the gateway only through ``kernel.client``, like any other client, and knows
the chat methods and events by their wire names alone.
"""

from __future__ import annotations

import signal
import sys
import uuid
from typing import Any, TextIO

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from .client import GatewayClient, HandshakeRefused, open_client
from .errors import GatewayError

__all__ = ["DEFAULT_SESSION", "ChatTerminal", "run_chat"]

DEFAULT_SESSION = "main"
QUIT_COMMANDS = frozenset({"/quit", "/exit"})
#: Longest wait for the gateway to confirm an abort before the prompt comes back anyway.
ABORT_WAIT_S = 10.0
CHAT_SCOPES = ("operator.read", "operator.write")


class ChatTerminal:
    """One chat session in a terminal (or over pipes).

    :param client: a connected gateway client with read and write scopes.
    :param session: the session key the conversation goes to.
    """

    def __init__(
        self,
        client: GatewayClient,
        session: str,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.client = client
        self.session = session
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.current_run: str | None = None
        self._interactive = self.stdin.isatty()

    def _out(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def _note(self, text: str) -> None:
        self.stderr.write(text + "\n")
        self.stderr.flush()

    async def run(self) -> int:
        """Read lines and chat until end of input or ``/quit``; the exit status."""
        self._note(
            f"chatting in session {self.session}: Ctrl-C aborts an answer, Ctrl-D or /quit leaves"
        )
        with trio.open_signal_receiver(signal.SIGINT) as interrupts:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_interrupts, interrupts)
                status = await self._loop()
                nursery.cancel_scope.cancel()
        return status

    async def _loop(self) -> int:
        while True:
            if self._interactive:
                self._out("you> ")
            line = await trio.to_thread.run_sync(self.stdin.readline, abandon_on_cancel=True)
            if not line:
                if self._interactive:
                    self._out("\n")
                return 0
            text = line.rstrip("\r\n")
            if text.strip() in QUIT_COMMANDS:
                return 0
            if not text.strip():
                continue
            try:
                await self._turn(text)
            except (trio.EndOfChannel, ConnectionClosed):
                self._note("anima-gateway: the gateway closed the connection")
                return 1

    async def _turn(self, text: str) -> None:
        run_id = str(uuid.uuid4())
        self.current_run = run_id
        try:
            try:
                ack = await self.client.call(
                    "chat.send",
                    {"sessionKey": self.session, "message": text, "idempotencyKey": run_id},
                )
            except GatewayError as exc:
                self._out(f"[error {exc.code}: {exc.message}]\n")
                return
            if ack.get("status") != "started":
                # A stop word ("stop", "/stop"...) answers without a run.
                stopped = ack.get("runIds") or []
                self._out(f"[stopped {len(stopped)} run(s)]\n")
                return
            await self._follow(run_id)
        finally:
            self.current_run = None

    async def _follow(self, run_id: str) -> None:
        """Print the run's events until its final one."""
        printed: list[str] = []
        while True:
            frame = await self.client.next_event()
            payload: dict[str, Any] = frame.get("payload") or {}
            if payload.get("runId") != run_id:
                continue
            event = frame.get("event")
            if event == "chat.run.started":
                self._out(f"{payload.get('provider')}> ")
            elif event == "chat.delta":
                printed.append(payload.get("text", ""))
                self._out(payload.get("text", ""))
            elif event == "chat.run.rotated":
                self._note(
                    f"[{payload.get('provider')}: key {payload.get('fromKeyId')} failed"
                    f" ({payload.get('reason')}); retrying with key {payload.get('toKeyId')}]"
                )
            elif event == "chat.run.completed":
                full, shown = payload.get("text", ""), "".join(printed)
                if full.startswith(shown):
                    # Deltas are droppable for a slow terminal; print what was missed.
                    self._out(full[len(shown) :])
                usage = payload.get("usage") or {}
                self._out(
                    f"\n[{payload.get('provider')}/{payload.get('model')}:"
                    f" {usage.get('inputTokens', 0)} in, {usage.get('outputTokens', 0)} out]\n"
                )
                return
            elif event == "chat.run.failed":
                if payload.get("aborted"):
                    self._out(f"\n[aborted: {payload.get('stopReason')}]\n")
                else:
                    error = payload.get("error") or {}
                    self._out(f"\n[failed {error.get('code')}: {error.get('message')}]\n")
                return

    async def _on_interrupts(self, interrupts: Any) -> None:
        async with trio.open_nursery() as nursery:
            async for _ in interrupts:
                if self.current_run is None:
                    self._note("(Ctrl-D or /quit leaves the chat)")
                    continue
                nursery.start_soon(self._abort, self.current_run)

    async def _abort(self, run_id: str) -> None:
        with trio.move_on_after(ABORT_WAIT_S):
            try:
                await self.client.call("chat.abort", {"sessionKey": self.session, "runId": run_id})
            except GatewayError as exc:
                self._note(f"[abort failed: {exc.message}]")


async def run_chat(
    url: str, *, token: str | None, password: str | None, session: str = DEFAULT_SESSION
) -> int:
    """Connect to ``url`` and chat in ``session``; the process exit status."""
    try:
        async with open_client(url, token=token, password=password, scopes=CHAT_SCOPES) as client:
            return await ChatTerminal(client, session).run()
    except HandshakeRefused as exc:
        print(f"anima-gateway: connect refused: {exc}", file=sys.stderr)
        return 1
    except (OSError, HandshakeError) as exc:
        # trio-websocket reports a refused connection as a HandshakeError over the OSError.
        cause = exc.__cause__ or exc.__context__ or exc
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        print(f"anima-gateway: cannot reach {url}: {cause or type(exc).__name__}", file=sys.stderr)
        return 1
