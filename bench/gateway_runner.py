"""Run ``anima-gateway`` from a given source tree, optionally under cProfile.

run_all.py uses it to measure an older commit checked out in a git worktree (the installed
console script always runs the current tree) and to profile the gateway under load:

    python bench/gateway_runner.py --tree PATH [--profile OUT.prof] -- run --port P

With ``--profile`` the profiler records only between SIGUSR1 and SIGUSR2, so start-up,
idle waits and shutdown stay out of the numbers. The gateway's own ``main`` does the work;
on SIGTERM it shuts down gracefully and returns, and the profile is written before the exit.
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import sys
from pathlib import Path


def main() -> int:
    """Entry point: the gateway's exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="checkout to import from")
    parser.add_argument("--profile", type=Path, help="write cProfile stats here")
    parser.add_argument("gateway_args", nargs=argparse.REMAINDER, help="-- anima-gateway args")
    args = parser.parse_args()
    gateway_args = args.gateway_args[1:] if args.gateway_args[:1] == ["--"] else args.gateway_args

    # First on the path, so `kernel` and `plugins` come from the tree, not the editable install.
    sys.path.insert(0, str(args.tree.resolve()))
    from kernel.cli import main as gateway_main

    if args.profile is None:
        return gateway_main(gateway_args)

    profiler = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
    signal.signal(signal.SIGUSR2, lambda *_: profiler.disable())
    try:
        return gateway_main(gateway_args)
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    sys.exit(main())
