"""One SQLite file's writer: a connection in a thread of its own that *group-commits*.

Every write requested while the previous transaction was running is applied in the next single
transaction, then one COMMIT and one fsync for the lot. Under load that turns thousands of
webhooks a second into a few hundred fsyncs. A write that raises fails alone: the batch is then
replayed with a savepoint per write.

The thread takes the next batch itself as soon as a commit ends, rather than waiting for the
event loop to hand it over: under load the loop is busy answering the previous batch, and the
next commit runs meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from receiver.store import StoreError

T = TypeVar("T")
Insert = Callable[[sqlite3.Connection, list[Any]], None]


class _Op:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]):
        self.fn = fn
        self.future = future


class GroupCommit:
    """Owns one write connection and the one thread that uses it."""

    def __init__(self, name: str, busy_timeout: float) -> None:
        self.busy_timeout = busy_timeout
        self.conn: sqlite3.Connection | None = None
        # why the last commit failed, until one succeeds (readiness: webhooks cannot be stored)
        self.failing: str | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{name}")
        self._lock = threading.Lock()  # guards the two below, shared by the loop and the thread
        self._queue: list[_Op] = []
        self._committing = False  # the thread is committing batches (_drain)
        # rows deferred to the end of the running group commit, by insert function (thread only)
        self._later: dict[Insert, list[Any]] | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the writer's thread (opening, closing, reading through the writer)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

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

    def defer(self, conn: sqlite3.Connection, insert: Insert, row: Any) -> None:
        """Insert ``row`` with ``insert`` at the end of the running group commit, together with
        the rows other writes of the batch deferred (one statement, not one per write); at once
        when the batch is being replayed write by write."""
        if self._later is None:
            insert(conn, [row])
        else:
            self._later.setdefault(insert, []).append(row)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the thread: commit batch after batch until the queue is empty."""
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._committing = False
                    return
            try:
                outcome: list[tuple[bool, Any]] | Exception = self._commit(batch)
            except Exception as exc:  # the COMMIT itself failed: nothing of the batch is stored
                outcome = exc
            loop.call_soon_threadsafe(self._settle, batch, outcome)

    def _settle(self, batch: list[_Op], outcome: list[tuple[bool, Any]] | Exception) -> None:
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
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _commit(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Apply a batch in one transaction. Fast path: every op straight through. If one
        raises, the transaction is rolled back and the batch replayed with a savepoint per op,
        so that op fails alone (ops are pure database work, safe to run twice)."""
        conn = self.conn
        assert conn is not None
        self._begin(conn)
        try:
            try:
                self._later = {}
                results: list[tuple[bool, Any]] = [(True, op.fn(conn)) for op in batch]
                for insert, rows in self._later.items():
                    insert(conn, rows)
            except Exception:
                self._later = None
                conn.execute("ROLLBACK")
                self._begin(conn)
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
