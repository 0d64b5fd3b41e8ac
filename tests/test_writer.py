"""The inbox's writer (LoopCommit): statements in the event loop, the WAL synced in a thread.

These use the writer on a real SQLite file; only the sync function is wrapped, to observe what
each sync covered."""

import asyncio
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from receiver.store import StoreError
from receiver.store.writer import LoopCommit


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=0")
    conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")
    return conn


def count(path: Path) -> int:
    with closing(sqlite3.connect(path)) as other:
        return other.execute("SELECT count(*) FROM t").fetchone()[0]


def insert(n: int):
    return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (n,)).rowcount


async def test_a_write_returns_only_after_a_sync_that_began_after_its_commit(tmp_path: Path):
    db = tmp_path / "inbox.db"
    seen: list[int] = []  # rows committed when each sync began

    def sync(fd: int) -> None:
        seen.append(count(db))
        os.fdatasync(fd)

    w = LoopCommit("t", 1.0, sync=sync)
    await w.open(lambda: connect(db))
    try:
        for n in range(1, 6):  # one at a time: each its own commit and sync
            assert await w.write(insert(n)) == 1
            assert seen and seen[-1] >= n
        # many at once: group-committed, fewer syncs than writes, each answered after one
        start = len(seen)
        assert await asyncio.gather(*(w.write(insert(n)) for n in range(6, 206))) == [1] * 200
        assert seen[-1] == 205 and len(seen) - start < 200
        assert w.conn is not None and w.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        await w.close()
    assert count(db) == 205


async def test_a_failed_sync_fails_the_writes_it_covered(tmp_path: Path):
    db = tmp_path / "inbox.db"
    broken = True

    def sync(fd: int) -> None:
        if broken:
            raise OSError(5, "Input/output error")

    w = LoopCommit("t", 1.0, sync=sync)
    await w.open(lambda: connect(db))
    try:
        with pytest.raises(StoreError, match="Input/output error"):
            await w.write(insert(1))
        assert w.failing  # readiness says webhooks cannot be stored
        broken = False
        assert await w.write(insert(2)) == 1
        assert w.failing is None
    finally:
        await w.close()


async def test_a_failing_write_fails_alone(tmp_path: Path):
    w = LoopCommit("t", 1.0)
    await w.open(lambda: connect(tmp_path / "inbox.db"))
    try:
        ok, dup, ok2 = await asyncio.gather(w.write(insert(1)), w.write(insert(1)), w.write(insert(2)),
                                            return_exceptions=True)
        assert (ok, ok2) == (1, 1)
        assert isinstance(dup, StoreError) and "UNIQUE" in str(dup)
    finally:
        await w.close()
    assert count(tmp_path / "inbox.db") == 2


async def test_waits_for_another_process_lock_then_gives_up_after_busy_timeout(tmp_path: Path):
    db = tmp_path / "inbox.db"
    w = LoopCommit("t", 0.3)
    await w.open(lambda: connect(db))
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        try:
            other.execute("BEGIN IMMEDIATE")  # the worker, deleting planned rows
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, other.execute, "COMMIT")
            started = time.monotonic()
            assert await w.write(insert(1)) == 1  # waited for the lock, the loop kept running
            assert time.monotonic() - started >= 0.09

            other.execute("BEGIN IMMEDIATE")  # held past busy_timeout
            started = time.monotonic()
            with pytest.raises(StoreError, match="locked"):
                await w.write(insert(2))
            assert 0.3 <= time.monotonic() - started < 2
            other.execute("COMMIT")
            assert await w.write(insert(3)) == 1
        finally:
            await w.close()
    assert count(db) == 2


async def test_the_sync_thread_checkpoints_the_wal(tmp_path: Path):
    db = tmp_path / "inbox.db"
    w = LoopCommit("t", 1.0, checkpoint_every=0)
    await w.open(lambda: connect(db))
    try:
        assert w.conn is not None and w.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for n in range(50):
            await w.write(insert(n))
        await asyncio.sleep(0.1)  # the checkpoint after the last sync
        alone = tmp_path / "alone.db"  # the database file without its WAL: what was copied in
        alone.write_bytes(db.read_bytes())
        assert count(alone) == 50
    finally:
        await w.close()


async def test_closing_answers_what_waits_for_the_lock(tmp_path: Path):
    db = tmp_path / "inbox.db"
    w = LoopCommit("t", 5.0)
    await w.open(lambda: connect(db))
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(w.write(insert(1)))
        await asyncio.sleep(0.05)
        await w.close()
        with pytest.raises(StoreError, match="closing"):
            await pending
        other.execute("COMMIT")
    with pytest.raises(StoreError, match="not open"):
        await w.write(insert(2))
