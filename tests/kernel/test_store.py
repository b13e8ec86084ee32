"""The store: one SQLite database in WAL mode, plugin-owned migrations, durable writes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
import trio

from kernel import GatewayStartupError, Store, StoreSchema, hookimpl

pytestmark = pytest.mark.usefixtures("gateway_token")

NOTES_V2 = (
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
    # Data in a migration shows whether it ran twice.
    "INSERT INTO notes (body) VALUES ('seeded by migration 2')",
)


class NotesPlugin:
    def __init__(self, *migrations: str) -> None:
        self.migrations = migrations
        self.services = None

    @hookimpl
    def anima_store_schema(self):
        return StoreSchema(owner="notes", migrations=self.migrations)

    @hookimpl
    def anima_startup(self, services):
        self.services = services


def _query(state_dir, sql: str, args=()) -> list[tuple]:
    db = sqlite3.connect(state_dir / "gateway.sqlite3")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


async def test_database_is_in_wal_mode(start_gateway, state_dir):
    async with start_gateway(use_entry_points=False) as gateway:
        mode = await gateway.services.store.run(
            lambda db: db.execute("PRAGMA journal_mode").fetchone()[0]
        )
        assert mode == "wal"
    assert _query(state_dir, "PRAGMA journal_mode") == [("wal",)]


async def test_migrations_are_applied_once_and_versioned(start_gateway, state_dir):
    for _ in range(2):
        async with start_gateway(plugins={"notes": NotesPlugin(*NOTES_V2)}, use_entry_points=False):
            pass
    assert _query(state_dir, "SELECT body FROM notes") == [("seeded by migration 2",)]
    version = "SELECT version FROM schema_versions WHERE owner = 'notes'"
    assert _query(state_dir, version) == [(2,)]

    # A release that appends a migration gets only that one applied.
    upgraded = NotesPlugin(*NOTES_V2, "ALTER TABLE notes ADD COLUMN tag TEXT")
    async with start_gateway(plugins={"notes": upgraded}, use_entry_points=False) as gateway:
        rows = await upgraded.services.store.run(
            lambda db: db.execute("SELECT body, tag FROM notes").fetchall()
        )
        assert [tuple(row) for row in rows] == [("seeded by migration 2", None)]
        assert gateway.services.store is upgraded.services.store
    assert _query(state_dir, version) == [(3,)]


REQUIRED = "[plugins.notes]\nrequired = true\n"
BROKEN_V2 = (NOTES_V2[0], "CREATE TABLE tags (name TEXT);\nINSERT INTO no_such_table VALUES (1);")


def _info(gateway, name):
    (info,) = [info for info in gateway.plugin_infos if info.name == name]
    return info


async def test_database_newer_than_the_code_leaves_the_plugin_out(start_gateway, state_dir):
    async with start_gateway(plugins={"notes": NotesPlugin(*NOTES_V2)}, use_entry_points=False):
        pass
    older = NotesPlugin(NOTES_V2[0])
    async with start_gateway(plugins={"notes": older}, use_entry_points=False) as gateway:
        assert _info(gateway, "notes").state == "failed"
        assert "newer" in _info(gateway, "notes").error
        assert older.services is None
    # Unless it is required: then the gateway does not start at all.
    with pytest.raises(GatewayStartupError, match=r"notes.*newer"):
        async with start_gateway(
            plugins={"notes": NotesPlugin(NOTES_V2[0])}, use_entry_points=False, config=REQUIRED
        ):
            pytest.fail("the gateway must not start")


async def test_failed_migration_leaves_nothing_half_done(start_gateway, state_dir):
    broken = NotesPlugin(*BROKEN_V2)
    async with start_gateway(plugins={"notes": broken}, use_entry_points=False) as gateway:
        assert _info(gateway, "notes").state == "failed"
        assert "migration 2 failed" in _info(gateway, "notes").error
    with pytest.raises(GatewayStartupError, match="notes: migration 2 failed"):
        async with start_gateway(
            plugins={"notes": NotesPlugin(*BROKEN_V2)}, use_entry_points=False, config=REQUIRED
        ):
            pytest.fail("the gateway must not start")
    version = "SELECT version FROM schema_versions WHERE owner = 'notes'"
    assert _query(state_dir, version) == [(1,)]
    tables = {name for (name,) in _query(state_dir, "SELECT name FROM sqlite_master")}
    assert "notes" in tables and "tags" not in tables


async def test_work_that_raises_is_rolled_back(start_gateway):
    plugin = NotesPlugin(NOTES_V2[0])
    async with start_gateway(plugins={"notes": plugin}, use_entry_points=False):
        store = plugin.services.store

        def insert_then_fail(db):
            db.execute("INSERT INTO notes (body) VALUES ('half')")
            raise ValueError("changed my mind")

        with pytest.raises(ValueError):
            await store.run(insert_then_fail)
        count = await store.run(lambda db: db.execute("SELECT count(*) FROM notes").fetchone()[0])
        assert count == 0


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import trio

    from kernel import Store


    async def main(path):
        store = Store(Path(path))
        await store.open()
        await store.migrate("acks", ["CREATE TABLE acks (n INTEGER NOT NULL)"])
        for n in range(5):
            await store.run(lambda db, n=n: db.execute("INSERT INTO acks VALUES (?)", (n,)))
            print(f"ack {n}", flush=True)
        await trio.sleep_forever()


    trio.run(main, sys.argv[1])
    """
)


def test_acknowledged_write_survives_a_killed_process(tmp_path):
    database = tmp_path / "killed.sqlite3"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(database)],
        stdout=subprocess.PIPE,
        text=True,
    )
    # The watchdog keeps a wedged child from hanging the suite.
    watchdog = threading.Timer(30, process.kill)
    watchdog.start()
    try:
        acknowledged = [process.stdout.readline().strip() for _ in range(5)]
        assert acknowledged == [f"ack {n}" for n in range(5)]
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        process.kill()
        process.stdout.close()

    # Whatever the kill left in the WAL is recovered on open.
    async def reopen():
        store = Store(database)
        await store.open()
        try:
            return await store.run(
                lambda db: [row[0] for row in db.execute("SELECT n FROM acks ORDER BY n")]
            )
        finally:
            await store.aclose()

    assert trio.run(reopen) == [0, 1, 2, 3, 4]
