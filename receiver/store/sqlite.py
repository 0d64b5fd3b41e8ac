"""The embedded outbox on SQLite (WAL, ``synchronous=FULL``), with a journal in front.

A webhook is answered once it is a record in the journal (:mod:`receiver.store.journal`,
``outbox.journal.NNNNNNNN``), synced in groups: no SQL on the answer path. The web process
remembers the recent dedup keys (``KEYS_IN_MEMORY``) to answer replays; the worker's planner
reads the journal and commits, in one ``outbox.db`` transaction, each record's dedup key (the
authoritative check: a replay the web process no longer remembered is dropped here), its
messages and the journal position after the batch, then deletes segments it has passed.

``outbox.inbox.db`` beside it keeps the inbox table: notifications that could not be planned
(with their error, for an operator) and those an older release received there, which the
planner takes first; and ``inbox_keys``, the dedup keys of that release. ``:memory:`` has no
journal: webhooks go straight into its inbox table.

``outbox.db`` has one writer that group-commits (:mod:`receiver.store.writer`) from a thread of
its own; the inbox file's writer runs in the event loop with its fsyncs in a thread. The stdlib
``sqlite3`` module is used rather than aiosqlite because a group commit must run a whole batch of
statements in one hop to the database thread, which aiosqlite's per-statement API does not offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from receiver.models import AlertStatus, Item, NewMessage
from receiver.paging import hold_kind
from receiver.store import (
    REPORT_WINDOW,
    AcceptResult,
    MessageQuery,
    MessageRecord,
    MessageState,
    OutboxStats,
    Received,
    RecipientRecord,
    RecipientState,
    RecipientUpdate,
    Released,
    StoreError,
    Unplanned,
    Throttle,
)
from receiver.store import journal
from receiver.store.journal import JournalWriter
from receiver.store.writer import GroupCommit, LoopCommit
from receiver.summary import Entry, Summary, bundle, count_alerts, digest

T = TypeVar("T")
log = logging.getLogger("sms_receiver.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    dedup_key   TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    received_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS notifications_received ON notifications(received_at);
CREATE TABLE IF NOT EXISTS journal_pos (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    segment     INTEGER NOT NULL,
    offset      INTEGER NOT NULL
);
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
    accepted_at     REAL,
    hold_reason     TEXT,
    bundle_id       TEXT,
    items           TEXT
);
-- Partial indexes: claim and release walk only what is waiting, in order, and stop at their
-- LIMIT; finished messages (nearly all rows) cost no index upkeep beyond id and created_at.
CREATE INDEX IF NOT EXISTS messages_due2 ON messages(priority, next_attempt_at) WHERE state='pending';
CREATE INDEX IF NOT EXISTS messages_lease2 ON messages(lease_until) WHERE state='sending';
CREATE INDEX IF NOT EXISTS messages_held ON messages(next_attempt_at) WHERE state='held';
CREATE INDEX IF NOT EXISTS messages_created ON messages(created_at);
DROP INDEX IF EXISTS messages_due;
DROP INDEX IF EXISTS messages_lease;
CREATE TABLE IF NOT EXISTS recipients (
    message_id      TEXT NOT NULL,
    number          TEXT NOT NULL,
    state           TEXT NOT NULL,
    api_message_id  TEXT,
    error_code      TEXT,
    error           TEXT,
    delivery_status TEXT,
    updated_at      REAL NOT NULL,
    hold_until      REAL,
    bundle_id       TEXT,
    admitted        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, number)
) WITHOUT ROWID;
-- delivery reports find a recipient through its message (REPORT_WINDOW): no index on Clickatell's ids
DROP INDEX IF EXISTS recipients_api2;
DROP INDEX IF EXISTS recipients_api;
-- the throttle's view: what each number has held, and when it was last sent to
CREATE INDEX IF NOT EXISTS recipients_held ON recipients(number, hold_until) WHERE state='held';
CREATE TABLE IF NOT EXISTS sends (
    number  TEXT NOT NULL,
    sent_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_number ON sends(number, sent_at);
CREATE INDEX IF NOT EXISTS sends_at ON sends(sent_at);
"""

# The inbox file. Notifications answered 2xx but not yet turned into messages (the planner's
# queue): a row leaves once its messages are committed to the outbox; one that could not be
# planned keeps its error and stays for an operator. inbox_keys: the webhooks' dedup keys
# (``notifications`` in the outbox holds those of /send).
INBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    source      TEXT NOT NULL,
    body        BLOB NOT NULL,
    plan        TEXT NOT NULL,
    error       TEXT
);
CREATE TABLE IF NOT EXISTS inbox_keys (
    dedup_key   TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    received_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_keys_received ON inbox_keys(received_at);
"""

# Columns added after the first release: added in place to an older outbox file.
_ADDED_COLUMNS = {
    "messages": ("hold_reason TEXT", "bundle_id TEXT", "items TEXT"),
    "recipients": ("hold_until REAL", "bundle_id TEXT", "admitted INTEGER NOT NULL DEFAULT 0"),
}

_MESSAGE_COLUMNS = (
    "id, created_at, source, group_id, level, status, text, encoding, parts, alert_count, state, "
    "attempts, next_attempt_at, updated_at, priority, template_error, last_error, accepted_at, "
    "hold_reason, bundle_id, items"
)
_RECIPIENT_COLUMNS = (
    "number, state, api_message_id, error_code, error, delivery_status, updated_at, hold_until, "
    "bundle_id, admitted"
)
_DONE = "('sent','partial','failed','dead','dry_run','suppressed','bundled','collapsed')"


def inbox_path(path: str) -> str | None:
    """The inbox file beside an outbox file (``outbox.db`` → ``outbox.inbox.db``); None for
    ``:memory:``, which keeps both in its one connection."""
    return None if path == ":memory:" else str(Path(path).with_suffix(".inbox.db"))


def journal_base(path: str) -> str | None:
    """The journal's segments beside an outbox file: ``outbox.journal.00000001`` …"""
    return None if path == ":memory:" else str(Path(path).with_suffix(".journal"))


# Dedup keys the web process answers replays from (~170 bytes each, with the dict and its
# rebuilds): Alertmanager's retries and HA peers replay within seconds to a minute. Older
# replays are answered "accepted" and dropped by the planner, which checks every key.
KEYS_IN_MEMORY = 25_000


class SQLiteStore:
    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.inbox_path = inbox_path(path)
        self.journal_base = journal_base(path)
        # the web process: the journal it appends to, and the recent dedup keys (16 bytes of
        # each, by received_at) with the writes still in flight; made at the first receive
        self._journal: JournalWriter | None = None
        self._journal_lock = asyncio.Lock()
        self._keys: dict[bytes | str, float] = {}
        self._key_writes: dict[bytes | str, asyncio.Future[None]] = {}
        self._keys_added = 0
        # the worker: how far the journal has been planned (segment, offset)
        self._position: tuple[int, int] | None = None
        self.busy_timeout = busy_timeout
        self._w = GroupCommit("writer", busy_timeout)
        self._iw = LoopCommit("inbox", busy_timeout) if self.inbox_path else self._w
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._r: sqlite3.Connection | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def _connect(self, path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # an answered webhook survives power loss too
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        return conn

    def _setup(self, path: str, *schemas: str) -> sqlite3.Connection:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect(path)
        conn.execute("PRAGMA busy_timeout=0")  # the writer waits for the lock itself (GroupCommit)
        for table, columns in _ADDED_COLUMNS.items():  # tables the file does not have: nothing
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if have and column.split()[0] not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        for schema in schemas:
            conn.executescript(schema)
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = self._connect(self.path)
        conn.execute("ATTACH DATABASE ? AS ib", (self.inbox_path,))  # the inbox tables by their names
        return conn

    async def open(self) -> None:
        try:
            inbox_here = () if self.inbox_path else (INBOX_SCHEMA,)
            conn = await self._w.open(lambda: self._setup(self.path, SCHEMA, *inbox_here))
            if self.inbox_path is None:  # ":memory:" is private to its connection: read through the writer
                self._r = conn
                return
            await self._iw.open(lambda: self._setup(self.inbox_path, INBOX_SCHEMA))
            await self._w.call(_move_inbox, conn, self.inbox_path)
            self._r = await asyncio.get_running_loop().run_in_executor(self._reader, self._connect_reader)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open SQLite outbox {self.path!r}: {exc}") from exc

    async def close(self) -> None:
        if self._journal is not None:
            await self._journal.close()
            self._journal = None
        if self._r is not None and self._r is not self._w.conn:
            await asyncio.get_running_loop().run_in_executor(self._reader, self._r.close)
        if self._iw is not self._w:
            await self._iw.close()
        await self._w.close()
        self._reader.shutdown(wait=True)
        self._r = None

    # -- plumbing -------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._r is None:
            raise StoreError("the outbox is not open")
        try:
            if self._r is self._w.conn:
                return await self._w.call(fn, self._r)
            return await asyncio.get_running_loop().run_in_executor(self._reader, fn, self._r)
        except sqlite3.Error as exc:
            raise StoreError(f"outbox read failed: {exc}") from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._w.write(fn)

    # -- writes ---------------------------------------------------------------------------------

    async def accept(
        self, key: str, source: str, now: float, window: float, messages: Sequence[NewMessage]
    ) -> AcceptResult:
        def op(conn: sqlite3.Connection) -> AcceptResult:
            if not _fresh_key(conn, "notifications", key, source, now, window):
                return AcceptResult(duplicate=True)
            for m in messages:
                self._w.defer(conn, _insert, (m, now))
            return AcceptResult(duplicate=False, message_ids=tuple(m.id for m in messages))

        return await self._write(op)

    async def receive(
        self, key: str, source: str, now: float, window: float, body: bytes, plan: str
    ) -> bool:
        if self.journal_base is None:  # ":memory:": straight into the inbox
            def op(conn: sqlite3.Connection) -> bool:
                if not _fresh_key(conn, "inbox_keys", key, source, now, window):
                    return False
                self._iw.defer(conn, _insert_inbox, (now, source, body, plan))
                return True

            return await self._iw.write(op)
        if self._journal is None:
            await self._open_journal(now - window)
        assert self._journal is not None
        short = _short(key)
        in_flight = self._key_writes.get(short)
        if in_flight is not None:  # its twin is being written: a duplicate only if that lands
            await asyncio.shield(in_flight)
            return False
        before = self._keys.get(short)
        if before is not None and now - before < window:
            return False
        written = self._journal.submit(journal.encode(now, window, source, key, plan, body))
        self._remember(short, now, window)
        self._key_writes[short] = written  # a twin waits for it (shielded: its cancel is not ours)
        try:
            await written
        except StoreError:
            if before is None:
                self._keys.pop(short, None)
            else:
                self._keys[short] = before
            raise
        finally:
            del self._key_writes[short]
        return True

    def _remember(self, short: bytes | str, now: float, window: float) -> None:
        keys = self._keys
        keys.pop(short, None)  # to the end: the dict is in received order
        keys[short] = now
        self._keys_added += 1
        if len(keys) > KEYS_IN_MEMORY or self._keys_added >= KEYS_IN_MEMORY // 4:
            # rebuilt rather than trimmed at the front (deleting a dict's first entries one by
            # one makes finding the next one slower each time): the newest half, in the window
            self._keys_added = 0
            kept = itertools.islice(keys.items(), max(0, len(keys) - KEYS_IN_MEMORY // 2), None)
            self._keys = {k: at for k, at in kept if now - at < window}

    async def _open_journal(self, since: float) -> None:
        """The web process's first receive: open the journal and load the dedup keys of the
        window, from the inbox and from the records not yet moved there."""
        async with self._journal_lock:
            if self._journal is not None:
                return
            if self._r is None:
                raise StoreError("the outbox is not open")
            writer = journal.JournalWriter(self.journal_base or "")
            await writer.open()

            def q(conn: sqlite3.Connection) -> tuple[list[tuple[str, float]], tuple[int, int]]:
                rows = conn.execute(
                    "SELECT dedup_key, received_at FROM notifications WHERE received_at>? UNION ALL "
                    "SELECT dedup_key, received_at FROM ib.inbox_keys WHERE received_at>? "
                    "ORDER BY received_at DESC LIMIT ?", (since, since, KEYS_IN_MEMORY // 2)).fetchall()
                return rows[::-1], _position(conn)

            try:
                rows, position = await self._read(q)
                unmoved = await asyncio.get_running_loop().run_in_executor(
                    self._reader, lambda: [(_short(r.key), r.received_at)
                                           for r in _unmoved(writer.base, position)])
            except BaseException:
                await writer.close()
                raise
            self._keys = {_short(k): at for k, at in rows}
            for short, at in unmoved:
                self._keys.pop(short, None)
                self._keys[short] = at
            self._journal = writer

    async def unplanned(self, limit: int) -> Unplanned:
        """The worker: records of the journal after the planned position (about ``limit``),
        as inbox rows numbered from 0; passes over closed segments read in full."""
        base = self.journal_base
        if base is None:
            return Unplanned([], None)
        if self._r is None:
            raise StoreError("the outbox is not open")
        loop = asyncio.get_running_loop()
        try:
            if self._position is None:
                self._position = await self._read(_position)
            numbers = await loop.run_in_executor(self._reader, journal.segments, base)
            segment, offset = self._position
            while True:  # from the position, over segments that are gone or read in full
                later = [n for n in numbers if n > segment]
                records: list[journal.Record] = []
                end, size = offset, offset
                if segment in numbers:
                    records, end, size = await loop.run_in_executor(
                        self._reader, journal.read, base, segment, offset, 1 << 20, limit)
                if records or not later:
                    break
                if end < size:  # closed: what is left makes no record
                    log.error("journal segment %s: %d bytes after offset %d are not a whole "
                              "record; skipped", journal.segment_path(base, segment), size - end, end)
                segment, offset = later[0], 0
            after = (segment, end)
        except OSError as exc:
            raise StoreError(f"cannot read the journal: {exc}") from exc
        rows = [Received(i, r.received_at, r.source, r.body, r.plan, key=r.key, window=r.window)
                for i, r in enumerate(records)]
        return Unplanned([r for r in rows if r.source], after if after != self._position else None)

    async def planned_unplanned(self, batch: Unplanned, done: Sequence[tuple[int, Sequence[NewMessage], float]],
                                failed: Sequence[tuple[int, str]] = ()) -> set[int]:
        """The worker: in one outbox transaction, each done row's dedup key and messages (a row
        whose key is already there within its window is a replay the web process no longer
        remembered: nothing stored) and the position after the batch; ``failed`` rows move to
        the inbox first, with their error. Returns the replays' ids."""
        rows = {r.id: r for r in batch.rows}
        if failed:
            await self._iw.write(lambda conn: conn.executemany(
                "INSERT INTO inbox(received_at, source, body, plan, error) VALUES (?,?,?,?,?)",
                [(rows[i].received_at, rows[i].source, rows[i].body, rows[i].plan, e) for i, e in failed]))

        def op(conn: sqlite3.Connection) -> set[int]:
            replays = set()
            fresh: list[tuple[NewMessage, float]] = []
            for i, messages, at in done:
                r = rows[i]
                if _fresh_key(conn, "notifications", r.key, r.source, r.received_at, r.window):
                    fresh += [(m, at) for m in messages]
                else:
                    replays.add(i)
            for i, _ in failed:
                r = rows[i]
                _fresh_key(conn, "notifications", r.key, r.source, r.received_at, r.window)
            if fresh:
                _insert(conn, fresh, again=True)
            if batch.after is not None:
                conn.execute("INSERT INTO journal_pos(id, segment, offset) VALUES (1,?,?) "
                             "ON CONFLICT(id) DO UPDATE SET segment=excluded.segment, "
                             "offset=excluded.offset", batch.after)
            return replays

        replays = await self._w.write(op)
        if batch.after is not None and self.journal_base is not None:
            self._position = batch.after
            for n in journal.segments(self.journal_base):
                if n < batch.after[0]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(journal.segment_path(self.journal_base, n))
        return replays

    async def inbox(self, limit: int) -> list[Received]:
        def q(conn: sqlite3.Connection) -> list[Received]:
            return [Received(*row) for row in conn.execute(
                "SELECT id, received_at, source, body, plan FROM inbox WHERE error IS NULL "
                "ORDER BY id LIMIT ?", (limit,),
            )]

        return await self._read(q)

    async def received(self, message_id: str) -> Received | None:
        def q(conn: sqlite3.Connection) -> Received | None:
            # ids are hex: no LIKE wildcards; the inbox is short unless the planner is behind
            row = conn.execute(
                "SELECT id, received_at, source, body, plan, error FROM inbox WHERE plan LIKE ? LIMIT 1",
                (f'%"{message_id}"%',),
            ).fetchone()
            return None if row is None else Received(*row)

        if not message_id.isalnum():
            return None
        found = await self._read(q)
        if found is not None or self.journal_base is None:
            return found
        # answered, not yet moved into the inbox: in the journal after the worker's position
        position = await self._read(lambda conn: _position(conn))
        needle, base = f'"{message_id}"', self.journal_base
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, lambda: next((Received(0, r.received_at, r.source, r.body, r.plan)
                                        for r in _unmoved(base, position) if needle in r.plan), None))

    async def planned(self, done: Sequence[tuple[int, Sequence[NewMessage], float]],
                      failed: Sequence[tuple[int, str]] = ()) -> None:
        rows = [(m, at) for _, messages, at in done for m in messages]

        def clear(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM inbox WHERE id=?", [(i,) for i, _, _ in done])
            conn.executemany("UPDATE inbox SET error=? WHERE id=?", [(e, i) for i, e in failed])

        if rows:  # messages first: planned again after a crash in between, they are kept as they are
            await self._w.write(lambda conn: _insert(conn, rows, again=True))
        await self._iw.write(clear)

    async def claim(
        self, now: float, limit: int, lease: float,
        throttle: Throttle | None = None, throttled: dict[str, int] | None = None,
    ) -> list[MessageRecord]:
        def op(conn: sqlite3.Connection) -> tuple[list[MessageRecord], dict[str, int]]:
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
                return [], {}
            rows = conn.execute(
                f"UPDATE messages SET state='sending', lease_until=?, attempts=attempts+1, "
                f"updated_at=? WHERE id IN ({','.join('?' * len(due))}) "
                f"RETURNING {_MESSAGE_COLUMNS}",
                (now + lease, now, *due),
            ).fetchall()
            rows.sort(key=lambda r: (r[14], r[12]))  # priority, next_attempt_at
            claimed = _with_recipients(conn, rows)
            held: dict[str, int] = {}
            if throttle is not None and throttle.rules:
                claimed, held = _admit(conn, claimed, throttle, now)
            return claimed, held

        claimed, held = await self._write(op)
        if throttled is not None:
            for gid, n in held.items():
                throttled[gid] = throttled.get(gid, 0) + n
        return claimed

    async def release(
        self, now: float, throttle: Throttle, max_parts: int, new_id: Callable[[float], str]
    ) -> list[Released]:
        def op(conn: sqlite3.Connection) -> list[Released]:
            return _release_groups(conn, now, max_parts, new_id) + _release_numbers(
                conn, now, throttle, max_parts, new_id
            )

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
            state = _message_state(_recipient_counts(conn, message_id), dead)
            conn.execute(
                "UPDATE messages SET state=?, next_attempt_at=?, lease_until=NULL, last_error=?, "
                "updated_at=?, accepted_at=COALESCE(accepted_at, ?), "
                "hold_reason=CASE WHEN ?='held' THEN 'throttle' ELSE hold_reason END WHERE id=?",
                (
                    state,
                    retry_at if (state == "pending" and retry_at is not None) else now,
                    last_error,
                    now,
                    now if any(u.state == "accepted" for u in updates) else None,
                    state,
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
        self, api_message_id: str, status: str, final_state: RecipientState | None, now: float,
        message_id: str | None = None,
    ) -> bool:
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
                conn.execute(
                    f"UPDATE recipients SET state=? WHERE {where} AND state='accepted'",
                    (final_state, key, api_message_id),
                )
            if not found:
                found = conn.execute(
                    f"SELECT 1 FROM recipients WHERE {where}", (key, api_message_id)
                ).fetchone() is not None
            return bool(found)

        return await self._write(op)

    async def prune(self, before: float, keys_before: float | None = None,
                    sends_before: float | None = None, limit: int = 10_000) -> int:
        keys = before if keys_before is None else keys_before

        def op(conn: sqlite3.Connection) -> int:
            ids = [r[0] for r in conn.execute(
                f"SELECT id FROM messages WHERE created_at<? AND state IN {_DONE} "
                f"ORDER BY created_at LIMIT ?", (before, limit),
            )]
            n = 0
            for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                n += conn.execute(f"DELETE FROM recipients WHERE message_id IN ({marks})", chunk).rowcount
                n += conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk).rowcount
            n += _prune_keys(conn, "notifications", keys, limit)
            n += conn.execute(
                "DELETE FROM sends WHERE rowid IN (SELECT rowid FROM sends WHERE sent_at<? LIMIT ?)",
                (before if sends_before is None else sends_before, limit),
            ).rowcount
            return n

        pruned = await self._write(op)
        return pruned + await self._iw.write(lambda conn: _prune_keys(conn, "inbox_keys", keys, limit))

    # -- reads ----------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raises while a file cannot be written: the last commit to it failed and an empty
        transaction fails too (another process holds its lock past the busy timeout)."""
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())
        for writer in {self._w, self._iw}:
            if writer.failing is not None:
                await writer.write(lambda conn: None)
        if self._journal is not None and self._journal.failing is not None:
            # a real write (a probe record, skipped by readers): clears a failure that has passed
            await self._journal.append(journal.PROBE)

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
            by_state = dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state"))
            oldest = conn.execute(
                "SELECT min(created_at) FROM messages WHERE state IN ('pending','sending')"
            ).fetchone()[0]
            pending = by_state.get("pending", 0) + by_state.get("sending", 0)
            held = conn.execute(
                "SELECT count(*) FROM recipients INDEXED BY recipients_held WHERE state='held'"
            ).fetchone()[0]
            inbox, inbox_oldest, inbox_failed = conn.execute(
                "SELECT count(*), min(received_at), count(error) FROM inbox"
            ).fetchone()
            if inbox_oldest is not None and (oldest is None or inbox_oldest < oldest):
                oldest = inbox_oldest  # waiting to be planned is waiting too
            if self.journal_base is not None:  # answered, not yet moved into the inbox
                unmoved, first = _unmoved_count(self.journal_base, _position(conn))
                inbox += unmoved
                if first is not None and (oldest is None or first < oldest):
                    oldest = first
            return OutboxStats(pending=pending, oldest_pending_created_at=oldest,
                               by_state=by_state, held_recipients=held,
                               inbox=inbox - inbox_failed, inbox_failed=inbox_failed)

        return await self._read(q)


# One statement per dedup check: a new key is inserted, a key older than the window renewed, one
# inside the window left alone. By table: /send's keys in the outbox, the webhooks' in the inbox.
_FRESH_KEY = {
    table: f"INSERT INTO {table}(dedup_key, source, received_at) VALUES (?,?,?) "
    "ON CONFLICT(dedup_key) DO UPDATE SET received_at=excluded.received_at "
    f"WHERE {table}.received_at<=?"
    for table in ("notifications", "inbox_keys")
}


def _fresh_key(conn: sqlite3.Connection, table: str, key: str, source: str, now: float,
               window: float) -> bool:
    """Record a notification's dedup key in ``table``; False when it is a replay."""
    return bool(conn.execute(_FRESH_KEY[table], (key, source, now, now - window)).rowcount)


def _move_inbox(conn: sqlite3.Connection, inbox_file: str) -> None:
    """An outbox from before the inbox had a file of its own: what waits in its inbox moves
    over (a crash half-way plans a notification twice, which keeps its messages as they are)."""
    if conn.execute("SELECT 1 FROM sqlite_schema WHERE type='table' AND name='inbox'").fetchone() is None:
        return
    conn.execute("ATTACH DATABASE ? AS ib", (inbox_file,))
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO ib.inbox(received_at, source, body, plan, error) "
                     "SELECT received_at, source, body, plan, error FROM main.inbox ORDER BY id")
        conn.execute("DROP TABLE main.inbox")
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("DETACH DATABASE ib")


def _prune_keys(conn: sqlite3.Connection, table: str, before: float, limit: int) -> int:
    return conn.execute(
        f"DELETE FROM {table} WHERE dedup_key IN (SELECT dedup_key FROM {table} WHERE received_at<? LIMIT ?)",
        (before, limit),
    ).rowcount


def _short(key: str) -> bytes | str:
    """A dedup key as the web process remembers it: 16 bytes of its SHA-256 hex digest (a third
    of the memory of the string; 128 bits of a hash never collide in practice); a key that is
    no hex digest (tests) as it is."""
    try:
        return bytes.fromhex(key[:32]) if len(key) >= 32 else key
    except ValueError:
        return key


def _position(conn: sqlite3.Connection) -> tuple[int, int]:
    row = conn.execute("SELECT segment, offset FROM journal_pos WHERE id=1").fetchone()
    return (row[0], row[1]) if row else (0, 0)


def _segments_after(base: str, position: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """Each journal segment at or after ``position``, with the offset to read it from."""
    for number in journal.segments(base):
        if number >= position[0]:
            yield number, position[1] if number == position[0] else 0


def _unmoved(base: str, position: tuple[int, int]) -> Iterator[journal.Record]:
    """The journal's webhook records after ``position``, read a few MB at a time: a planner
    far behind leaves tens of MB there, and a /metrics scrape must not hold them all at once."""
    for number, offset in _segments_after(base, position):
        while True:
            records, offset, _ = journal.read(base, number, offset)
            if not records:
                break
            yield from (r for r in records if r.source)  # no source: a readiness probe


def _unmoved_count(base: str, position: tuple[int, int]) -> tuple[int, float | None]:
    """How many webhook records wait after ``position``, and when the first was received
    (their headers only: a /metrics scrape in a storm must not load the bodies)."""
    count, first = 0, None
    for number, offset in _segments_after(base, position):
        while True:
            times, after = journal.webhook_times(base, number, offset)
            if after == offset:
                break
            offset = after
            if first is None and times:
                first = times[0]
            count += len(times)
    return count, first


def _insert_inbox(conn: sqlite3.Connection, rows: Sequence[tuple[float, str, bytes, str]]) -> None:
    conn.executemany("INSERT INTO inbox(received_at, source, body, plan) VALUES (?,?,?,?)", rows)


def _insert(conn: sqlite3.Connection, pairs: Sequence[tuple[NewMessage, float]], again: bool = False) -> None:
    """Insert messages, each with the time it was accepted, and their recipients. ``again``:
    a message whose id is already stored is left as it is (planned a second time)."""
    verb = "INSERT OR IGNORE" if again else "INSERT"

    def state(m: NewMessage) -> str:
        return "suppressed" if m.suppressed else "held" if m.hold_until is not None else "pending"

    conn.executemany(
        f"{verb} INTO messages(id, created_at, source, group_id, level, priority, status, text, "
        "encoding, parts, alert_count, template_error, state, next_attempt_at, updated_at, "
        "hold_reason, items) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            (m.id, at, m.source, m.group_id, m.level, m.priority, str(m.status), m.sms.text,
             m.sms.encoding, m.sms.parts, m.alert_count, m.template_error, state(m),
             m.hold_until if m.hold_until is not None else at, at, m.hold_reason,
             json.dumps([i.to_list() for i in m.items]) if m.items else None)
            for m, at in pairs
        ],
    )
    conn.executemany(
        f"{verb} INTO recipients(message_id, number, state, updated_at, admitted) VALUES (?,?,?,?,?)",
        [
            (m.id, number, "suppressed" if m.suppressed else "pending", at, int(m.admitted))
            for m, at in pairs for number in m.recipients
        ],
    )


def _history(conn: sqlite3.Connection, number: str, since: float) -> list[float]:
    return [r[0] for r in conn.execute(
        "SELECT sent_at FROM sends WHERE number=? AND sent_at>?", (number, since)
    )]


def _admit(
    conn: sqlite3.Connection, claimed: list[MessageRecord], throttle: Throttle, now: float
) -> tuple[list[MessageRecord], dict[str, int]]:
    """Clear or hold each claimed recipient the throttle has not seen yet (see Store.claim).

    A number is read once per claim (its recent sends, whether it has held messages) and kept
    up to date here, since one storm puts the same numbers in many claimed messages."""
    since = now - throttle.horizon
    numbers: dict[str, tuple[list[float], bool]] = {}  # number → (send times, holding)
    held: dict[str, int] = {}
    out: list[MessageRecord] = []
    for m in claimed:
        recipients = []
        for r in m.recipients:
            if r.state != "pending" or r.admitted:
                recipients.append(r)
                continue
            if r.number not in numbers:
                numbers[r.number] = (_history(conn, r.number, since), conn.execute(
                    "SELECT 1 FROM recipients INDEXED BY recipients_held WHERE number=? "
                    "AND state='held' LIMIT 1", (r.number,),
                ).fetchone() is not None)
            history, holding = numbers[r.number]
            until = throttle.admit(history, holding, m.priority, m.created_at, now)
            if until is None:
                history.append(now)
                conn.execute("INSERT INTO sends(number, sent_at) VALUES (?,?)", (r.number, now))
                conn.execute("UPDATE recipients SET admitted=1 WHERE message_id=? AND number=?",
                             (m.id, r.number))
                recipients.append(replace(r, admitted=True))
            else:
                numbers[r.number] = (history, True)
                conn.execute(
                    "UPDATE recipients SET state='held', hold_until=?, updated_at=? "
                    "WHERE message_id=? AND number=?", (until, now, m.id, r.number),
                )
                held[m.group_id] = held.get(m.group_id, 0) + 1
                recipients.append(replace(r, state="held", hold_until=until, updated_at=now))
        m = replace(m, recipients=tuple(recipients))
        if m.pending_numbers:
            out.append(m)
        else:  # nothing to send now: it waits in its recipients' holds, not under a lease
            _settle(conn, m.id, now, hold_reason="throttle")
    return out, held


def _recipient_counts(conn: sqlite3.Connection, message_id: str) -> dict[str, int]:
    return dict(conn.execute(
        "SELECT state, count(*) FROM recipients WHERE message_id=? GROUP BY state", (message_id,)
    ).fetchall())


def _settle(conn: sqlite3.Connection, message_id: str, now: float, hold_reason: str | None = None) -> None:
    """Re-derive a message's state from its recipients after holds changed them."""
    state = _message_state(_recipient_counts(conn, message_id), False)
    conn.execute(
        "UPDATE messages SET state=?, lease_until=NULL, updated_at=?, "
        "hold_reason=COALESCE(?, hold_reason) WHERE id=?",
        (state, now, hold_reason if state == "held" else None, message_id),
    )


def _entry(row: tuple[Any, ...]) -> Entry:
    """(id, created_at, priority, level, status, text, items) → a summary entry."""
    items = tuple(Item.from_list(i) for i in json.loads(row[6])) if row[6] else ()
    return Entry(row[0], row[1], row[2], row[3], row[4], row[5], items)


def _summary_message(
    new_id: Callable[[float], str], now: float, group_id: str, entries: Sequence[Entry],
    summary: Summary, recipients: Sequence[str], *, admitted: bool,
) -> NewMessage:
    top = min(entries, key=lambda e: (e.priority, e.created_at))
    items = tuple(i for e in entries for i in e.items)
    firing = any(i.status == "firing" for e in entries for i in e.keyed_items())
    return NewMessage(
        id=new_id(now), group_id=group_id, level=top.level,
        status=AlertStatus.FIRING if firing else AlertStatus.RESOLVED, sms=summary.sms,
        recipients=tuple(recipients), source="summary", alert_count=summary.alerts,
        priority=top.priority, items=items, admitted=admitted,
    )


_ENTRY_COLUMNS = "m.id, m.created_at, m.priority, m.level, m.status, m.text, m.items"


def _release_groups(
    conn: sqlite3.Connection, now: float, max_parts: int, new_id: Callable[[float], str]
) -> list[Released]:
    """Digest windows and quiet periods that ended: one summary per group and reason."""
    rows = conn.execute(
        f"SELECT {_ENTRY_COLUMNS}, m.group_id, m.hold_reason FROM messages m "
        "WHERE m.state='held' AND m.hold_reason<>'throttle' AND m.next_attempt_at<=?", (now,),
    ).fetchall()
    by_group: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for row in rows:
        by_group.setdefault((row[7], row[8]), []).append(row)
    out: list[Released] = []
    for (group_id, reason), group_rows in by_group.items():
        ids = [r[0] for r in group_rows]
        entries = [_entry(r) for r in group_rows]
        summary = digest(entries, reason, max_parts)
        numbers = sorted({n for (n,) in conn.execute(
            f"SELECT DISTINCT number FROM recipients WHERE state='pending' AND message_id IN "
            f"({','.join('?' * len(ids))})", ids,
        )})
        kind = hold_kind(reason)
        if summary is None or not numbers:
            _fold(conn, ids, None, now, whole=True)
            alerts = summary.alerts if summary else count_alerts(entries)
            out.append(Released(kind, group_id, None, len(ids), alerts,
                                summary.collapsed if summary else alerts))
            continue
        message = _summary_message(new_id, now, group_id, entries, summary, numbers, admitted=False)
        _insert(conn, [(message, now)])
        _fold(conn, ids, message.id, now, whole=True)
        out.append(Released(kind, group_id, message.id, len(ids), summary.alerts, summary.collapsed))
    return out


def _release_numbers(
    conn: sqlite3.Connection, now: float, throttle: Throttle, max_parts: int,
    new_id: Callable[[float], str],
) -> list[Released]:
    """Numbers whose throttle hold is due: one bundle each, if the rules (or a deadline) allow."""
    due = [r[0] for r in conn.execute(
        "SELECT number FROM recipients INDEXED BY recipients_held WHERE state='held' "
        "GROUP BY number HAVING min(hold_until)<=?", (now,),
    )]
    out: list[Released] = []
    for number in due:
        rows = conn.execute(
            f"SELECT {_ENTRY_COLUMNS}, m.group_id FROM recipients r JOIN messages m "
            "ON m.id=r.message_id WHERE r.number=? AND r.state='held'", (number,),
        ).fetchall()
        entries = [_entry(r) for r in rows]
        at = throttle.release_at(
            _history(conn, number, now - throttle.horizon),
            [throttle.deadline(e.priority, e.created_at) for e in entries], now,
        )
        if at > now:  # sends since the hold was set pushed it back
            conn.execute("UPDATE recipients SET hold_until=? WHERE number=? AND state='held'",
                         (at, number))
            continue
        ids = [r[0] for r in rows]
        group_id = min(rows, key=lambda r: (r[2], r[1]))[7]
        summary = bundle(entries, max_parts)
        if summary is None:
            _fold(conn, ids, None, now, number=number)
            alerts = count_alerts(entries)
            out.append(Released("bundle", group_id, None, len(ids), alerts, alerts))
            continue
        message = _summary_message(new_id, now, group_id, entries, summary, [number], admitted=True)
        _insert(conn, [(message, now)])
        conn.execute("INSERT INTO sends(number, sent_at) VALUES (?,?)", (number, now))
        _fold(conn, ids, message.id, now, number=number)
        out.append(Released("bundle", group_id, message.id, len(ids), summary.alerts, summary.collapsed))
    return out


def _fold(
    conn: sqlite3.Connection, ids: Sequence[str], bundle_id: str | None, now: float, *,
    whole: bool = False, number: str | None = None,
) -> None:
    """Mark held messages (``whole``) or one number's held recipients as gone out in
    ``bundle_id`` (None: collapsed, nothing sent)."""
    state = "bundled" if bundle_id else "collapsed"
    marks = ",".join("?" * len(ids))
    if whole:
        conn.execute(
            f"UPDATE recipients SET state=?, bundle_id=?, updated_at=? WHERE state='pending' "
            f"AND message_id IN ({marks})", (state, bundle_id, now, *ids),
        )
        conn.execute(
            f"UPDATE messages SET state=?, bundle_id=?, updated_at=? WHERE id IN ({marks})",
            (state, bundle_id, now, *ids),
        )
        return
    conn.execute(
        f"UPDATE recipients SET state=?, bundle_id=?, hold_until=NULL, updated_at=? "
        f"WHERE number=? AND state='held' AND message_id IN ({marks})",
        (state, bundle_id, now, number, *ids),
    )
    for message_id in ids:
        row = conn.execute("SELECT state FROM messages WHERE id=?", (message_id,)).fetchone()
        if row and row[0] == "held":  # a message still being sent to others settles later
            _settle(conn, message_id, now)


def _message_state(counts: dict[str, int], dead: bool) -> MessageState:
    if counts.get("pending"):
        return "pending"
    if counts.get("held"):
        return "held"
    if dead:
        return "dead"
    ok = counts.get("accepted", 0) + counts.get("delivered", 0) + counts.get("undelivered", 0)
    folded = counts.get("bundled", 0)
    failed = counts.get("failed", 0)
    if counts.get("dry_run") and not ok and not failed:
        return "dry_run"
    if failed and (ok or folded):
        return "partial"
    if ok:
        return "sent"
    if failed:
        return "failed"
    if folded:
        return "bundled"
    if counts.get("collapsed"):
        return "collapsed"
    return "suppressed" if counts.get("suppressed") else "sent"


def _record(row: tuple[Any, ...], recipients: Sequence[RecipientRecord]) -> MessageRecord:
    items = tuple(Item.from_list(i) for i in json.loads(row[20])) if row[20] else ()
    return MessageRecord(*row[:20], items=items, recipients=tuple(recipients))


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
            by_message[row[0]].append(RecipientRecord(*row[1:10], admitted=bool(row[10])))
    return [_record(r, by_message[r[0]]) for r in rows]
