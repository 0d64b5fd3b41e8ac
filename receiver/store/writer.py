"""A SQLite file's one writer, which *group-commits*: every write requested while the previous
transaction ran goes into the next single transaction, one COMMIT (one fsync) for the lot. A write
returns only once the COMMIT that holds it is durable.

Writes of the same kind can be *grouped* (:meth:`Writer.add`): one call applies all of a batch's
items, so a thousand webhooks a second cost a few statements per commit rather than a few per
webhook (each statement hands the GIL between this thread and the event loop twice).

A write that raises fails alone: the batch is replayed with a savepoint per write. A fault of the
database itself fails the whole batch, and is sorted by what it means (:func:`fault`):

- ``failed``: a write that did not happen (no space left, a file size limit, a write error).
  SQLite rolled the transaction back and the file is as it was; later writes may succeed.
- ``broken``: what SQLite believed written may not be (a failed fsync), or the file is damaged
  (corruption, a failed read). The writer refuses every later write and reports the fault once
  (``on_broken``); the process exits, and SQLite recovers the file when it is opened again.

Statements run in the writer's own thread; the stdlib ``sqlite3`` module releases the GIL while
SQLite works, so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from receiver.store import StoreError

T = TypeVar("T")
log = logging.getLogger("sms_receiver.store")
Outcome = tuple[list[tuple[bool, Any]], bool] | BaseException  # (results, wrote) or the failure

# Extended codes of a write that did not happen: ENOSPC, EFBIG, EIO on write(), a failed truncate
# or shared-memory growth, no memory for the I/O, no directory for a temporary file.
_NOT_WRITTEN = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_TRUNCATE,
                sqlite3.SQLITE_IOERR_SHMSIZE, sqlite3.SQLITE_IOERR_NOMEM,
                sqlite3.SQLITE_IOERR_GETTEMPPATH}
_BROKEN = {sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


def fault(exc: BaseException) -> Literal["failed", "broken"] | None:
    """What a failure of SQLite says about the file; None for a failure of one statement (a
    constraint, a bug) that leaves the file as sound as before."""
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    if code is None:
        return None
    if code in _NOT_WRITTEN or code & 0xFF == sqlite3.SQLITE_FULL:
        return "failed"
    return "broken" if code & 0xFF in _BROKEN else None


Group = Callable[[sqlite3.Connection, list[Any]], list[Any]]


class _Op:
    """A write: ``fn(conn)``, or ``item`` applied with its group's others by ``group``."""

    __slots__ = ("fn", "group", "item", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any] | None, group: Group | None,
                 item: Any, future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.group = group
        self.item = item
        self.future = future


def _run(conn: sqlite3.Connection, ops: list[_Op]) -> list[Any]:
    """Apply ops in one go: plain ones one by one, grouped ones one call per group (each
    group's items in the order they came), results in the order of ``ops``."""
    results: list[Any] = [None] * len(ops)
    groups: dict[Group, list[int]] = {}
    for i, op in enumerate(ops):
        if op.group is None:
            assert op.fn is not None
            results[i] = op.fn(conn)
        else:
            groups.setdefault(op.group, []).append(i)
    for group, indexes in groups.items():
        for i, value in zip(indexes, group(conn, [ops[i].item for i in indexes]), strict=True):
            results[i] = value
    return results


class Writer:
    """One write connection, its thread, and the queue of writes waiting for the next commit."""

    def __init__(self, name: str, on_broken: Callable[[str], None],
                 on_commit: Callable[[], None] = lambda: None) -> None:
        self.conn: sqlite3.Connection | None = None
        self._on_commit = on_commit  # in the loop, after each successful commit
        self.failing: str | None = None  # why the last commit failed, until one that wrote succeeds
        self.failing_since: float | None = None  # monotonic: when commits began to fail
        self.disk_full = False  # they fail because the disk is full (room will come back)
        self.broken: str | None = None  # a fault that ended this writer
        self.busy_since: float | None = None  # monotonic: when the running batch began
        self._checkpoint_due = False  # checkpoint from this connection before the next batch
        self._on_broken = on_broken
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._lock = threading.Lock()  # guards the two below, shared by the loop and the thread
        self._queue: list[_Op] = []
        self._committing = False  # the thread is committing batches (_drain)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the writer's thread, outside any batch (opening, closing)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def close(self) -> None:
        if self.conn is not None:
            await self.call(self.conn.close)  # one thread: after the last batch
            self.conn = None
        self._thread.shutdown(wait=True)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group commit; return what it returned once that is durable.
        ``fn`` must do database work only: it may run twice (a batch replayed)."""
        return await self._submit(fn, None, None)  # type: ignore[no-any-return]

    async def add(self, group: Group, item: Any) -> Any:
        """Apply ``item`` in the next group commit together with the other items of ``group``
        (one call ``group(conn, items)``, which returns one result per item); return its result
        once durable. Should the call raise, each item is replayed alone."""
        return await self._submit(None, group, item)

    async def _submit(self, fn: Callable[[sqlite3.Connection], Any] | None, group: Group | None,
                      item: Any) -> Any:
        if self.broken is not None:
            raise StoreError(f"the outbox is broken ({self.broken}); the receiver is stopping")
        if self.conn is None:
            raise StoreError("the outbox is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._queue.append(_Op(fn, group, item, future))
            start, self._committing = not self._committing, True
        if start:
            self._thread.submit(self._drain, loop)
        return await future

    def checkpoint_soon(self) -> None:
        """Checkpoint the WAL from the writer's connection before its next batch. Between two
        commits nothing writes, so every frame is copied and the next commit starts the WAL
        over: a checkpoint from another connection never catches a writer that never pauses."""
        self._checkpoint_due = True

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the thread: commit batch after batch until the queue is empty. The thread takes the
        next batch itself, rather than waiting for the busy event loop to hand it over."""
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._committing = False
                    return
            self.busy_since = time.monotonic()  # a checkpoint that hangs is a stall too
            try:
                if self._checkpoint_due:
                    self._checkpoint(loop)
                outcome: Outcome = self._apply(batch)
            except Exception as exc:  # the batch, or its COMMIT, failed: nothing of it is stored
                outcome = exc
            finally:
                self.busy_since = None
            loop.call_soon_threadsafe(self._settle, batch, outcome)

    def _apply(self, batch: list[_Op]) -> tuple[list[tuple[bool, Any]], bool]:
        """The batch's results, and whether its commit wrote anything (a commit of no change
        writes nothing to disk, so it says nothing of whether writes work)."""
        conn = self.conn
        assert conn is not None
        changes = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            try:
                results: list[tuple[bool, Any]] = [(True, value) for value in _run(conn, batch)]
            except Exception as exc:
                if fault(exc):
                    raise
                conn.execute("ROLLBACK")  # replayed so that the op that raised fails alone
                conn.execute("BEGIN IMMEDIATE")
                results = []
                for op in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        results.append((True, _run(conn, [op])[0]))
                    except Exception as exc:
                        if fault(exc):
                            raise
                        conn.execute("ROLLBACK TO op")
                        results.append((False, exc))
                    conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back already (a failed COMMIT), or cannot: the fault says
            raise
        return results, conn.total_changes != changes

    def _checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the thread, between two commits: see :meth:`checkpoint_soon`."""
        self._checkpoint_due = False
        assert self.conn is not None
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception as exc:  # the WAL keeps its frames; the commit after it says if writes work
            loop.call_soon_threadsafe(self._checkpoint_failed, exc)

    def _checkpoint_failed(self, exc: Exception) -> None:
        if fault(exc) != "broken":
            log.warning("WAL checkpoint by the writer failed (the WAL grows until one works): %s", exc)
        elif self.broken is None:
            self.broken = str(exc)
            self._on_broken(self.broken)

    def _settle(self, batch: list[_Op], outcome: Outcome) -> None:
        """In the loop: answer the writes of a batch."""
        if isinstance(outcome, BaseException):
            kind = fault(outcome)
            reason = str(outcome)
            if self.failing is None:
                self.failing_since = time.monotonic()
            self.failing = reason
            self.disk_full = getattr(outcome, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL
            if kind == "broken" and self.broken is None:
                self.broken = reason
                self._on_broken(reason)
            error = StoreError(f"outbox write failed: {reason}")
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(error)
            return
        results, wrote = outcome
        if wrote:
            self.failing = self.failing_since = None
        self._on_commit()
        for op, (ok, value) in zip(batch, results):
            if op.future.done():
                continue
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(StoreError(f"outbox write failed: {value}"))
