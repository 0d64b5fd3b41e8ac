"""The outbox on PostgreSQL, for several replicas on one database (asyncpg, a connection pool).

The contract is the store protocol's (:mod:`receiver.store`); what several replicas add:

- **Intake.** Webhooks are committed in groups (one transaction, one WAL flush, for those that
  arrive while the previous group commits), each dedup key checked in that transaction with
  ``INSERT … ON CONFLICT``: the same notification sent by both members of an Alertmanager HA
  pair to two replicas is stored once, whichever commits first, and the other answers
  ``duplicate``. Keys are written in sorted order, so two groups never deadlock on them.
- **Planning.** :meth:`unplanned` leases what it hands out (``planning_until``, with
  ``SKIP LOCKED``): two planners do not plan one notification at once; should a lease run out
  and both plan it, the second finds the notification gone (it is deleted first, in the
  transaction that inserts the messages) and stores nothing.
- **Claims** take due messages and those whose lease ran out with ``FOR UPDATE SKIP LOCKED``:
  each is sent by one replica at a time. A claim is fenced by its ``attempts`` count: a replica
  whose lease ran out (it was killed, or lost its connection longer than the lease) and whose
  message was claimed again records only what its recipients became, never the message's state,
  lease or throttle history, which belong to the new claim.
- **The paging policy** decides inside :meth:`deciding`: one transaction holding a transaction-
  level advisory lock, so the throttle history and the holds are read and written by one replica
  at a time, and a digest is made once.
- **Faults.** Every database or connection error is a :class:`StoreError` (webhooks 503,
  readiness fails) and the pool reconnects on next use: sending resumes by itself. Nothing here
  is "broken" in the SQLite sense: a restart does not repair a database that is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import asyncpg

from receiver.config import Storage
from receiver.models import FINISHED_STATES, MessageState, NewMessage, RecipientState, message_state
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
    StoreUsage,
)
from receiver.store.postgres_schema import POLICY_LOCK, SchemaError, migrate
from receiver.store.sql import MESSAGE_COLUMNS, RECIPIENT_COLUMNS, record

log = logging.getLogger("sms_receiver.store")
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")

POOL_SIZE = 10
STATEMENT_TIMEOUT = 30.0  # seconds: no statement waits longer (a lost connection, a lock)
PLANNING_LEASE = 60  # seconds a replica has to plan the notifications it took
_FINISHED = list(FINISHED_STATES)
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)  # what a bug's data meets
# Connection-level failures: the database is down, restarting or unreachable.
_DOWN = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError,
         asyncpg.PostgresConnectionError,
         asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError, asyncpg.AdminShutdownError)


class _Batcher(Generic[I, R]):
    """Group commit: items added while a batch commits go in the next one, together."""

    def __init__(self, run: Callable[[list[I]], Awaitable[list[R]]]) -> None:
        self._run = run
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def add(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="postgres group commit")
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    results = await self._run([item for item, _ in batch])
                except BaseException as exc:  # noqa: BLE001 - every waiter gets the failure
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc if isinstance(exc, Exception) else StoreError(str(exc)))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, f), r in zip(batch, results, strict=True):
                    if not f.done():
                        f.set_result(r)
        finally:
            self._task = None


def _message_rows(messages: Sequence[NewMessage], times: Sequence[float]) -> list[list[Any]]:
    """Columns of ``INSERT INTO messages`` as arrays for ``unnest``."""
    rows = [(m.id, t, m.source, m.group_id, m.level, m.priority, str(m.status), m.sms.text,
             m.sms.encoding, m.sms.parts, m.alert_count, m.template_error, m.state,
             m.hold_until if m.hold_until is not None else t, t, m.hold_reason,
             json.dumps([i.to_list() for i in m.items]) if m.items else None)
            for m, t in zip(messages, times, strict=True)]
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(17)]


_INSERT_MESSAGES = (
    "INSERT INTO messages(id, created_at, source, group_id, level, priority, status, text, encoding, "
    "parts, alert_count, template_error, state, next_attempt_at, updated_at, hold_reason, items) "
    "SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[], $5::text[], $6::int[], "
    "$7::text[], $8::text[], $9::text[], $10::int[], $11::int[], $12::text[], $13::text[], "
    "$14::float8[], $15::float8[], $16::text[], $17::text[])"
)
_INSERT_RECIPIENTS = (
    "INSERT INTO recipients(message_id, number, state, updated_at, admitted_at) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::float8[])"
)
_COLUMNS_M = ", ".join("m." + c.strip() for c in MESSAGE_COLUMNS.split(","))


async def _insert(conn: Any, messages: Sequence[NewMessage], times: Sequence[float]) -> None:
    if not messages:
        return
    await conn.execute(_INSERT_MESSAGES, *_message_rows(messages, times))
    rows = [(m.id, n, "suppressed" if m.suppressed else "pending", t, t if m.admitted else None)
            for m, t in zip(messages, times, strict=True) for n in m.recipients]
    await conn.execute(_INSERT_RECIPIENTS, *[list(c) for c in zip(*rows, strict=True)])


async def _with_recipients(conn: Any, rows: Sequence[Any]) -> list[MessageRecord]:
    if not rows:
        return []
    by_message: dict[str, list[RecipientRecord]] = {r[0]: [] for r in rows}
    for row in await conn.fetch(f"SELECT message_id, {RECIPIENT_COLUMNS} FROM recipients "
                                "WHERE message_id = ANY($1::text[]) ORDER BY message_id, number",
                                list(by_message)):
        by_message[row[0]].append(RecipientRecord(*row[1:10], admitted=row[10] is not None))
    return [record(tuple(r), by_message[r[0]]) for r in rows]


async def _settle(conn: Any, message_id: str, at: float) -> None:
    counts = {r[0]: r[1] for r in await conn.fetch(
        "SELECT state, count(*) FROM recipients WHERE message_id=$1 GROUP BY state", message_id)}
    await conn.execute("UPDATE messages SET state=$1, lease_until=NULL, updated_at=$2 WHERE id=$3",
                       message_state(counts), at, message_id)


class _Decider:
    """The policy's reads and writes on one connection (see :meth:`PostgresStore.deciding`)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def history(self, numbers: Sequence[str], since: float) -> dict[str, NumberHistory]:
        out = {n: NumberHistory([], False) for n in numbers}
        for number, at in await self._conn.fetch(
                "SELECT number, sent_at FROM sends WHERE number = ANY($1::text[]) AND sent_at > $2 "
                "ORDER BY id", list(numbers), since):
            out[number].sent_at.append(at)
        for (number,) in await self._conn.fetch(
                "SELECT DISTINCT number FROM recipients WHERE state='held' AND number = ANY($1::text[])",
                list(numbers)):
            out[number] = NumberHistory(out[number].sent_at, True)
        return out

    async def held_messages(self, now: float) -> list[MessageRecord]:
        return await _with_recipients(self._conn, await self._conn.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE state='held' AND next_attempt_at <= $1 "
            "AND EXISTS (SELECT 1 FROM recipients r WHERE r.message_id=messages.id AND r.state='pending') "
            "ORDER BY created_at, id", now))

    async def held_numbers(self, now: float) -> dict[str, list[MessageRecord]]:
        numbers = [r[0] for r in await self._conn.fetch(
            "SELECT number FROM recipients WHERE state='held' GROUP BY number "
            "HAVING min(hold_until) <= $1 ORDER BY number", now)]
        out = {}
        for number in numbers:
            out[number] = await _with_recipients(self._conn, await self._conn.fetch(
                f"SELECT {_COLUMNS_M} FROM recipients r JOIN messages m ON m.id=r.message_id "
                "WHERE r.number=$1 AND r.state='held' ORDER BY m.created_at, m.id", number))
        return out

    async def apply(self, c: Changes) -> None:
        conn, at = self._conn, c.at
        if c.messages:
            await _insert(conn, c.messages, [at] * len(c.messages))
        if c.sends:
            mids, numbers = [m for m, _ in c.sends], [n for _, n in c.sends]
            await conn.execute("INSERT INTO sends(number, sent_at) SELECT unnest($1::text[]), $2",
                               numbers, at)
            await conn.execute(
                "UPDATE recipients r SET admitted_at=$1 FROM unnest($2::text[], $3::text[]) AS v(mid, num) "
                "WHERE r.message_id=v.mid AND r.number=v.num", at, mids, numbers)
        if c.holds:
            await conn.execute(
                "UPDATE recipients r SET state='held', hold_until=v.until, updated_at=$1 "
                "FROM unnest($2::text[], $3::text[], $4::float8[]) AS v(mid, num, until) "
                "WHERE r.message_id=v.mid AND r.number=v.num AND r.state IN ('pending','held')",
                at, [h[0] for h in c.holds], [h[1] for h in c.holds], [h[2] for h in c.holds])
        for mid in dict.fromkeys(mid for mid, _, _ in c.holds):
            await conn.execute("UPDATE messages SET hold_reason=$1 WHERE id=$2", c.hold_reason or None, mid)
            if not await conn.fetchval("SELECT 1 FROM recipients WHERE message_id=$1 AND state='pending' "
                                       "LIMIT 1", mid):
                await _settle(conn, mid, at)
        for f in c.folds:
            state = "bundled" if f.bundle_id else "collapsed"
            ids = list(f.message_ids)
            if f.number is None:
                await conn.execute("UPDATE recipients SET state=$1, bundle_id=$2, updated_at=$3 "
                                   "WHERE state='pending' AND message_id = ANY($4::text[])",
                                   state, f.bundle_id, at, ids)
                await conn.execute("UPDATE messages SET state=$1, bundle_id=$2, updated_at=$3 "
                                   "WHERE state='held' AND id = ANY($4::text[])", state, f.bundle_id, at, ids)
                continue
            await conn.execute("UPDATE recipients SET state=$1, bundle_id=$2, hold_until=NULL, updated_at=$3 "
                               "WHERE number=$4 AND state='held' AND message_id = ANY($5::text[])",
                               state, f.bundle_id, at, f.number, ids)
            for (mid,) in await conn.fetch("SELECT id FROM messages WHERE state='held' AND id = ANY($1::text[]) "
                                           "ORDER BY id", ids):
                await _settle(conn, mid, at)


class PostgresStore:
    def __init__(self, storage: Storage, *, pool_size: int = POOL_SIZE) -> None:
        self.storage = storage
        self.broken: str | None = None  # never set: see the module's docstring
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._waiting = 0
        self._errors = 0
        self._taken_over = 0
        self._claims: dict[str, int] = {}  # message id → its attempts when this replica claimed it
        self._receive: _Batcher[tuple[Received, str, float], bool] = _Batcher(self._receive_batch)
        self._finish: _Batcher[Result, MessageState] = _Batcher(self._finish_batch)
        self._next_compaction = 0.0
        self._me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"  # planning leases

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        where = str(self.storage)
        try:
            self._pool = await asyncpg.create_pool(
                self.storage.url, password=self.storage.password, min_size=1, max_size=self._pool_size,
                command_timeout=STATEMENT_TIMEOUT, timeout=10,
                server_settings={"application_name": "sms-receiver"})
            async with self._pool.acquire() as conn:
                await migrate(conn)
        except SchemaError as exc:
            await self.close()
            raise StoreError(f"cannot use the outbox {where}: {exc}") from None
        except (asyncpg.PostgresError, *_DOWN) as exc:
            await self.close()
            raise StoreError(f"cannot open the outbox {where}: {_describe(exc)}") from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (asyncio.TimeoutError, *_DOWN):
                pool.terminate()

    # -- plumbing -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection; every database or connection failure as :class:`StoreError`."""
        pool = self._pool
        if pool is None:
            raise StoreError("the outbox is not open")
        self._waiting += 1
        try:
            try:
                conn = await pool.acquire(timeout=STATEMENT_TIMEOUT)
            finally:
                self._waiting -= 1
            try:
                yield conn
            finally:
                try:
                    await pool.release(conn)
                except Exception:  # noqa: BLE001 - what ran on it is done (or raised already);
                    pass  # a connection that cannot be reset is closed by the pool, not reused
        except (asyncpg.PostgresError, *_DOWN) as exc:
            self._errors += 1
            raise StoreError(f"PostgreSQL: {_describe(exc)}") from None

    async def _run(self, fn: Callable[[Any], Awaitable[T]], *, transaction: bool = True) -> T:
        async with self._conn() as conn:
            if not transaction:
                return await fn(conn)
            async with conn.transaction():
                return await fn(conn)

    def trouble(self) -> str | None:
        return None  # a restart does not bring a database back; readiness shows it is down

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute(
            "INSERT INTO probe(id, at) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET at=excluded.at"),
            transaction=False)

    def usage(self) -> StoreUsage:
        pool = self._pool
        size, idle = (pool.get_size(), pool.get_idle_size()) if pool is not None else (0, 0)
        return StoreUsage("postgresql", size - idle, idle, self._waiting, self._errors, self._taken_over)

    # -- intake and planning ---------------------------------------------------------------------

    async def receive(self, notification: Received, key: str, window: float) -> bool:
        return await self._receive.add((notification, key, window))

    async def _receive_batch(self, items: list[tuple[Received, str, float]]) -> list[bool]:
        first: dict[str, int] = {}  # a key's first webhook in the batch; later twins are replays
        for i, (_, key, _) in enumerate(items):
            first.setdefault(key, i)
        keys = sorted(first)  # one lock order for every batch: no deadlock between replicas

        async def run(conn: Any) -> set[str]:
            rows = [items[first[k]] for k in keys]
            fresh: set[str] = set()
            for window in sorted({w for _, _, w in rows}):  # one, the configured dedup_window
                these = [(n, k) for n, k, w in rows if w == window]
                fresh.update(r[0] for r in await conn.fetch(
                    "INSERT INTO dedup AS d(key, seen_at) SELECT * FROM unnest($1::text[], $2::float8[]) "
                    "ON CONFLICT (key) DO UPDATE SET seen_at=excluded.seen_at "
                    "WHERE d.seen_at <= excluded.seen_at - $3::float8 RETURNING key",
                    [k for _, k in these], [n.received_at for n, _ in these], float(window)))
            new = [n for n, k, _ in rows if k in fresh]
            if new:
                await conn.execute(
                    "INSERT INTO notifications(id, received_at, source, body, priority) "
                    "SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::bytea[], $5::int[])",
                    [n.id for n in new], [n.received_at for n in new], [n.source for n in new],
                    [n.body for n in new], [n.priority for n in new])
            return fresh

        fresh = await self._run(run)
        return [i == first[k] and k in fresh for i, (_, k, _) in enumerate(items)]

    async def accept(self, messages: Sequence[NewMessage], now: float) -> None:
        await self._run(lambda conn: _insert(conn, messages, [now] * len(messages)))

    async def unplanned(self, limit: int) -> list[Received]:
        rows = await self._run(lambda conn: conn.fetch(
            "UPDATE notifications SET planning_until = now() + make_interval(secs => $2), planning_by=$3 "
            "WHERE id IN (SELECT id FROM notifications WHERE error IS NULL AND (planning_until IS NULL "
            "OR planning_until < now() OR planning_by = $3) ORDER BY priority, id LIMIT $1 "
            "FOR UPDATE SKIP LOCKED) RETURNING id, received_at, source, body, priority",
            limit, float(PLANNING_LEASE), self._me))
        return sorted((Received(*r) for r in rows), key=lambda n: (n.priority, n.id))

    async def planned(self, plans: Sequence[Planned]) -> None:
        async def run(conn: Any) -> None:
            failed = [p for p in plans if p.error is not None]
            if failed:
                await conn.executemany("UPDATE notifications SET error=$1, planning_until=NULL WHERE id=$2",
                                       [(p.error, p.notification_id) for p in failed])
            done = [p for p in plans if p.error is None]
            try:
                async with conn.transaction():  # a savepoint
                    await self._store_plans(conn, done)
            except _REFUSED:  # one plan the database refuses (a bug): find it
                for plan in done:
                    try:
                        async with conn.transaction():
                            await self._store_plans(conn, [plan])
                    except _REFUSED as exc:
                        await conn.execute("UPDATE notifications SET error=$1, planning_until=NULL "
                                           "WHERE id=$2", f"cannot store its messages: {exc}",
                                           plan.notification_id)

        await self._run(run)

    @staticmethod
    async def _store_plans(conn: Any, plans: Sequence[Planned]) -> None:
        """The notifications out first: one another replica planned meanwhile (its planning
        lease ran out) is gone, and its plan is not stored twice."""
        gone = {r[0] for r in await conn.fetch("DELETE FROM notifications WHERE id = ANY($1::text[]) "
                                               "RETURNING id", [p.notification_id for p in plans])}
        plans = [p for p in plans if p.notification_id in gone]
        await _insert(conn, [m for p in plans for m in p.messages],
                      [p.received_at for p in plans for _ in p.messages])

    async def received(self, notification_id: str) -> Received | None:
        row = await self._run(lambda conn: conn.fetchrow(
            "SELECT id, received_at, source, body, priority, error FROM notifications WHERE id=$1",
            notification_id), transaction=False)
        return None if row is None else Received(*row)

    # -- sending ---------------------------------------------------------------------------------

    async def claim(self, now: float, limit: int, lease: float,
                    exclude: Sequence[str] = ()) -> list[MessageRecord]:
        skip = list(exclude)

        async def run(conn: Any) -> tuple[list[MessageRecord], int]:
            rows = list(await conn.fetch(
                f"UPDATE messages m SET state='sending', lease_until=$1::float8 + $3, "
                "attempts=m.attempts+1, updated_at=$1 WHERE id IN (SELECT id FROM messages "
                "WHERE state='pending' AND next_attempt_at <= $1 AND NOT id = ANY($4::text[]) "
                "ORDER BY priority, next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_COLUMNS_M}", now, limit, float(lease), skip))
            taken = 0
            if len(rows) < limit:  # leases that ran out: a replica died or lost its database
                more = await conn.fetch(
                    f"UPDATE messages m SET state='sending', lease_until=$1::float8 + $3, "
                    "attempts=m.attempts+1, updated_at=$1 WHERE id IN (SELECT id FROM messages "
                    "WHERE state='sending' AND lease_until <= $1 AND NOT id = ANY($4::text[]) "
                    "ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED) "
                    f"RETURNING {_COLUMNS_M}", now, limit - len(rows), float(lease), skip)
                taken = len(more)
                rows += more
            rows.sort(key=lambda r: (r[14], r[12]))  # priority, next_attempt_at
            return await _with_recipients(conn, rows), taken

        claimed, taken = await self._run(run)
        if taken:
            self._taken_over += taken
            log.warning("took over %d message(s) whose claim ran out (a replica died or lost the "
                        "database): sent again (see Delivery guarantees)", taken)
        for m in claimed:
            self._claims[m.id] = m.attempts
        return claimed

    async def finish(self, result: Result) -> MessageState:
        return await self._finish.add(result)

    async def _finish_batch(self, results: list[Result]) -> list[MessageState]:
        async def run(conn: Any) -> list[MessageState]:
            ids = sorted({r.message_id for r in results})  # locked in one order: no deadlock
            current = {row[0]: (row[1], row[2]) for row in await conn.fetch(
                "SELECT id, attempts, state FROM messages WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                ids)}
            states: dict[int, MessageState] = {}
            owned: list[tuple[int, Result]] = []
            for i, r in enumerate(results):
                attempts, state = current.get(r.message_id, (None, None))
                if state is None:
                    states[i] = "pending"  # pruned or never there: nothing to record
                elif attempts != self._claims.get(r.message_id, attempts):  # claimed again since
                    states[i] = await self._fenced(conn, r, state)
                else:
                    owned.append((i, r))
            rounds: list[list[tuple[int, Result]]] = []  # a message at most once per round, in order
            for i, r in owned:
                n = sum(any(x.message_id == r.message_id for _, x in rd) for rd in rounds)
                if n == len(rounds):
                    rounds.append([])
                rounds[n].append((i, r))
            for rd in rounds:
                states.update(zip([i for i, _ in rd], await self._record(conn, [r for _, r in rd]), strict=True))
            return [states[i] for i in range(len(results))]

        states = await self._run(run)
        for r in results:
            self._claims.pop(r.message_id, None)
        return states

    @staticmethod
    async def _fenced(conn: Any, r: Result, state: MessageState) -> MessageState:
        """Another claim owns the message now: only what its recipients became is recorded."""
        log.warning("message %s was claimed again while this replica sent it (its lease ran out): "
                    "recording what its recipients became, not its state", r.message_id)
        for u in r.updates:
            await conn.execute(
                "UPDATE recipients SET state=$1, api_message_id=COALESCE($2, api_message_id), error_code=$3, "
                "error=$4, updated_at=$5 WHERE message_id=$6 AND number=$7 AND state='pending'",
                u.state, u.api_message_id, u.error_code, u.error, r.at, r.message_id, u.number)
        return state

    @staticmethod
    async def _record(conn: Any, results: Sequence[Result]) -> list[MessageState]:
        """Results of distinct messages, a few statements for all of them (as sql.finish)."""
        ups = [(r.message_id, u, r.at) for r in results for u in r.updates]
        if ups:
            await conn.execute(
                "UPDATE recipients AS t SET state=v.state, api_message_id=COALESCE(v.api, t.api_message_id), "
                "error_code=v.code, error=v.error, updated_at=v.at FROM unnest($1::text[], $2::text[], "
                "$3::text[], $4::text[], $5::text[], $6::text[], $7::float8[]) "
                "AS v(mid, number, state, api, code, error, at) WHERE t.message_id=v.mid AND t.number=v.number",
                [m for m, _, _ in ups], [u.number for _, u, _ in ups], [u.state for _, u, _ in ups],
                [u.api_message_id for _, u, _ in ups], [u.error_code for _, u, _ in ups],
                [u.error for _, u, _ in ups], [at for _, _, at in ups])
        dead = [r for r in results if r.dead]
        if dead:
            await conn.execute(
                "UPDATE recipients AS t SET state='failed', error=v.error, updated_at=v.at FROM "
                "unnest($1::text[], $2::text[], $3::float8[]) AS v(mid, error, at) "
                "WHERE t.message_id=v.mid AND t.state='pending'",
                [r.message_id for r in dead], [r.last_error for r in dead], [r.at for r in dead])
        retried = [r.message_id for r in results if r.retry_at is not None]
        if retried:  # what did not go out gives its place in the throttle's history back
            for number, at in await conn.fetch(
                    "UPDATE recipients AS t SET admitted_at=NULL FROM recipients AS o WHERE "
                    "t.message_id = ANY($1::text[]) AND t.state='pending' AND t.admitted_at IS NOT NULL "
                    "AND o.message_id=t.message_id AND o.number=t.number RETURNING t.number, o.admitted_at",
                    retried):
                await conn.execute("DELETE FROM sends WHERE id=(SELECT id FROM sends WHERE number=$1 "
                                   "AND sent_at=$2 LIMIT 1)", number, at)
        counts: dict[str, dict[str, int]] = {r.message_id: {} for r in results}
        for mid, state, n in await conn.fetch(
                "SELECT message_id, state, count(*) FROM recipients WHERE message_id = ANY($1::text[]) "
                "GROUP BY message_id, state", list(counts)):
            counts[mid][state] = n
        states = [message_state(counts[r.message_id], r.dead) for r in results]
        await conn.execute(
            "UPDATE messages AS m SET state=v.state, next_attempt_at=v.next, lease_until=NULL, last_error=v.error, "
            "updated_at=v.at, accepted_at=COALESCE(m.accepted_at, v.accepted) FROM unnest($1::text[], "
            "$2::text[], $3::float8[], $4::text[], $5::float8[], $6::float8[]) "
            "AS v(id, state, next, error, at, accepted) WHERE m.id=v.id",
            [r.message_id for r in results], states,
            [r.retry_at if st == "pending" and r.retry_at is not None else r.at for r, st in zip(results, states)],
            [r.last_error for r in results], [r.at for r in results],
            [r.at if any(u.state == "accepted" for u in r.updates) else None for r in results])
        return states

    async def retry_now(self, now: float) -> int:
        status = await self._run(lambda conn: conn.execute(
            "UPDATE messages SET next_attempt_at=$1 WHERE state='pending' AND next_attempt_at > $1", now))
        return int(status.split()[-1])

    # -- holds -----------------------------------------------------------------------------------

    async def history(self, numbers: Sequence[str], since: float) -> dict[str, NumberHistory]:
        return await self._run(lambda conn: _Decider(conn).history(numbers, since), transaction=False)

    async def held_messages(self, now: float) -> list[MessageRecord]:
        return await self._run(lambda conn: _Decider(conn).held_messages(now))

    async def held_numbers(self, now: float) -> dict[str, list[MessageRecord]]:
        return await self._run(lambda conn: _Decider(conn).held_numbers(now))

    async def apply(self, changes: Changes) -> None:
        await self._run(lambda conn: _Decider(conn).apply(changes))

    @asynccontextmanager
    async def deciding(self) -> AsyncIterator[_Decider]:
        """One transaction holding the policy lock: one decider at a time across replicas; a
        failure anywhere inside rolls all of it back."""
        async with self._conn() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", POLICY_LOCK)
                yield _Decider(conn)

    # -- reporting and housekeeping --------------------------------------------------------------

    async def delivery_report(self, api_message_id: str, status: str,
                              final_state: RecipientState | None, now: float,
                              message_id: str | None = None) -> bool:
        async def run(conn: Any) -> bool:
            mid = message_id or await conn.fetchval(
                "SELECT message_id FROM recipients WHERE message_id >= $1 AND api_message_id=$2 LIMIT 1",
                f"{int((now - REPORT_WINDOW) * 1000):011x}", api_message_id)
            if mid is None:
                return False
            where = "message_id=$1 AND api_message_id=$2"
            found = await conn.fetchval(
                f"WITH u AS (UPDATE recipients SET delivery_status=$3, updated_at=$4 WHERE {where} "
                "AND state NOT IN ('delivered','undelivered') RETURNING 1) SELECT count(*) FROM u",
                mid, api_message_id, status, now)
            if final_state is not None:
                await conn.execute(f"UPDATE recipients SET state=$3 WHERE {where} AND state='accepted'",
                                   mid, api_message_id, final_state)
            if not found:
                found = await conn.fetchval(f"SELECT count(*) FROM recipients WHERE {where}", mid, api_message_id)
            return bool(found)

        return await self._run(run)

    async def get_message(self, message_id: str) -> MessageRecord | None:
        async def run(conn: Any) -> list[MessageRecord]:
            return await _with_recipients(conn, await conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id=$1", message_id))

        found = await self._run(run)
        return found[0] if found else None

    async def list_messages(self, query: MessageQuery) -> list[MessageRecord]:
        where, args = [], []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.group:
            where.append(f"group_id={arg(query.group)}")
        if query.state:
            where.append(f"state={arg(query.state)}")
        if query.since is not None:
            where.append(f"created_at >= {arg(query.since)}::float8")
        if query.notification:  # message ids start with their notification's (hex): a key range
            where.append(f"id >= {arg(query.notification)} AND id < {arg(query.notification + 'g')}")
        sql = f"SELECT {MESSAGE_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at DESC, id DESC LIMIT {arg(query.limit)}"

        async def run(conn: Any) -> list[MessageRecord]:
            return await _with_recipients(conn, await conn.fetch(sql, *args))

        return await self._run(run)

    async def stats(self) -> OutboxStats:
        compact = time.monotonic() >= self._next_compaction

        async def run(conn: Any) -> OutboxStats:
            if compact:  # the counts' rows summed into one per state (see postgres_schema)
                await conn.execute(
                    "WITH gone AS (DELETE FROM message_counts RETURNING state, n) "
                    "INSERT INTO message_counts(state, n) SELECT state, sum(n) FROM gone GROUP BY state")
            by_state = {r[0]: int(r[1]) for r in await conn.fetch(
                "SELECT state, sum(n) FROM message_counts GROUP BY state")}
            oldest = await conn.fetchval("SELECT min(created_at) FROM messages WHERE state IN ('pending','sending')")
            held = await conn.fetchval("SELECT count(*) FROM recipients WHERE state='held'")
            waiting, failed, first = await conn.fetchrow(
                "SELECT count(*), count(error), min(CASE WHEN error IS NULL THEN received_at END) "
                "FROM notifications")
            if first is not None and (oldest is None or first < oldest):
                oldest = first
            return OutboxStats(pending=by_state.get("pending", 0) + by_state.get("sending", 0),
                               oldest_pending_created_at=oldest, by_state=by_state, held_recipients=held,
                               unplanned=waiting - failed, unplanned_failed=failed)

        stats = await self._run(run)
        if compact:
            self._next_compaction = time.monotonic() + 10.0
        return stats

    async def prune(self, before: float, keys_before: float, sends_before: float,
                    limit: int = 10_000) -> int:
        async def run(conn: Any) -> int:
            ids = [r[0] for r in await conn.fetch(
                "SELECT id FROM messages WHERE created_at < $1 AND state = ANY($2::text[]) "
                "ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED", before, _FINISHED, limit)]
            n = 0
            if ids:
                n += _count(await conn.execute("DELETE FROM recipients WHERE message_id = ANY($1::text[])", ids))
                n += _count(await conn.execute("DELETE FROM messages WHERE id = ANY($1::text[])", ids))
            n += _count(await conn.execute("DELETE FROM dedup WHERE key IN (SELECT key FROM dedup "
                                           "WHERE seen_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                                           keys_before, limit))
            n += _count(await conn.execute("DELETE FROM sends WHERE id IN (SELECT id FROM sends "
                                           "WHERE sent_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                                           sends_before, limit))
            return n

        return await self._run(run)


def _count(status: str) -> int:
    """The row count of an asyncpg command status (``DELETE 12``)."""
    return int(status.split()[-1])


def _describe(exc: BaseException) -> str:
    """An error's message, without anything of the URL's password (asyncpg never puts it in)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, asyncpg.PostgresError) else text
