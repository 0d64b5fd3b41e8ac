"""The embedded outbox on SQLite (WAL, ``synchronous=FULL``).

All writes go through one writer thread that *group-commits*: every write requested while the
previous transaction was running is applied in the next single transaction, each inside its own
savepoint (so one failing write does not fail the others), then one COMMIT and one fsync for the
lot. Under load that turns thousands of webhooks a second into a few dozen fsyncs.

The stdlib ``sqlite3`` module is used in dedicated threads rather than aiosqlite because a
group commit must run a whole batch of statements in one hop to the database thread, which
aiosqlite's per-statement API does not offer.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from receiver.models import NewMessage
from receiver.store import (
    AcceptResult,
    MessageQuery,
    MessageRecord,
    MessageState,
    OutboxStats,
    RecipientRecord,
    RecipientState,
    RecipientUpdate,
    StoreError,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    dedup_key   TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    received_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS notifications_received ON notifications(received_at);
CREATE TABLE IF NOT EXISTS messages (
    id              TEXT PRIMARY KEY,
    created_at      REAL NOT NULL,
    source          TEXT NOT NULL,
    group_id        TEXT NOT NULL,
    level           TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    status          TEXT NOT NULL,
    text            TEXT NOT NULL,
    encoding        TEXT NOT NULL,
    parts           INTEGER NOT NULL,
    alert_count     INTEGER NOT NULL,
    template_error  TEXT,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until     REAL,
    last_error      TEXT,
    updated_at      REAL NOT NULL,
    accepted_at     REAL
);
-- claim walks these in order and stops at its LIMIT: no sort of the whole backlog
CREATE INDEX IF NOT EXISTS messages_due ON messages(state, priority, next_attempt_at);
CREATE INDEX IF NOT EXISTS messages_lease ON messages(state, lease_until);
CREATE INDEX IF NOT EXISTS messages_created ON messages(created_at);
CREATE TABLE IF NOT EXISTS recipients (
    message_id      TEXT NOT NULL,
    number          TEXT NOT NULL,
    state           TEXT NOT NULL,
    api_message_id  TEXT,
    error_code      TEXT,
    error           TEXT,
    delivery_status TEXT,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (message_id, number)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_api ON recipients(api_message_id);
"""

_MESSAGE_COLUMNS = (
    "id, created_at, source, group_id, level, status, text, encoding, parts, alert_count, state, "
    "attempts, next_attempt_at, updated_at, priority, template_error, last_error, accepted_at"
)
_RECIPIENT_COLUMNS = "number, state, api_message_id, error_code, error, delivery_status, updated_at"
_FINAL_RECIPIENT = ("delivered", "undelivered", "failed")


class _Op:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]):
        self.fn = fn
        self.future = future


class SQLiteStore:
    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        self._queue: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # an answered webhook survives power loss too
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        return conn

    async def open(self) -> None:
        def setup() -> sqlite3.Connection:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            conn.executescript(SCHEMA)
            return conn

        try:
            self._w = await self._in(self._writer, setup)
            # ":memory:" is private to its connection: read through the writer then.
            self._r = self._w if self.path == ":memory:" else await self._in(self._reader, self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite outbox {self.path!r}: {exc}") from exc

    async def close(self) -> None:
        if self._flusher:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._r is not None and self._r is not self._w:
            await self._in(self._reader, self._r.close)
        if self._w is not None:
            await self._in(self._writer, self._w.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._w = self._r = None

    # -- plumbing -------------------------------------------------------------------------------

    @staticmethod
    async def _in(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._r is None:
            raise StoreError("the outbox is not open")
        pool = self._writer if self._r is self._w else self._reader
        try:
            return await self._in(pool, fn, self._r)
        except sqlite3.Error as exc:
            raise StoreError(f"outbox read failed: {exc}") from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group commit; return once that commit is durable."""
        if self._w is None:
            raise StoreError("the outbox is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Op(fn, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                results = await self._in(self._writer, self._commit, batch)
            except Exception as exc:  # the COMMIT itself failed: nothing of the batch is stored
                err = StoreError(f"outbox write failed: {exc}")
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(err)
                continue
            for op, (ok, value) in zip(batch, results):
                if op.future.done():
                    continue
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(
                        value if isinstance(value, StoreError) else StoreError(f"outbox write failed: {value}")
                    )

    def _commit(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        conn = self._w
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
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
        return results

    # -- writes ---------------------------------------------------------------------------------

    async def accept(
        self, key: str, source: str, now: float, window: float, messages: Sequence[NewMessage]
    ) -> AcceptResult:
        def op(conn: sqlite3.Connection) -> AcceptResult:
            row = conn.execute(
                "SELECT received_at FROM notifications WHERE dedup_key=?", (key,)
            ).fetchone()
            if row is not None and row[0] > now - window:
                return AcceptResult(duplicate=True)
            conn.execute(
                "INSERT INTO notifications(dedup_key, source, received_at) VALUES (?,?,?) "
                "ON CONFLICT(dedup_key) DO UPDATE SET received_at=excluded.received_at",
                (key, source, now),
            )
            conn.executemany(
                "INSERT INTO messages(id, created_at, source, group_id, level, priority, status, "
                "text, encoding, parts, alert_count, template_error, state, next_attempt_at, "
                "updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,'pending',?,?)",
                [
                    (m.id, now, m.source, m.group_id, m.level, m.priority, str(m.status),
                     m.sms.text, m.sms.encoding, m.sms.parts, m.alert_count, m.template_error,
                     now, now)
                    for m in messages
                ],
            )
            conn.executemany(
                "INSERT INTO recipients(message_id, number, state, updated_at) VALUES (?,?,'pending',?)",
                [(m.id, number, now) for m in messages for number in m.recipients],
            )
            return AcceptResult(duplicate=False, message_ids=tuple(m.id for m in messages))

        return await self._write(op)

    async def claim(self, now: float, limit: int, lease: float) -> list[MessageRecord]:
        def op(conn: sqlite3.Connection) -> list[MessageRecord]:
            due = [r[0] for r in conn.execute(
                "SELECT id FROM messages WHERE state='pending' AND next_attempt_at<=? "
                "ORDER BY priority, next_attempt_at LIMIT ?", (now, limit),
            )]
            if len(due) < limit:  # leases that ran out: their sender died mid-send
                due += [r[0] for r in conn.execute(
                    "SELECT id FROM messages WHERE state='sending' AND lease_until<=? "
                    "ORDER BY lease_until LIMIT ?", (now, limit - len(due)),
                )]
            if not due:
                return []
            rows = conn.execute(
                f"UPDATE messages SET state='sending', lease_until=?, attempts=attempts+1, "
                f"updated_at=? WHERE id IN ({','.join('?' * len(due))}) "
                f"RETURNING {_MESSAGE_COLUMNS}",
                (now + lease, now, *due),
            ).fetchall()
            rows.sort(key=lambda r: (r[14], r[12]))  # priority, next_attempt_at
            return _with_recipients(conn, rows)

        return await self._write(op)

    async def finish(
        self,
        message_id: str,
        updates: Sequence[RecipientUpdate],
        now: float,
        *,
        retry_at: float | None,
        last_error: str | None,
        dead: bool = False,
    ) -> MessageState:
        def op(conn: sqlite3.Connection) -> MessageState:
            conn.executemany(
                "UPDATE recipients SET state=?, api_message_id=COALESCE(?, api_message_id), "
                "error_code=?, error=?, updated_at=? WHERE message_id=? AND number=?",
                [
                    (u.state, u.api_message_id, u.error_code, u.error, now, message_id, u.number)
                    for u in updates
                ],
            )
            if dead:
                conn.execute(
                    "UPDATE recipients SET state='failed', error=?, updated_at=? "
                    "WHERE message_id=? AND state='pending'",
                    (last_error, now, message_id),
                )
            counts = dict(
                conn.execute(
                    "SELECT state, count(*) FROM recipients WHERE message_id=? GROUP BY state",
                    (message_id,),
                ).fetchall()
            )
            state = _message_state(counts, dead)
            conn.execute(
                "UPDATE messages SET state=?, next_attempt_at=?, lease_until=NULL, last_error=?, "
                "updated_at=?, accepted_at=COALESCE(accepted_at, ?) WHERE id=?",
                (
                    state,
                    retry_at if (state == "pending" and retry_at is not None) else now,
                    last_error,
                    now,
                    now if any(u.state == "accepted" for u in updates) else None,
                    message_id,
                ),
            )
            return state

        return await self._write(op)

    async def retry_now(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE messages SET next_attempt_at=? WHERE state='pending' AND next_attempt_at>?",
                (now, now),
            ).rowcount

        return await self._write(op)

    async def delivery_report(
        self, api_message_id: str, status: str, final_state: RecipientState | None, now: float
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            found = conn.execute(
                "UPDATE recipients SET delivery_status=?, updated_at=? WHERE api_message_id=? "
                "AND state NOT IN ('delivered','undelivered')",  # reports can arrive out of order
                (status, now, api_message_id),
            ).rowcount
            if final_state is not None:
                conn.execute(
                    "UPDATE recipients SET state=? WHERE api_message_id=? AND state='accepted'",
                    (final_state, api_message_id),
                )
            if not found:
                found = conn.execute(
                    "SELECT 1 FROM recipients WHERE api_message_id=?", (api_message_id,)
                ).fetchone() is not None
            return bool(found)

        return await self._write(op)

    async def prune(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            done = "('sent','partial','failed','dead','dry_run')"
            n = conn.execute(
                f"DELETE FROM recipients WHERE message_id IN (SELECT id FROM messages "
                f"WHERE created_at<? AND state IN {done})",
                (before,),
            ).rowcount
            n += conn.execute(
                f"DELETE FROM messages WHERE created_at<? AND state IN {done}", (before,)
            ).rowcount
            n += conn.execute("DELETE FROM notifications WHERE received_at<?", (before,)).rowcount
            return n

        return await self._write(op)

    # -- reads ----------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def get_message(self, message_id: str) -> MessageRecord | None:
        def q(conn: sqlite3.Connection) -> MessageRecord | None:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id=?", (message_id,)
            ).fetchall()
            found = _with_recipients(conn, rows)
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
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(query.limit)
        return await self._read(lambda conn: _with_recipients(conn, conn.execute(sql, args).fetchall()))

    async def stats(self) -> OutboxStats:
        def q(conn: sqlite3.Connection) -> OutboxStats:
            by_state = dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state"))
            oldest = conn.execute(
                "SELECT min(created_at) FROM messages WHERE state IN ('pending','sending')"
            ).fetchone()[0]
            pending = by_state.get("pending", 0) + by_state.get("sending", 0)
            return OutboxStats(pending=pending, oldest_pending_created_at=oldest, by_state=by_state)

        return await self._read(q)


def _message_state(counts: dict[str, int], dead: bool) -> MessageState:
    if counts.get("pending"):
        return "pending"
    if dead:
        return "dead"
    ok = counts.get("accepted", 0) + counts.get("delivered", 0) + counts.get("undelivered", 0)
    failed = counts.get("failed", 0)
    if counts.get("dry_run") and not ok and not failed:
        return "dry_run"
    if ok and failed:
        return "partial"
    return "sent" if ok else "failed"


def _with_recipients(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[MessageRecord]:
    if not rows:
        return []
    ids = [r[0] for r in rows]
    by_message: dict[str, list[RecipientRecord]] = {i: [] for i in ids}
    for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
        chunk = ids[start : start + 500]
        for row in conn.execute(
            f"SELECT message_id, {_RECIPIENT_COLUMNS} FROM recipients "
            f"WHERE message_id IN ({','.join('?' * len(chunk))})",
            chunk,
        ):
            by_message[row[0]].append(RecipientRecord(*row[1:]))
    return [MessageRecord(*r, recipients=tuple(by_message[r[0]])) for r in rows]
