"""Older commits and profiles for run_all.py: what each change gave, and where time goes.

- ``checkout(rev)`` lays a commit out in a temporary git worktree, so the gateway of that
  commit can be started (through ``gateway_runner.py``) and measured like the current one.
- ``top_functions(path, n)`` reads a cProfile dump and returns the functions with the most
  own time, the lines RESULTS.md shows before and after the speed work.
"""

from __future__ import annotations

import contextlib
import pstats
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RUNNER = BENCH_DIR / "gateway_runner.py"

# The last commit before the speed work of issue 4; "before" in RESULTS.md means this one.
BEFORE_SPEED_WORK = "05a9ecd"
# The commits that changed speed or memory, oldest first; each row of "what each change gave".
SPEED_COMMITS = ("05a9ecd", "07a3260", "e5abb1b", "35fd68e", "a6648d0", "5fcc355", "4b7632d")


@dataclass(frozen=True)
class Revision:
    """A commit as the report names it."""

    rev: str
    short: str
    subject: str


def describe(rev: str) -> Revision:
    """Short hash and subject of ``rev``; raises ``ValueError`` for an unknown revision."""
    completed = subprocess.run(
        ["git", "-C", str(REPO_DIR), "log", "-1", "--format=%h%x00%s", rev, "--"],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise ValueError(f"unknown revision {rev!r}: {completed.stderr.strip()}")
    short, subject = completed.stdout.strip().split("\0", 1)
    return Revision(rev, short, subject)


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A detached worktree of ``rev``, removed again on exit."""
    with tempfile.TemporaryDirectory(prefix="bench-rev-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO_DIR), "worktree", "add", "--detach", "--quiet", str(tree), rev],
            check=True,
            capture_output=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(REPO_DIR), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )


def runner_command(tree: Path, profile_to: Path | None, gateway_args: list[str]) -> list[str]:
    """The gateway_runner.py arguments that start ``tree``'s gateway (without the Python)."""
    profile = ["--profile", str(profile_to)] if profile_to is not None else []
    return [str(RUNNER), "--tree", str(tree), *profile, "--", *gateway_args]


@dataclass(frozen=True)
class ProfileRow:
    """One function of a profile: calls, own time, time including callees."""

    calls: int
    own_s: float
    cumulative_s: float
    function: str


def top_functions(profile_path: Path, count: int, tree: Path) -> tuple[float, list[ProfileRow]]:
    """The profile's total time and its ``count`` functions with the most own time.

    File names are shown relative to ``tree`` (the profiled checkout) or to site-packages.
    """
    stats = pstats.Stats(str(profile_path))
    entries = stats.stats.items()  # type: ignore[attr-defined]
    rows = [
        ProfileRow(calls, own, cumulative, _function_name(filename, line, name, tree))
        for (filename, line, name), (_, calls, own, cumulative, _) in entries
    ]
    rows.sort(key=lambda row: row.own_s, reverse=True)
    return stats.total_tt, rows[:count]  # type: ignore[attr-defined]


def _function_name(filename: str, line: int, name: str, tree: Path) -> str:
    """``path/module.py:LINE(name)`` in the tree or site-packages; a builtin by its name."""
    if filename == "~":
        return name
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        shown = "/".join(parts[len(parts) - parts[::-1].index("site-packages") :])
    elif path.is_relative_to(tree):
        shown = str(path.relative_to(tree))
    else:
        shown = "/".join(parts[-2:])
    return f"{shown}:{line}({name})"
