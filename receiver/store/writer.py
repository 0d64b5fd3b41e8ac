"""A SQLite file's writer, which *group-commits*: every write requested while the previous
transaction was running is applied in the next single transaction, one COMMIT and one fsync
for the lot. Under load that turns thousands of webhooks a second into a few hundred fsyncs.
A write that raises fails alone: the batch is then replayed with a savepoint per write.

Two writers share that batching (:class:`_Batches`) and differ in where the statements run:

- :class:`GroupCommit` runs them in a thread of its own, with ``synchronous=FULL``: COMMIT
  itself syncs. For the outbox file, written by the worker's planner and dispatcher.
- :class:`LoopCommit` runs them in the event loop and syncs in a thread. For the inbox file,
  written on the webhook answer path. The stdlib ``sqlite3`` module releases the GIL around
  every statement step, so a writer thread must win the GIL back from a busy event loop once
  per step (after up to the 5 ms switch interval each): under load its commits took
  milliseconds, and webhooks waited for them. In the loop the statements take microseconds
  (the file's pages are cached), COMMIT writes the WAL without syncing it
  (``synchronous=NORMAL``), and one thread ``fdatasync``\\s the WAL for every commit made since
  its previous sync. A write's future resolves only after a sync that began after its COMMIT:
  an answered write is on disk as with ``synchronous=FULL``. The same thread checkpoints the
  WAL through a connection of its own, which would otherwise stall a COMMIT in the loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from receiver.store import StoreError

T = TypeVar("T")
Insert = Callable[[sqlite3.Connection, list[Any]], None]
Outcome = list[tuple[bool, Any]] | Exception



class _Op:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]):
        self.fn = fn
        self.future = future


class _Busy(Exception):
    """Another connection holds the file's write lock."""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode == sqlite3.SQLITE_BUSY


class _Batches:
    """One write connection, its thread, and what both writers do with a batch."""

    def __init__(self, name: str, busy_timeout: float) -> None:
        self.busy_timeout = busy_timeout
        self.conn: sqlite3.Connection | None = None
        # why the last commit failed, until one succeeds (readiness: webhooks cannot be stored)
        self.failing: str | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{name}")
        # rows deferred to the end of the running group commit, by insert function
        self._later: dict[Insert, list[Any]] | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the writer's thread (opening, closing, reading through the writer)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def defer(self, conn: sqlite3.Connection, insert: Insert, row: Any) -> None:
        """Insert ``row`` with ``insert`` at the end of the running group commit, together with
        the rows other writes of the batch deferred (one statement, not one per write); at once
        when the batch is being replayed write by write."""
        if self._later is None:
            insert(conn, [row])
        else:
            self._later.setdefault(insert, []).append(row)

    def _apply(self, batch: list[_Op], begin: Callable[[sqlite3.Connection], None]) -> list[tuple[bool, Any]]:
        """Apply a batch in one transaction (``begin`` starts it). Fast path: every op straight
        through. If one raises, the transaction is rolled back and the batch replayed with a
        savepoint per op, so that op fails alone (ops are pure database work, safe to run twice)."""
        conn = self.conn
        assert conn is not None
        begin(conn)
        try:
            try:
                self._later = {}
                results: list[tuple[bool, Any]] = [(True, op.fn(conn)) for op in batch]
                for insert, rows in self._later.items():
                    insert(conn, rows)
            except Exception:
                self._later = None
                conn.execute("ROLLBACK")
                begin(conn)
                results = []
                for op in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        results.append((True, op.fn(conn)))
                    except Exception as exc:
                        conn.execute("ROLLBACK TO op")
                        results.append((False, exc))
                    conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._later = None
        return results

    def _settle(self, batch: list[_Op], outcome: Outcome) -> None:
        """In the loop: answer the writes of a batch."""
        if isinstance(outcome, Exception):
            self.failing = str(outcome)
            err = StoreError(f"outbox write failed: {outcome}")
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(err)
            return
        self.failing = None
        for op, (ok, value) in zip(batch, outcome):
            if op.future.done():
                continue
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(
                    value if isinstance(value, StoreError) else StoreError(f"outbox write failed: {value}")
                )


class GroupCommit(_Batches):
    """Statements and COMMIT (which syncs) in the writer's thread.

    The thread takes the next batch itself as soon as a commit ends, rather than waiting for the
    event loop to hand it over: under load the loop is busy answering the previous batch, and
    the next commit runs meanwhile."""

    def __init__(self, name: str, busy_timeout: float) -> None:
        super().__init__(name, busy_timeout)
        self._lock = threading.Lock()  # guards the two below, shared by the loop and the thread
        self._queue: list[_Op] = []
        self._committing = False  # the thread is committing batches (_drain)

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> sqlite3.Connection:
        self.conn = await self.call(connect)
        return self.conn

    async def close(self) -> None:
        # the thread runs this after the last batch (one thread, jobs in order)
        if self.conn is not None:
            await self.call(self.conn.close)
        self._thread.shutdown(wait=True)
        self.conn = None

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group commit; return once that commit is durable."""
        if self.conn is None:
            raise StoreError("the outbox is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queue.append(_Op(fn, future))
            start, self._committing = not self._committing, True
        if start:
            self._thread.submit(self._drain, loop)
        return await future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the thread: commit batch after batch until the queue is empty."""
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._committing = False
                    return
            try:
                outcome: Outcome = self._apply(batch, self._begin)
            except Exception as exc:  # the COMMIT itself failed: nothing of the batch is stored
                outcome = exc
            loop.call_soon_threadsafe(self._settle, batch, outcome)

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, waiting up to ``busy_timeout`` while another process (the worker,
        another replica) holds the write lock: tries every 0.1 ms at first, then up to 2 ms.
        (SQLite's own busy handler sleeps 1, 2, 5, 10 … ms, far longer than a lock is held.)"""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.0001
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.002)


class LoopCommit(_Batches):
    """Statements and a sync-free COMMIT in the event loop; the WAL's fsync in the thread.

    The connection must be in WAL mode with ``busy_timeout=0``: while another process holds the
    write lock, the batch waits in the loop (``call_later``, 0.1 ms doubling to 2 ms) for up to
    ``busy_timeout``, then fails. Writes requested meanwhile join it."""

    def __init__(self, name: str, busy_timeout: float, *, sync: Callable[[int], None] = os.fdatasync,
                 checkpoint_every: float = 1.0) -> None:
        super().__init__(name, busy_timeout)
        self._sync_fn = sync  # given the WAL's file descriptor
        self._checkpoint_every = checkpoint_every  # seconds, while writes come
        self._queue: list[_Op] = []
        self._timer: asyncio.Handle | None = None  # the next _flush, once scheduled
        self._busy_since: float | None = None
        self._pause = 0.0001
        self._lock = threading.Lock()  # guards the two below, shared by the loop and the thread
        self._unsynced: list[tuple[list[_Op], Outcome]] = []  # committed, not yet on disk
        self._syncing = False  # the thread is syncing (_sync_all)
        self._wal = ""
        self._wal_fd = -1
        self._wal_inode = 0
        self._lost_wal: OSError | None = None  # the WAL file we sync is no longer the file's
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointed = 0.0

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> sqlite3.Connection:
        def setup() -> sqlite3.Connection:
            conn = connect()
            path = conn.execute("PRAGMA database_list").fetchone()[2]
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal" or not path:
                raise StoreError(f"{path or 'an in-memory database'} is not a WAL file")
            conn.execute("PRAGMA synchronous=NORMAL")  # the sync thread makes commits durable
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the sync thread checkpoints
            self._wal = path + "-wal"
            self._wal_fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
            self._wal_inode = os.fstat(self._wal_fd).st_ino
            self._checkpointer = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                                 timeout=0)
            self._checkpointer.execute("PRAGMA synchronous=FULL")
            return conn

        self.conn = await self.call(setup)
        return self.conn

    async def close(self) -> None:
        if self.conn is None:
            return
        for _ in range(2):  # what is queued is committed now, unless the lock is still taken
            if self._timer is not None:
                self._timer.cancel()
                self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queue:  # still waiting for the lock: not written
            self._settle(self._queue, StoreError("the outbox is closing"))
            self._queue = []
        # from here on write() refuses: the loop must not use the connection the thread closes
        conn, self.conn = self.conn, None

        def shut() -> None:  # after the sync thread's last job (one thread, jobs in order)
            for c in (self._checkpointer, conn):
                if c is not None:
                    c.close()
            if self._wal_fd >= 0:
                os.close(self._wal_fd)

        await self.call(shut)
        await asyncio.sleep(0)  # the last batches' answers (call_soon_threadsafe) run
        self._thread.shutdown(wait=True)
        self._checkpointer, self._wal_fd = None, -1

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group commit; return once that commit is durable."""
        if self.conn is None:
            raise StoreError("the outbox is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append(_Op(fn, future))
        if self._timer is None:  # writes requested until the loop comes round join this batch
            self._timer = loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        """In the loop: commit what is queued and hand it to the sync thread."""
        self._timer = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            outcome: Outcome = self._apply(batch, _begin_now)
        except _Busy:
            now = time.monotonic()
            self._busy_since = self._busy_since or now
            if now - self._busy_since <= self.busy_timeout:
                self._queue[:0] = batch  # ahead of the writes requested since
                self._timer = loop.call_later(self._pause, self._flush)
                self._pause = min(self._pause * 2, 0.002)
                return
            outcome = sqlite3.OperationalError("database is locked")
        except Exception as exc:  # the COMMIT itself failed: nothing of the batch is stored
            outcome = exc
        self._busy_since, self._pause = None, 0.0001
        if isinstance(outcome, Exception):
            self._settle(batch, outcome)
            return
        with self._lock:
            self._unsynced.append((batch, outcome))
            start, self._syncing = not self._syncing, True
        if start:
            self._thread.submit(self._sync_all, loop)

    def _sync_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the thread: sync the WAL for every commit made before it, until none is left."""
        while True:
            with self._lock:
                groups, self._unsynced = self._unsynced, []
                if not groups:
                    self._syncing = False
                    return
            error = self._sync_wal()
            loop.call_soon_threadsafe(self._synced, groups, error)
            if time.monotonic() - self._checkpointed >= self._checkpoint_every:
                self._checkpoint()

    def _sync_wal(self) -> Exception | None:
        if self._lost_wal is not None:
            return self._lost_wal
        try:
            self._sync_fn(self._wal_fd)
            return None
        except OSError as exc:
            return exc

    def _checkpoint(self) -> None:
        self._checkpointed = time.monotonic()
        assert self._checkpointer is not None
        try:  # SQLite deletes the WAL only when its last connection closes, and ours is open;
            # checked all the same, since syncing a stale file would answer writes not on disk
            if os.stat(self._wal).st_ino != self._wal_inode:
                raise OSError(f"{self._wal} was replaced")
        except OSError as exc:
            self._lost_wal = exc
        try:  # PASSIVE: copies what no reader needs, never waits; the rest next time
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            pass  # busy (another checkpoint): the worker's or the next one catches up

    def _synced(self, groups: list[tuple[list[_Op], Outcome]], error: Exception | None) -> None:
        """In the loop: a sync ended; answer the batches it covered."""
        for batch, outcome in groups:
            self._settle(batch, outcome if error is None else error)


def _begin_now(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            raise _Busy from None
        raise
