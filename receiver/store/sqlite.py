"""The embedded outbox: one SQLite file in WAL mode with ``synchronous=FULL`` (a COMMIT returns
once its WAL frames are fsync'd, so what was answered survives a power loss), written by one
group-committing :class:`~receiver.store.writer.Writer` and read through a connection of its own.

The WAL is checkpointed (copied into the database file, which is then fsync'd) by a connection
and thread of its own, at most every :data:`CHECKPOINT_INTERVAL`, rather than inside a COMMIT:
a checkpoint takes milliseconds to tens of them, and every webhook of that commit would wait.

One process owns the file: :func:`lock` takes an exclusive ``flock`` on ``<file>.lock`` before
anything is opened, and a second ``sms-receiver run`` on the same path refuses to start, naming
the holder's pid. Because nothing else can be sending, the claims of a process that died are
released when the file is opened: their messages are due at once instead of after their lease.
"""

from __future__ import annotations

import asyncio
import errno
import time
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from receiver.models import FINISHED_STATES, Item, MessageState, NewMessage, RecipientState, message_state
from receiver.store import (
    REPORT_WINDOW,
    Changes,
    MessageQuery,
    MessageRecord,
    NumberHistory,
    OutboxStats,
    Planned,
    Received,
    RecipientRecord,
    Result,
    StoreError,
)
from receiver.store.schema import SchemaError, migrate
from receiver.store.writer import Writer, fault

T = TypeVar("T")
log = logging.getLogger("sms_receiver.store")

CHECKPOINT_INTERVAL = 0.5  # seconds between WAL checkpoints, at most

_MESSAGE_COLUMNS = (
    "id, created_at, source, group_id, level, status, text, encoding, parts, alert_count, state, "
    "attempts, next_attempt_at, updated_at, priority, template_error, last_error, accepted_at, "
    "hold_reason, bundle_id, items"
)
_RECIPIENT_COLUMNS = (
    "number, state, api_message_id, error_code, error, delivery_status, updated_at, hold_until, "
    "bundle_id, admitted"
)
_FINISHED = "(" + ",".join(f"'{s}'" for s in FINISHED_STATES) + ")"


def lock(path: str) -> int:
    """Hold ``<path>.lock`` exclusively for as long as this process lives (the kernel drops the
    lock when it dies, however it dies); return its descriptor. Raise :class:`StoreError`
    naming the path and the holder's pid when another process has it."""
    path = os.path.abspath(path)
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
    return conn


class SQLiteStore:
    def __init__(self, path: str, *, on_broken: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.broken: str | None = None
        self._on_broken_cb = on_broken
        self._lock_fd: int | None = None
        self._w = Writer("sqlite-writer", self._on_broken, self._committed)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._r: sqlite3.Connection | None = None
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._ck: sqlite3.Connection | None = None
        self._checkpoint: asyncio.Future[None] | None = None  # running
        self._next_checkpoint = 0.0  # monotonic

    def _on_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.critical("the outbox %s failed (%s): what is on disk may not be what was "
                         "reported; stopping so that it is reopened and recovered", self.path, reason)
            if self._on_broken_cb is not None:
                self._on_broken_cb(reason)

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
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
        except BaseException:
            conn.close()
            raise
        if released:
            log.warning("%d message(s) were being sent when the receiver stopped: due again now "
                        "(Clickatell may have accepted some: see Delivery guarantees)", released)
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
    def _run_checkpoint(conn: sqlite3.Connection) -> None:
        # PASSIVE: copies what it can without waiting for (or blocking) the writer and readers
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        self._checkpoint = None
        exc = None if done.cancelled() else done.exception()
        if exc is None:
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

    # -- intake and planning -------------------------------------------------------------------

    async def receive(self, notification: Received, key: str, window: float) -> bool:
        return bool(await self._w.add(_receive, (notification, key, window)))

    async def accept(self, messages: Sequence[NewMessage], now: float) -> None:
        await self._write(lambda conn: _insert(conn, messages, now))

    async def unplanned(self, limit: int) -> list[Received]:
        return await self._read(lambda conn: [Received(*row) for row in conn.execute(
            "SELECT id, received_at, source, body FROM notifications WHERE error IS NULL "
            "ORDER BY id LIMIT ?", (limit,))])

    async def planned(self, plans: Sequence[Planned]) -> None:
        def store(conn: sqlite3.Connection, plans: Sequence[Planned]) -> None:
            _insert(conn, [m for p in plans for m in p.messages], [p.received_at for p in plans
                                                                  for _ in p.messages])
            for chunk in _chunks([p.notification_id for p in plans]):
                conn.execute(f"DELETE FROM notifications WHERE id IN ({','.join('?' * len(chunk))})", chunk)

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE notifications SET error=? WHERE id=?",
                             [(p.error, p.notification_id) for p in plans if p.error is not None])
            done = [p for p in plans if p.error is None]
            conn.execute("SAVEPOINT plans")
            try:
                store(conn, done)
            except sqlite3.Error as exc:
                if fault(exc):
                    raise
                conn.execute("ROLLBACK TO plans")
                for plan in done:  # one by one: a plan the database refuses (a bug) keeps its error
                    conn.execute("SAVEPOINT plan")
                    try:
                        store(conn, [plan])
                    except sqlite3.Error as exc:
                        if fault(exc):
                            raise
                        conn.execute("ROLLBACK TO plan")
                        conn.execute("UPDATE notifications SET error=? WHERE id=?",
                                     (f"cannot store its messages: {exc}", plan.notification_id))
                    conn.execute("RELEASE plan")
            conn.execute("RELEASE plans")

        await self._write(op)

    async def received(self, notification_id: str) -> Received | None:
        def q(conn: sqlite3.Connection) -> Received | None:
            row = conn.execute("SELECT id, received_at, source, body, error FROM notifications "
                               "WHERE id=?", (notification_id,)).fetchone()
            return None if row is None else Received(*row)

        return await self._read(q)

    # -- sending --------------------------------------------------------------------------------

    async def claim(self, now: float, limit: int, lease: float,
                    exclude: Sequence[str] = ()) -> list[MessageRecord]:
        skip = set(exclude)

        def op(conn: sqlite3.Connection) -> list[MessageRecord]:
            due = [r[0] for r in conn.execute(
                "SELECT id FROM messages WHERE state='pending' AND next_attempt_at<=? "
                "ORDER BY priority, next_attempt_at LIMIT ?", (now, limit + len(skip)),
            ) if r[0] not in skip][:limit]
            if len(due) < limit:  # leases that ran out
                due += [r[0] for r in conn.execute(
                    "SELECT id FROM messages WHERE state='sending' AND lease_until<=? "
                    "ORDER BY lease_until LIMIT ?", (now, limit - len(due) + len(skip)),
                ) if r[0] not in skip][: limit - len(due)]
            if not due:
                return []
            rows = conn.execute(
                f"UPDATE messages SET state='sending', lease_until=?, attempts=attempts+1, "
                f"updated_at=? WHERE id IN ({','.join('?' * len(due))}) RETURNING {_MESSAGE_COLUMNS}",
                (now + lease, now, *due),
            ).fetchall()
            rows.sort(key=lambda r: (r[14], r[12]))  # priority, next_attempt_at
            return _with_recipients(conn, rows)

        return await self._write(op)

    async def finish(self, result: Result) -> MessageState:
        state: MessageState = await self._w.add(_finish, result)
        return state

    async def retry_now(self, now: float) -> int:
        return await self._write(lambda conn: conn.execute(
            "UPDATE messages SET next_attempt_at=? WHERE state='pending' AND next_attempt_at>?",
            (now, now)).rowcount)

    # -- holds ----------------------------------------------------------------------------------

    async def history(self, numbers: Sequence[str], since: float) -> dict[str, NumberHistory]:
        def q(conn: sqlite3.Connection) -> dict[str, NumberHistory]:
            out = {n: NumberHistory([], False) for n in numbers}
            for chunk in _chunks(list(numbers)):
                marks = ",".join("?" * len(chunk))
                for number, at in conn.execute(
                        f"SELECT number, sent_at FROM sends WHERE number IN ({marks}) AND sent_at>?",
                        (*chunk, since)):
                    out[number].sent_at.append(at)
                for (number,) in conn.execute(
                        f"SELECT DISTINCT number FROM recipients INDEXED BY recipients_held "
                        f"WHERE state='held' AND number IN ({marks})", chunk):
                    out[number] = NumberHistory(out[number].sent_at, True)
            return out

        return await self._read(q)

    async def held_messages(self, now: float) -> list[MessageRecord]:
        return await self._read(lambda conn: _with_recipients(conn, conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE state='held' AND hold_reason<>'throttle' "
            "AND next_attempt_at<=? ORDER BY created_at", (now,)).fetchall()))

    async def held_numbers(self, now: float) -> dict[str, list[MessageRecord]]:
        def q(conn: sqlite3.Connection) -> dict[str, list[MessageRecord]]:
            numbers = [r[0] for r in conn.execute(
                "SELECT number FROM recipients INDEXED BY recipients_held WHERE state='held' "
                "GROUP BY number HAVING min(hold_until)<=?", (now,))]
            out = {}
            for number in numbers:
                rows = conn.execute(
                    f"SELECT {', '.join('m.' + c.strip() for c in _MESSAGE_COLUMNS.split(','))} "
                    "FROM recipients r JOIN messages m ON m.id=r.message_id "
                    "WHERE r.number=? AND r.state='held' ORDER BY m.created_at", (number,)).fetchall()
                out[number] = _with_recipients(conn, rows)
            return out

        return await self._read(q)

    async def apply(self, changes: Changes) -> None:
        c, at = changes, changes.at

        def op(conn: sqlite3.Connection) -> None:
            if c.messages:
                _insert(conn, c.messages, at)
            conn.executemany("INSERT INTO sends(number, sent_at) VALUES (?,?)", [(n, at) for n in c.sends])
            conn.executemany("UPDATE recipients SET admitted=1 WHERE message_id=? AND number=?", c.admitted)
            conn.executemany(
                "UPDATE recipients SET state='held', hold_until=?, updated_at=? "
                "WHERE message_id=? AND number=? AND state IN ('pending','held')",
                [(until, at, mid, number) for mid, number, until in c.holds])
            for mid in dict.fromkeys(mid for mid, _, _ in c.holds):
                _settle_idle(conn, mid, at, "throttle")
            for fold in c.folds:
                _fold(conn, fold.message_ids, fold.bundle_id, at, fold.number)

        await self._write(op)

    # -- reporting and housekeeping -----------------------------------------------------------

    async def delivery_report(self, api_message_id: str, status: str,
                              final_state: RecipientState | None, now: float,
                              message_id: str | None = None) -> bool:
        # by primary key prefix: the message's own recipients, or (no clientMessageId) the
        # messages of the last REPORT_WINDOW, whose ids start with their creation time
        if message_id:
            where, key = "message_id=? AND api_message_id=?", message_id
        else:
            where, key = "message_id>=? AND api_message_id=?", f"{int((now - REPORT_WINDOW) * 1000):011x}"

        def op(conn: sqlite3.Connection) -> bool:
            found = conn.execute(
                f"UPDATE recipients SET delivery_status=?, updated_at=? WHERE {where} "
                "AND state NOT IN ('delivered','undelivered')",  # reports can arrive out of order
                (status, now, key, api_message_id),
            ).rowcount
            if final_state is not None:
                conn.execute(f"UPDATE recipients SET state=? WHERE {where} AND state='accepted'",
                             (final_state, key, api_message_id))
            if not found:
                found = conn.execute(f"SELECT 1 FROM recipients WHERE {where}",
                                     (key, api_message_id)).fetchone() is not None
            return bool(found)

        return await self._write(op)

    async def get_message(self, message_id: str) -> MessageRecord | None:
        def q(conn: sqlite3.Connection) -> MessageRecord | None:
            found = _with_recipients(conn, conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id=?", (message_id,)).fetchall())
            return found[0] if found else None

        return await self._read(q)

    async def list_messages(self, query: MessageQuery) -> list[MessageRecord]:
        where, args = [], []
        if query.group:
            where.append("group_id=?")
            args.append(query.group)
        if query.state:
            where.append("state=?")
            args.append(query.state)
        if query.since is not None:
            where.append("created_at>=?")
            args.append(query.since)
        if query.notification:  # message ids start with their notification's (hex): a key range
            where.append("id>=? AND id<?")
            args += [query.notification, query.notification + "g"]
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(query.limit)
        return await self._read(lambda conn: _with_recipients(conn, conn.execute(sql, args).fetchall()))

    async def stats(self) -> OutboxStats:
        def q(conn: sqlite3.Connection) -> OutboxStats:
            by_state = dict(conn.execute("SELECT state, n FROM message_states"))
            oldest = conn.execute("SELECT min(created_at) FROM messages "
                                  "WHERE state IN ('pending','sending')").fetchone()[0]
            held = conn.execute("SELECT count(*) FROM recipients INDEXED BY recipients_held "
                                "WHERE state='held'").fetchone()[0]
            unplanned, failed, first = conn.execute(
                "SELECT count(*), count(error), min(CASE WHEN error IS NULL THEN received_at END) "
                "FROM notifications").fetchone()
            if first is not None and (oldest is None or first < oldest):
                oldest = first  # waiting to be planned is waiting too
            return OutboxStats(
                pending=by_state.get("pending", 0) + by_state.get("sending", 0),
                oldest_pending_created_at=oldest, by_state=by_state, held_recipients=held,
                unplanned=unplanned - failed, unplanned_failed=failed)

        return await self._read(q)

    async def prune(self, before: float, keys_before: float, sends_before: float,
                    limit: int = 10_000) -> int:
        def op(conn: sqlite3.Connection) -> int:
            ids = [r[0] for r in conn.execute(
                f"SELECT id FROM messages WHERE created_at<? AND state IN {_FINISHED} "
                f"ORDER BY created_at LIMIT ?", (before, limit))]
            n = 0
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                n += conn.execute(f"DELETE FROM recipients WHERE message_id IN ({marks})", chunk).rowcount
                n += conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk).rowcount
            n += conn.execute("DELETE FROM dedup WHERE key IN (SELECT key FROM dedup "
                              "WHERE seen_at<? LIMIT ?)", (keys_before, limit)).rowcount
            n += conn.execute("DELETE FROM sends WHERE rowid IN (SELECT rowid FROM sends "
                              "WHERE sent_at<? LIMIT ?)", (sends_before, limit)).rowcount
            return n

        return await self._write(op)


# ---------------------------------------------------------------------------------------------
# Statements shared by the operations above (all run inside a writer transaction or a read)


def _chunks(values: list[Any], size: int = 500) -> list[list[Any]]:
    """Pieces small enough for SQLite's bound-parameter limit."""
    return [values[i : i + size] for i in range(0, len(values), size)]


def _values(rows: int, columns: int) -> str:
    row = "(" + ",".join("?" * columns) + ")"
    return ",".join([row] * rows)


def _receive(conn: sqlite3.Connection, items: list[tuple[Received, str, float]]) -> list[bool]:
    """The webhooks of one commit (notification, dedup key, window): a few statements for all
    of them. A key seen within its window is a replay, and so is a key a webhook earlier in the
    list has; every other key is recorded as seen now, and its notification stored."""
    fresh: list[bool] = []
    taken: set[str] = set()
    for chunk in _chunks(items, 300):
        seen = dict(conn.execute(f"SELECT key, seen_at FROM dedup WHERE key IN "
                                 f"({','.join('?' * len(chunk))})", [key for _, key, _ in chunk]))
        new: list[tuple[Received, str]] = []
        for n, key, window in chunk:
            ok = key not in taken and seen.get(key, float("-inf")) <= n.received_at - window
            fresh.append(ok)
            if ok:
                taken.add(key)
                new.append((n, key))
        if new:
            conn.execute("INSERT INTO dedup(key, seen_at) VALUES " + _values(len(new), 2)
                         + " ON CONFLICT(key) DO UPDATE SET seen_at=excluded.seen_at",
                         [v for n, key in new for v in (key, n.received_at)])
            conn.execute("INSERT INTO notifications(id, received_at, source, body) VALUES "
                         + _values(len(new), 4),
                         [v for n, _ in new for v in (n.id, n.received_at, n.source, n.body)])
    return fresh


def _insert(conn: sqlite3.Connection, messages: Sequence[NewMessage],
            at: float | Sequence[float]) -> None:
    """Insert messages created at ``at`` (one time, or one per message), and their recipients:
    a statement per few hundred rows."""
    times = [at] * len(messages) if isinstance(at, (int, float)) else list(at)
    for chunk in _chunks(list(zip(messages, times)), 100):
        conn.execute(
            "INSERT INTO messages(id, created_at, source, group_id, level, priority, status, text, "
            "encoding, parts, alert_count, template_error, state, next_attempt_at, updated_at, "
            "hold_reason, items) VALUES " + _values(len(chunk), 17),
            [v for m, t in chunk for v in (
                m.id, t, m.source, m.group_id, m.level, m.priority, str(m.status), m.sms.text,
                m.sms.encoding, m.sms.parts, m.alert_count, m.template_error, m.state,
                m.hold_until if m.hold_until is not None else t, t, m.hold_reason,
                json.dumps([i.to_list() for i in m.items]) if m.items else None)],
        )
    rows = [(m.id, number, "suppressed" if m.suppressed else "pending", t, int(m.admitted))
            for m, t in zip(messages, times) for number in m.recipients]
    for chunk in _chunks(rows, 300):
        conn.execute("INSERT INTO recipients(message_id, number, state, updated_at, admitted) "
                     "VALUES " + _values(len(chunk), 5), [v for row in chunk for v in row])


def _finish(conn: sqlite3.Connection, results: list[Result]) -> list[MessageState]:
    """The attempts recorded in one commit: a few statements for all of them (see
    :meth:`SQLiteStore.finish`); each message's new state, in order."""
    updates = [(r.message_id, u.number, u.state, u.api_message_id, u.error_code, u.error, r.at)
               for r in results for u in r.updates]
    for chunk in _chunks(updates, 100):
        conn.execute(
            "UPDATE recipients AS r SET state=v.column3, api_message_id=COALESCE(v.column4, "
            "r.api_message_id), error_code=v.column5, error=v.column6, updated_at=v.column7 "
            f"FROM (VALUES {_values(len(chunk), 7)}) AS v "
            "WHERE r.message_id=v.column1 AND r.number=v.column2", [x for row in chunk for x in row])
    for r in results:
        if r.dead:
            conn.execute("UPDATE recipients SET state='failed', error=?, updated_at=? "
                         "WHERE message_id=? AND state='pending'", (r.last_error, r.at, r.message_id))
    counts: dict[str, dict[str, int]] = {r.message_id: {} for r in results}
    for chunk in _chunks(list(counts)):
        for message_id, state, n in conn.execute(
                "SELECT message_id, state, count(*) FROM recipients WHERE message_id IN "
                f"({','.join('?' * len(chunk))}) GROUP BY message_id, state", chunk):
            counts[message_id][state] = n
    states = [message_state(counts[r.message_id], r.dead) for r in results]
    rows = [(r.message_id, state, r.retry_at if state == "pending" and r.retry_at is not None else r.at,
             r.last_error, r.at, r.at if any(u.state == "accepted" for u in r.updates) else None)
            for r, state in zip(results, states)]
    for chunk in _chunks(rows, 100):
        conn.execute(
            "UPDATE messages AS m SET state=v.column2, next_attempt_at=v.column3, lease_until=NULL, "
            "last_error=v.column4, updated_at=v.column5, accepted_at=COALESCE(m.accepted_at, "
            "v.column6), hold_reason=CASE WHEN v.column2='held' THEN 'throttle' ELSE m.hold_reason END "
            f"FROM (VALUES {_values(len(chunk), 6)}) AS v WHERE m.id=v.column1",
            [x for row in chunk for x in row])
    return states


def _recipient_counts(conn: sqlite3.Connection, message_id: str) -> dict[str, int]:
    return dict(conn.execute(
        "SELECT state, count(*) FROM recipients WHERE message_id=? GROUP BY state", (message_id,)
    ).fetchall())


def _settle(conn: sqlite3.Connection, message_id: str, at: float, hold_reason: str | None = None) -> None:
    """Re-derive a message's state from its recipients after holds changed them."""
    state = message_state(_recipient_counts(conn, message_id))
    conn.execute(
        "UPDATE messages SET state=?, lease_until=NULL, updated_at=?, "
        "hold_reason=COALESCE(?, hold_reason) WHERE id=?",
        (state, at, hold_reason if state == "held" else None, message_id),
    )


def _settle_idle(conn: sqlite3.Connection, message_id: str, at: float, hold_reason: str) -> None:
    """Settle a message the throttle just held recipients of, unless others of them are still
    to be sent now (it settles when their results are recorded)."""
    if not conn.execute("SELECT 1 FROM recipients WHERE message_id=? AND state='pending' LIMIT 1",
                        (message_id,)).fetchone():
        _settle(conn, message_id, at, hold_reason)


def _fold(conn: sqlite3.Connection, ids: Sequence[str], bundle_id: str | None, at: float,
          number: str | None) -> None:
    """Mark held messages (``number`` None: whole) or one number's held recipients as gone out
    in ``bundle_id`` (None: collapsed, nothing sent)."""
    state = "bundled" if bundle_id else "collapsed"
    for chunk in _chunks(list(ids)):
        marks = ",".join("?" * len(chunk))
        if number is None:
            conn.execute(f"UPDATE recipients SET state=?, bundle_id=?, updated_at=? "
                         f"WHERE state='pending' AND message_id IN ({marks})", (state, bundle_id, at, *chunk))
            conn.execute(f"UPDATE messages SET state=?, bundle_id=?, updated_at=? WHERE id IN ({marks})",
                         (state, bundle_id, at, *chunk))
            continue
        conn.execute(f"UPDATE recipients SET state=?, bundle_id=?, hold_until=NULL, updated_at=? "
                     f"WHERE number=? AND state='held' AND message_id IN ({marks})",
                     (state, bundle_id, at, number, *chunk))
        for (message_id,) in conn.execute(
                f"SELECT id FROM messages WHERE state='held' AND id IN ({marks})", chunk).fetchall():
            _settle(conn, message_id, at)  # a message still being sent to others settles later


def _record(row: tuple[Any, ...], recipients: Sequence[RecipientRecord]) -> MessageRecord:
    items = tuple(Item.from_list(i) for i in json.loads(row[20])) if row[20] else ()
    return MessageRecord(*row[:20], items=items, recipients=tuple(recipients))


def _with_recipients(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[MessageRecord]:
    if not rows:
        return []
    by_message: dict[str, list[RecipientRecord]] = {r[0]: [] for r in rows}
    for chunk in _chunks(list(by_message)):
        for row in conn.execute(
                f"SELECT message_id, {_RECIPIENT_COLUMNS} FROM recipients "
                f"WHERE message_id IN ({','.join('?' * len(chunk))})", chunk):
            by_message[row[0]].append(RecipientRecord(*row[1:10], admitted=bool(row[10])))
    return [_record(r, by_message[r[0]]) for r in rows]
