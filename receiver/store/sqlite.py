"""The embedded outbox: one SQLite file in WAL mode with ``synchronous=FULL`` (a COMMIT returns
once its WAL frames are fsync'd, so what was answered survives a power loss), written by one
group-committing :class:`~receiver.store.writer.Writer` and read through a connection of its own.

The WAL is checkpointed (copied into the database file, which is then fsync'd) by a connection
and thread of its own, at most every :data:`CHECKPOINT_INTERVAL`, rather than inside a COMMIT:
a checkpoint takes milliseconds to tens of them, and every webhook of that commit would wait.
Such a checkpoint never waits for the writer, so under a steady stream of commits the WAL could
never start over and would grow until the disk is full: once it holds more than
:data:`WAL_LIMIT` frames and did not start over since the last checkpoint, the writer itself
checkpoints between two batches (copying what the checkpointer has not and syncing the database
file: commits wait a few milliseconds) and the WAL starts over. A checkpoint from the other
connection that waited for the writer would stall commits on SQLite's busy handler instead:
200-300 ms at 1M stored messages, measured.

One process owns the file: :func:`lock` takes an exclusive ``flock`` on ``<file>.lock`` before
anything is opened, and a second ``sms-receiver run`` on the same path refuses to start, naming
the holder's pid. Because nothing else can be sending, the claims of a process that died are
released when the file is opened: their messages are due at once instead of after their lease.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from receiver.models import MessageState, NewMessage, RecipientState
from receiver.store import (
    Changes,
    GroupCounts,
    HistoryPage,
    HistoryQuery,
    MessageQuery,
    MessageRecord,
    NewAck,
    NumberHistory,
    OutboxStats,
    PageRecord,
    Planned,
    Received,
    Result,
    StoreError,
    StoreUsage,
    sql,
    twoway_sql,
)
from receiver.store.schema import SchemaError, migrate
from receiver.store.writer import Writer, fault

T = TypeVar("T")
log = logging.getLogger("sms_receiver.store")

CHECKPOINT_INTERVAL = 0.5  # seconds between WAL checkpoints, at most
WAL_LIMIT = 16384  # frames (pages of 4 KiB: 64 MiB) in the WAL beyond which the writer checkpoints
# How long a commit may run, and writes may fail for another reason than a full disk, before the
# store is in trouble: a restart (liveness) is then the way out. A full disk is waited out: a
# restart makes no room, and would drop the results this process still has to record.
STALL_LIMIT = 60.0
FAILING_LIMIT = 300.0


def lock(path: str) -> int:
    """Hold ``<path>.lock`` exclusively for as long as this process lives (the kernel drops the
    lock when it dies, however it dies); return its descriptor. Raise :class:`StoreError`
    naming the path and the holder's pid when another process has it. The lock is beside the
    file the path leads to: a symlink to an outbox in use is refused too."""
    path = os.path.realpath(path)
    name = f"{path}.lock"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise StoreError(
            f"storage {path} is in use by another sms-receiver (pid {holder}, lock {name}): "
            "one process owns an SQLite outbox; stop the other one first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a COMMIT is on disk when it returns
    # Sorts and statement journals in memory, never in a temporary file: the process may have no
    # writable directory but the outbox's (a read-only root filesystem, tests/test_deploy.py)
    conn.execute("PRAGMA temp_store=MEMORY")
    # A WAL that grew past this (a reader held it in a storm) is cut back to it when it restarts;
    # below it, the file is reused as it is, without growing (a commit that grows it syncs slower)
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT * 4096 * 2}")
    return conn


class SQLiteStore:
    def __init__(self, path: str, *, on_broken: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.broken: str | None = None
        self.shared = False  # one process owns the file (its lock)
        self._on_broken_cb = on_broken
        self._lock_fd: int | None = None
        self._w = Writer("sqlite-writer", self._on_broken, self._committed)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._r: sqlite3.Connection | None = None
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._ck: sqlite3.Connection | None = None
        self._checkpoint: asyncio.Future[int | None] | None = None  # running
        self._wal_frames = 0  # in the WAL after the last checkpoint
        self._next_checkpoint = 0.0  # monotonic
        self._deciding = asyncio.Lock()
        self._released = 0  # claims of a dead process released at open

    def _on_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            self._w.broken = self._w.broken or reason  # a fault seen by a read stops writes too
            log.critical("the outbox %s failed (%s): what is on disk may not be what was "
                         "reported; stopping so that it is reopened and recovered", self.path, reason)
            if self._on_broken_cb is not None:
                self._on_broken_cb(reason)

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        if sqlite3.sqlite_version_info < (3, 35):  # RETURNING, UPDATE … FROM
            raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old for the outbox: 3.35 or "
                             "newer is needed (Python's sqlite3 module links the system's)")
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = lock(self.path)
            self._w.conn = await self._w.call(self._setup)
            loop = asyncio.get_running_loop()
            self._r = await loop.run_in_executor(self._reader, self._connect_reader)
            self._ck = await loop.run_in_executor(self._checkpointer, _connect, self.path)
        except StoreError:
            await self.close()
            raise
        except (sqlite3.Error, OSError, SchemaError) as exc:
            await self.close()
            raise StoreError(f"cannot open the outbox {self.path}: {exc}") from exc

    def _setup(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job, not a COMMIT's
        try:
            migrate(conn)
            # This process holds the lock: claims still marked sending are a dead process's.
            released = conn.execute(
                "UPDATE messages SET state='pending', lease_until=NULL WHERE state='sending'"
            ).rowcount
            # Notifications that could not be planned: a new start (a fixed release) tries again.
            retried = conn.execute("UPDATE notifications SET error=NULL WHERE error IS NOT NULL").rowcount
        except BaseException:
            conn.close()
            raise
        self._released = released
        if released:
            log.warning("%d message(s) were being sent when the receiver stopped: due again now "
                        "(Clickatell may have accepted some: see Delivery guarantees)", released)
        if retried:
            log.warning("%d notification(s) that could not be planned before are tried again", retried)
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        conn.execute("PRAGMA query_only=1")
        return conn

    def _committed(self) -> None:
        """After a commit: checkpoint the WAL in the background, unless one runs or ran lately."""
        if self._ck is None or self._checkpoint is not None or time.monotonic() < self._next_checkpoint:
            return
        self._next_checkpoint = time.monotonic() + CHECKPOINT_INTERVAL
        self._checkpoint = asyncio.get_running_loop().run_in_executor(
            self._checkpointer, self._run_checkpoint, self._ck)
        self._checkpoint.add_done_callback(self._checkpointed)

    @staticmethod
    def _run_checkpoint(conn: sqlite3.Connection) -> int | None:
        """PASSIVE: copies what it can without waiting for (or blocking) the writer and readers;
        returns the frames the WAL holds, None when the writer's own checkpoint was running."""
        busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return None if busy else int(frames)

    def _checkpointed(self, done: asyncio.Future[int | None]) -> None:
        self._checkpoint = None
        exc = None if done.cancelled() else done.exception()
        if exc is None:
            frames, previous = done.result(), self._wal_frames
            if frames is not None:
                self._wal_frames = frames
                if frames > WAL_LIMIT and frames >= previous:  # past the limit, not starting over
                    self._w.checkpoint_soon()
            return
        if fault(exc) == "broken":
            self._on_broken(str(exc))
        else:  # the WAL keeps it; the next checkpoint tries again
            log.warning("WAL checkpoint failed: %s", exc)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        for conn, thread in ((self._r, self._reader), (self._ck, self._checkpointer)):
            if conn is not None:
                await loop.run_in_executor(thread, conn.close)
        self._r = self._ck = None
        await self._w.close()
        self._reader.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- plumbing -------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._r
        if conn is None:
            raise StoreError("the outbox is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)
        except sqlite3.Error as exc:
            if fault(exc) == "broken":
                self._on_broken(str(exc))
            raise StoreError(f"outbox read failed: {exc}") from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._w.write(fn)

    def trouble(self) -> str | None:
        """Why the store cannot be trusted to accept again without a restart, if it cannot."""
        now = time.monotonic()
        w = self._w
        if self.broken is not None:
            return f"the outbox failed: {self.broken}"
        if w.busy_since is not None and now - w.busy_since > STALL_LIMIT:
            return f"an outbox commit has been running for {now - w.busy_since:.0f} s"
        if w.failing is not None and not w.disk_full and w.failing_since is not None \
                and now - w.failing_since > FAILING_LIMIT:
            return f"outbox writes have failed for {now - w.failing_since:.0f} s: {w.failing}"
        return None

    async def ping(self) -> None:
        """Raises while the outbox cannot be read, or written: after a failed commit, a probe
        row is written to learn whether writes work again (a full disk with room again)."""
        if self.broken is not None:
            raise StoreError(f"the outbox is broken: {self.broken}")
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())
        if self._w.failing is not None:
            await self._write(lambda conn: conn.execute(
                "INSERT INTO probe(id, at) VALUES (1, julianday('now')) "
                "ON CONFLICT(id) DO UPDATE SET at=excluded.at"))

    # -- the protocol: each method one read or one write of statements from sql.py ----------

    async def receive(self, notification: Received, key: str, window: float) -> bool:
        return bool(await self._w.add(sql.receive, (notification, key, window)))

    async def accept(self, messages: Sequence[NewMessage], now: float) -> None:
        await self._write(lambda conn: sql.insert(conn, messages, now))

    async def unplanned(self, limit: int) -> list[Received]:
        return await self._read(lambda conn: sql.unplanned(conn, limit))

    async def planned(self, plans: Sequence[Planned]) -> None:
        await self._write(lambda conn: sql.planned(conn, plans, twoway_sql.insert_pages))

    async def received(self, notification_id: str) -> Received | None:
        return await self._read(lambda conn: sql.received(conn, notification_id))

    async def claim(self, now: float, limit: int, lease: float,
                    exclude: Sequence[str] = ()) -> list[MessageRecord]:
        skip = set(exclude)
        return await self._write(lambda conn: sql.claim(conn, now, limit, lease, skip))

    async def finish(self, result: Result) -> MessageState:
        state: MessageState = await self._w.add(sql.finish, result)
        return state

    async def retry_now(self, now: float) -> int:
        return await self._write(lambda conn: sql.retry_now(conn, now))

    async def history(self, numbers: Sequence[str], since: float) -> dict[str, NumberHistory]:
        return await self._read(lambda conn: sql.history(conn, numbers, since))

    async def held_messages(self, now: float) -> list[MessageRecord]:
        return await self._read(lambda conn: sql.held_messages(conn, now))

    async def held_numbers(self, now: float) -> dict[str, list[MessageRecord]]:
        return await self._read(lambda conn: sql.held_numbers(conn, now))

    async def apply(self, changes: Changes) -> None:
        await self._write(lambda conn: sql.apply(conn, changes))

    @asynccontextmanager
    async def deciding(self) -> AsyncIterator[SQLiteStore]:
        """One decider at a time in this process, the only one on the file (its lock)."""
        async with self._deciding:
            yield self

    def usage(self) -> StoreUsage:
        return StoreUsage("sqlite", claims_taken_over=self._released)

    async def delivery_report(self, api_message_id: str, status: str,
                              final_state: RecipientState | None, now: float,
                              message_id: str | None = None) -> bool:
        if not message_id:  # searched by the reader: the writer's commits do not wait for it
            message_id = await self._read(lambda conn: sql.reported_message(conn, api_message_id, now))
            if message_id is None:
                return False
        mid = message_id
        return await self._write(lambda conn: sql.delivery_report(
            conn, api_message_id, status, final_state, now, mid))

    async def get_message(self, message_id: str) -> MessageRecord | None:
        return await self._read(lambda conn: sql.get_message(conn, message_id))

    async def list_messages(self, query: MessageQuery) -> list[MessageRecord]:
        return await self._read(lambda conn: sql.list_messages(conn, query))

    async def stats(self) -> OutboxStats:
        return await self._read(sql.stats)

    async def prune(self, before: float, keys_before: float, sends_before: float,
                    limit: int = 10_000) -> int:
        return await self._write(lambda conn: sql.prune(conn, before, keys_before, sends_before, limit)
                                 + twoway_sql.prune_pages(conn, before, limit))

    # -- the history page (receiver.ui) ---------------------------------------------------------

    async def message_history(self, query: HistoryQuery) -> HistoryPage:
        return await self._read(lambda conn: sql.message_history(conn, query))

    async def group_counts(self, since: float) -> list[GroupCounts]:
        return await self._read(lambda conn: sql.group_counts(conn, since))

    # -- the urgent ceiling (receiver.paging) ----------------------------------------------------

    async def urgent_sends(self, numbers: Sequence[str], since: float, created_since: float,
                           rank: int) -> dict[str, list[float]]:
        return await self._read(lambda conn: sql.urgent_sends(conn, numbers, since, created_since, rank))

    # -- two-way paging --------------------------------------------------------------------------

    async def allocate_refs(self, n: int) -> list[int]:
        return await self._write(lambda conn: twoway_sql.allocate_refs(conn, n))

    async def page(self, ref: int) -> PageRecord | None:
        return await self._read(lambda conn: twoway_sql.page(conn, ref))

    async def last_page(self, number: str) -> PageRecord | None:
        return await self._read(lambda conn: twoway_sql.last_page(conn, number))

    async def pages_of(self, message_ids: Sequence[str]) -> dict[str, PageRecord]:
        return await self._read(lambda conn: twoway_sql.pages_of(conn, message_ids))

    async def reply_seen(self, reply_id: str, number: str, at: float, action: str) -> bool:
        return await self._write(lambda conn: twoway_sql.reply_seen(conn, reply_id, number, at, action))

    async def replied_since(self, number: str, action: str, since: float) -> int:
        return await self._read(lambda conn: twoway_sql.replied_since(conn, number, action, since))

    async def ack(self, ack: NewAck) -> bool:
        return await self._write(lambda conn: twoway_sql.ack(conn, ack))

    async def ack_outcome(self, reply_id: str, silence_ids: Sequence[str], outcome: str) -> None:
        await self._write(lambda conn: twoway_sql.ack_outcome(conn, reply_id, silence_ids, outcome))

    async def unack(self, ref: int, at: float, escalate_at: float | None) -> list[str]:
        return await self._write(lambda conn: twoway_sql.unack(conn, ref, at, escalate_at))

    async def escalate_at(self, ref: int, at: float) -> bool:
        return await self._write(lambda conn: twoway_sql.escalate_at(conn, ref, at))

    async def due_escalations(self, now: float, limit: int) -> list[PageRecord]:
        return await self._read(lambda conn: twoway_sql.due_escalations(conn, now, limit))

    async def escalated(self, ref: int, rounds: int, next_at: float | None, at: float,
                        messages: Sequence[NewMessage], groups: Sequence[str]) -> bool:
        return await self._write(lambda conn: twoway_sql.escalated(conn, ref, rounds, next_at, at, messages, groups))
