"""The durable store: one SQLite database in WAL mode, reached off the event loop.

Every call runs in a worker thread, one at a time, inside a transaction that commits when
the function returns and rolls back when it raises. In WAL mode a commit that returned is in
the write-ahead log, so an acknowledged change survives a killed process. The log is synced
at checkpoints rather than at every commit (``synchronous=NORMAL``): a power cut may lose
the last moments, a crash or ``kill -9`` loses nothing, and a commit costs no fsync.
Plugins own their tables and version them through ``StoreSchema`` migrations.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

__all__ = ["Store", "StoreError"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StoreError(Exception):
    """The store could not do what was asked (a failed migration, a closed store)."""


class Store:
    """A SQLite database shared by the kernel and its plugins.

    :param path: the database file; created with its folder when missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        # One connection, one thread at a time: SQLite serialises writers anyway, and a
        # single connection keeps transactions from interleaving.
        self._limiter = trio.CapacityLimiter(1)

    async def open(self) -> None:
        await trio.to_thread.run_sync(self._open_sync, limiter=self._limiter)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions"
            " (owner TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        self._db = db

    async def aclose(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await trio.to_thread.run_sync(db.close, limiter=self._limiter)

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(db)`` in a worker thread inside one transaction and return its result.

        ``work`` must not await or touch trio; keep it to SQL and plain Python.
        """
        return await trio.to_thread.run_sync(self._transaction, work, limiter=self._limiter)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise StoreError("store is closed")
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def migrate(self, owner: str, migrations: Sequence[str]) -> int:
        """Bring ``owner``'s tables to ``len(migrations)``; return the version reached."""

        def current_version(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT version FROM schema_versions WHERE owner = ?", (owner,)
            ).fetchone()
            return row[0] if row else 0

        version = await self.run(current_version)
        if version > len(migrations):
            raise StoreError(
                f"{owner}: database schema is version {version}, newer than this code"
                f" knows ({len(migrations)})"
            )

        for target, script in enumerate(migrations[version:], start=version + 1):

            def apply(db: sqlite3.Connection, script: str = script, target: int = target) -> None:
                for statement in _split_statements(script):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_versions (owner, version) VALUES (?, ?)"
                    " ON CONFLICT (owner) DO UPDATE SET version = excluded.version",
                    (owner, target),
                )

            try:
                await self.run(apply)
            except sqlite3.Error as exc:
                raise StoreError(f"{owner}: migration {target} failed: {exc}") from exc
            logger.debug("migrated %s to schema version %d", owner, target)

        return len(migrations)


def _split_statements(script: str) -> list[str]:
    # executescript() would commit the open transaction; run statement by statement instead.
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
