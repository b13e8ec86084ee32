"""A gateway process for the durability tests, which kill it with SIGKILL.

Usage: ``python sessions_child.py STATE_DIR MODE``.

``serve``: print ``{"port": ..., "token": ...}`` once listening, then serve until killed (the
test appends through ``probe.append`` over a real socket).
``loop``: the same line, then append to ``agent:main:durable`` through the ``sessions``
service without end, printing each message's id only after its append returned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio
from sessions_testkit import running_gateway

LOOP_KEY = "agent:main:durable"


async def main(state_dir: Path, mode: str) -> None:
    async with running_gateway(state_dir) as gw:
        print(json.dumps({"port": gw.gateway.port, "token": gw.gateway.auth.token}), flush=True)
        if mode == "loop":
            index = 0
            while True:
                stored = await gw.sessions.append(
                    LOOP_KEY, {"role": "user", "text": f"loop message {index}"}
                )
                print(stored["id"], flush=True)
                index += 1
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), sys.argv[2])
