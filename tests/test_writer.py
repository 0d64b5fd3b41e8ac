"""The group-committing writer on a real SQLite file: shared commits, writes that fail alone,
grouped items, and what a fault of the file does (a full disk vs a failed fsync)."""

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from receiver.store import StoreError
from receiver.store.writer import Writer, fault


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, pad BLOB)")
    return conn


def count(path: Path) -> int:
    with closing(sqlite3.connect(path)) as other:
        return other.execute("SELECT count(*) FROM t").fetchone()[0]


def insert(n: int):
    return lambda conn: conn.execute("INSERT INTO t(n) VALUES (?)", (n,)).rowcount


def insert_many(conn: sqlite3.Connection, items: list[int]) -> list[str]:
    """A grouped write: all of a commit's items in one statement."""
    conn.execute(f"INSERT INTO t(n) VALUES {','.join(['(?)'] * len(items))}", items)
    return [f"row {n}" for n in items]


def failure(code: int) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("injected")
    exc.sqlite_errorcode = code  # what the sqlite3 module sets from SQLite's extended code
    return exc


@pytest.fixture
async def writer(tmp_path: Path):
    broken: list[str] = []
    commits: list[int] = []
    w = Writer("test", broken.append, lambda: commits.append(1))
    w.conn = await w.call(connect, tmp_path / "w.db")
    w.broken_reasons, w.commits = broken, commits  # type: ignore[attr-defined]
    yield w
    await w.close()


async def test_concurrent_writes_share_commits_and_each_gets_its_result(writer, tmp_path: Path):
    assert await asyncio.gather(*(writer.write(insert(n)) for n in range(200))) == [1] * 200
    assert count(tmp_path / "w.db") == 200
    assert len(writer.commits) < 200  # written while another commit ran: they joined the next one


async def test_a_write_that_raises_fails_alone(writer, tmp_path: Path):
    ok, dup, ok2 = await asyncio.gather(writer.write(insert(1)), writer.write(insert(1)),
                                        writer.write(insert(2)), return_exceptions=True)
    assert (ok, ok2) == (1, 1)
    assert isinstance(dup, StoreError) and "UNIQUE" in str(dup)
    assert count(tmp_path / "w.db") == 2 and writer.failing is None


async def test_grouped_items_take_one_call_per_commit_and_a_bad_one_fails_alone(writer, tmp_path: Path):
    calls: list[list[int]] = []

    def group(conn: sqlite3.Connection, items: list[int]) -> list[str]:
        calls.append(items)
        return insert_many(conn, items)

    results = await asyncio.gather(*(writer.add(group, n) for n in (1, 2, 3, 2, 4)), return_exceptions=True)
    assert [r for r in results if isinstance(r, str)] == ["row 1", "row 2", "row 3", "row 4"]
    assert isinstance(results[3], StoreError)  # the second 2: replayed alone, it fails alone
    assert count(tmp_path / "w.db") == 4
    assert any(len(c) > 1 for c in calls)  # grouped while it worked


async def test_a_full_disk_fails_the_commit_and_the_writer_recovers(writer, tmp_path: Path):
    conn = writer.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    await writer.write(lambda c: c.execute(f"PRAGMA max_page_count={pages + 1}"))
    big = lambda c: c.execute("INSERT INTO t(pad) VALUES (zeroblob(100000))")  # noqa: E731
    with pytest.raises(StoreError, match="full"):
        await writer.write(big)
    assert fault(sqlite3.OperationalError()) is None
    assert writer.failing and not writer.broken and writer.broken_reasons == []
    await writer.write(lambda c: c.execute("PRAGMA max_page_count=1000000"))  # room again
    assert await writer.write(big) is not None
    assert writer.failing is None


async def test_a_failed_fsync_breaks_the_writer_for_good(writer, tmp_path: Path):
    await writer.write(insert(1))

    def fsync_failed(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t(n) VALUES (2)")
        raise failure(sqlite3.SQLITE_IOERR_FSYNC)

    with pytest.raises(StoreError):
        await writer.write(fsync_failed)
    assert writer.broken and writer.broken_reasons == [writer.broken]
    with pytest.raises(StoreError, match="broken"):
        await writer.write(insert(3))  # refused: the process is to exit and be restarted
    assert writer.broken_reasons == [writer.broken]  # reported once
    assert count(tmp_path / "w.db") == 1


@pytest.mark.parametrize("code,kind", [
    (sqlite3.SQLITE_FULL, "failed"),
    (sqlite3.SQLITE_IOERR_WRITE, "failed"),  # EFBIG, EIO on write(): nothing was written
    (sqlite3.SQLITE_IOERR_TRUNCATE, "failed"),
    (sqlite3.SQLITE_IOERR_FSYNC, "broken"),  # the kernel may have dropped what was written
    (sqlite3.SQLITE_IOERR_DIR_FSYNC, "broken"),
    (sqlite3.SQLITE_IOERR_READ, "broken"),
    (sqlite3.SQLITE_CORRUPT, "broken"),
    (sqlite3.SQLITE_NOTADB, "broken"),
    (sqlite3.SQLITE_CONSTRAINT_UNIQUE, None),  # one statement's problem
])
def test_faults_are_sorted_by_what_they_mean_for_the_file(code, kind):
    assert fault(failure(code)) == kind
