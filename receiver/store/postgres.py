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
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg

from receiver.config import Storage
from receiver.models import FINISHED_STATES, MessageState, NewMessage, RecipientState
from receiver.store import (
    REPORT_WINDOW,
    Changes,
    MessageQuery,
    MessageRecord,
    NumberHistory,
    OutboxStats,
    Planned,
    Received,
    Result,
    StoreError,
    StoreUsage,
)
from receiver.store.batch import Batcher
from receiver.store.postgres_schema import POLICY_LOCK, SchemaError, migrate
from receiver.store import NewAck, PageRecord  # two-way paging
from receiver.store import postgres_sql as pg2
from receiver.store.postgres_sql import (
    COLUMNS_M,
    COUNTS_CHUNK,
    Clean,
    Decider,
    compact_counts,
    compact_group_hours,
    fenced,
    insert,
    record_results,
    rowcount,
    with_recipients,
)
from receiver.store.sql import MESSAGE_COLUMNS
from receiver.store.sql import HistoryStatements, history_page, record
from receiver.store import GroupCounts, HistoryPage, HistoryQuery

log = logging.getLogger("sms_receiver.store")
T = TypeVar("T")

POOL_SIZE = 10
STATEMENT_TIMEOUT = 30.0  # seconds: no statement waits longer (a lost connection, a lock)
PLANNING_LEASE = 10  # seconds a replica has to plan what it took (milliseconds of work); after
# that (it died) another plans them: a page answered 2xx waits at most this for a dead planner
# Set on every connection, over anything the URL or the role says: the guarantees depend on them.
SESSION = {
    "application_name": "sms-receiver",
    "synchronous_commit": "on",  # a webhook is answered once its commit is flushed
    "default_transaction_isolation": "read committed",  # each statement sees what committed before it
    # A replica that froze or lost its network inside a transaction must not hold the policy lock
    # or a dedup key's row from the others for longer than this
    "idle_in_transaction_session_timeout": "20s",
    "lock_timeout": "15s",
    "statement_timeout": "30s",
    "tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
}
_FINISHED = list(FINISHED_STATES)
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)  # what a bug's data meets
# Connection-level failures: the database is down, restarting or unreachable.
_DOWN = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError,
         asyncpg.PostgresConnectionError,
         asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError, asyncpg.AdminShutdownError)


class PostgresStore:
    def __init__(self, storage: Storage, *, pool_size: int = POOL_SIZE,
                 session: dict[str, str] | None = None) -> None:
        self.storage = storage
        self._session = {**SESSION, **(session or {})}  # tests shorten the timeouts
        self.broken: str | None = None  # never set: see the module's docstring
        self.shared = True
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._waiting = 0
        self._errors = 0
        self._taken_over = 0
        # message id → (its attempts when this replica claimed it, when): fences late results
        self._claims: dict[str, tuple[int, float]] = {}
        self._receive: Batcher[tuple[Received, str, float], bool] = Batcher(self._receive_batch)
        self._finish: Batcher[Result, MessageState] = Batcher(self._finish_batch)
        self._me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"  # planning leases

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        where = str(self.storage)
        try:
            # min_size 0: no floor for the pool to restore (and log a traceback for) while it is down
            self._pool = await asyncpg.create_pool(
                self.storage.url, password=self.storage.password, min_size=0, max_size=self._pool_size,
                command_timeout=STATEMENT_TIMEOUT, timeout=10, server_settings=self._session)
            async with self._pool.acquire() as conn:
                await migrate(conn)
                # Notifications that could not be planned: a new start (a fixed release) tries again.
                retried = rowcount(await conn.execute("UPDATE notifications SET error=NULL, planning_until=NULL "
                                                    "WHERE error IS NOT NULL"))
            if retried:
                log.warning("%d notification(s) that could not be planned before are tried again", retried)
        except SchemaError as exc:
            await self.close()
            raise StoreError(f"cannot use the outbox {where}: {exc}") from None
        except (asyncpg.PostgresError, *_DOWN) as exc:
            await self.close()
            raise StoreError(f"cannot open the outbox {where}: {self._describe(exc)}") from None

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (asyncio.TimeoutError, *_DOWN):
                pool.terminate()

    # -- plumbing -------------------------------------------------------------------------------

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Clean]:
        """A pooled connection; a failure of the database, the connection or the driver as
        :class:`StoreError` (and counted)."""
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
                yield Clean(conn)
            except asyncpg.ReadOnlySQLTransactionError:
                # A standby after a failover, or a database set read-only: the session keeps
                # what it started with, so it is dropped and the next one starts afresh
                conn.terminate()
                raise
            finally:
                try:
                    await pool.release(conn)
                except Exception:  # noqa: BLE001 - what ran on it is done (or raised already);
                    pass  # a connection that cannot be reset is closed by the pool, not reused
        except (asyncpg.PostgresError, *_DOWN) as exc:
            self._errors += 1
            raise StoreError(f"PostgreSQL: {self._describe(exc)}") from None

    async def _run(self, fn: Callable[[Any], Awaitable[T]], *, transaction: bool = True) -> T:
        async with self._conn() as conn:
            if not transaction:
                return await fn(conn)
            async with conn.transaction():
                return await fn(conn)

    def _describe(self, exc: BaseException) -> str:
        """An error's message for logs and answers: never the password, should a driver's
        message quote the URL or a part of it."""
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, asyncpg.PostgresError):
            text = f"{type(exc).__name__}: {text}"
        parts = urlsplit(self.storage.url)
        query = [v for k, vs in parse_qs(parts.query).items() if "password" in k.lower() for v in vs]
        for secret in (self.storage.password, parts.password, *query):
            if secret:
                text = text.replace(secret, "***")
        return text

    def trouble(self) -> str | None:
        return None  # a restart does not bring a database back; readiness shows it is down

    async def ping(self) -> None:
        """Raises unless a webhook could be stored now: the rows a webhook writes (a dedup key,
        a notification of a webhook's size) are written and rolled back. A one-row upsert
        succeeded while a full disk or a lock on the dedup table refused every webhook."""
        async def run(conn: Any) -> None:
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute("SET LOCAL lock_timeout = '2s'")  # a lock held: not ready, soon
                probe = f"probe:{self._me}:{secrets.token_hex(8)}"
                await conn.execute("INSERT INTO dedup(key, seen_at) VALUES ($1, 0)", probe)
                await conn.execute("INSERT INTO notifications(id, received_at, source, body, priority) "
                                   "VALUES ($1, 0, 'probe', $2, 0)", probe, secrets.token_bytes(2048))
            finally:
                await tx.rollback()

        await self._run(run, transaction=False)

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
        await self._run(lambda conn: insert(conn, messages, [now] * len(messages)))

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
        await insert(conn, [m for p in plans for m in p.messages],
                      [p.received_at for p in plans for _ in p.messages])
        await pg2.insert_pages(conn, plans)

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
            # Due messages and those whose claim ran out (a replica died or lost the database)
            # in one order: a critical page a dead replica held goes before a storm of warnings
            rows = list(await conn.fetch(
                "WITH due AS (SELECT id, state AS was FROM messages WHERE ((state='pending' AND "
                "next_attempt_at <= $1) OR (state='sending' AND lease_until <= $1)) AND NOT id = ANY($4::text[]) "
                "ORDER BY priority, next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) "
                "UPDATE messages m SET state='sending', lease_until=$1::float8 + $3, attempts=m.attempts+1, "
                f"updated_at=$1 FROM due WHERE m.id=due.id RETURNING {COLUMNS_M}, due.was",
                now, limit, float(lease), skip))
            taken = sum(r[-1] == "sending" for r in rows)
            rows.sort(key=lambda r: (r[14], r[12]))  # priority, next_attempt_at
            return await with_recipients(conn, [tuple(r)[:-1] for r in rows]), taken

        claimed, taken = await self._run(run)
        since = time.monotonic() - 10 * lease  # claims never finished (held whole, a failed gate)
        self._claims = {k: v for k, v in self._claims.items() if v[1] > since}
        if taken:
            self._taken_over += taken
            log.warning("took over %d message(s) whose claim ran out (a replica died or lost the "
                        "database): sent again (see Delivery guarantees)", taken)
        for m in claimed:
            self._claims[m.id] = (m.attempts, time.monotonic())
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
                elif attempts != self._claims.get(r.message_id, (attempts, 0.0))[0]:  # claimed again since
                    states[i] = await fenced(conn, r, state)
                else:
                    owned.append((i, r))
            rounds: list[list[tuple[int, Result]]] = []  # a message at most once per round, in order
            for i, r in owned:
                n = sum(any(x.message_id == r.message_id for _, x in rd) for rd in rounds)
                if n == len(rounds):
                    rounds.append([])
                rounds[n].append((i, r))
            for rd in rounds:
                states.update(zip([i for i, _ in rd], await record_results(conn, [r for _, r in rd]), strict=True))
            return [states[i] for i in range(len(results))]

        states = await self._run(run)
        for r in results:
            self._claims.pop(r.message_id, None)
        return states


    async def retry_now(self, now: float) -> int:
        return rowcount(await self._run(lambda conn: conn.execute(
            "UPDATE messages SET next_attempt_at=$1 WHERE state='pending' AND next_attempt_at > $1", now)))

    # -- holds -----------------------------------------------------------------------------------

    async def history(self, numbers: Sequence[str], since: float) -> dict[str, NumberHistory]:
        return await self._run(lambda conn: Decider(conn).history(numbers, since), transaction=False)

    async def held_messages(self, now: float) -> list[MessageRecord]:
        return await self._run(lambda conn: Decider(conn).held_messages(now))

    async def held_numbers(self, now: float) -> dict[str, list[MessageRecord]]:
        return await self._run(lambda conn: Decider(conn).held_numbers(now))

    async def apply(self, changes: Changes) -> None:
        await self._run(lambda conn: Decider(conn).apply(changes))

    @asynccontextmanager
    async def deciding(self) -> AsyncIterator[Decider]:
        """One transaction holding the policy lock: one decider at a time across replicas; a
        failure anywhere inside rolls all of it back."""
        async with self._conn() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", POLICY_LOCK)
                yield Decider(conn)

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
            return await with_recipients(conn, await conn.fetch(
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
            return await with_recipients(conn, await conn.fetch(sql, *args))

        return await self._run(run)

    async def stats(self) -> OutboxStats:
        async def run(conn: Any) -> OutboxStats:
            await compact_counts(conn)
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

        return await self._run(run)

    async def prune(self, before: float, keys_before: float, sends_before: float,
                    limit: int = 10_000) -> int:
        async def run(conn: Any) -> int:
            ids = [r[0] for r in await conn.fetch(
                "SELECT id FROM messages WHERE created_at < $1 AND state = ANY($2::text[]) "
                "ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED", before, _FINISHED, limit)]
            n = 0
            if ids:
                n += rowcount(await conn.execute("DELETE FROM recipients WHERE message_id = ANY($1::text[])", ids))
                n += rowcount(await conn.execute("DELETE FROM messages WHERE id = ANY($1::text[])", ids))
            n += rowcount(await conn.execute("DELETE FROM dedup WHERE key IN (SELECT key FROM dedup "
                                           "WHERE seen_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                                           keys_before, limit))
            n += rowcount(await conn.execute("DELETE FROM sends WHERE id IN (SELECT id FROM sends "
                                           "WHERE sent_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                                           sends_before, limit))
            n += await pg2.prune_pages(conn, before, limit)
            while await compact_counts(conn) == COUNTS_CHUNK:
                pass
            while await compact_group_hours(conn) == COUNTS_CHUNK:  # else it grows with every send
                pass
            return n

        return await self._run(run)

    # -- the history page (receiver.ui): the SQLite store's statements (sql.py) ----------------

    async def message_history(self, query: HistoryQuery) -> HistoryPage:
        statements = HistoryStatements(query, pg=True)

        async def run(conn: Any) -> HistoryPage:
            bound = None
            if statements.bound is not None:
                found = await conn.fetchrow(*_flat(statements.bound))
                bound = None if found is None else (float(found[0]), str(found[1]))
            rows = await conn.fetch(*_flat(statements.page(bound)))
            shown = await with_recipients(conn, rows[: query.limit])
            if len(rows) > query.limit:
                shown.append(record(tuple(rows[query.limit]), ()))  # only its key is used
            return history_page(query, shown, bound)

        return await self._run(run, transaction=False)

    async def group_counts(self, since: float) -> list[GroupCounts]:
        """From group_hours (postgres_schema.py), compacting its oldest rows first, as
        :meth:`stats` does message_counts."""
        async def run(conn: Any) -> list[GroupCounts]:
            await compact_group_hours(conn)
            by_group: dict[str, dict[str, int]] = {}
            for group, state, n in await conn.fetch(
                    "SELECT group_id, state, sum(n) FROM group_hours WHERE hour >= $1 GROUP BY 1, 2",
                    int(since // 3600)):
                if n:
                    by_group.setdefault(group, {})[state] = int(n)
            return [GroupCounts(g, counts) for g, counts in sorted(by_group.items())]

        return await self._run(run)

    # -- the urgent ceiling (receiver.paging) ----------------------------------------------------

    async def urgent_sends(self, numbers: Sequence[str], since: float, created_since: float,
                           rank: int) -> dict[str, list[float]]:
        return await self._run(lambda conn: Decider(conn).urgent_sends(numbers, since, created_since, rank),
                               transaction=False)

    # -- two-way paging --------------------------------------------------------------------------

    async def allocate_refs(self, n: int) -> list[int]:
        async def run(conn: Any) -> list[int]:
            return [int(r[0]) for r in await conn.fetch(
                "SELECT nextval('page_refs') FROM generate_series(1, $1)", n)]

        return await self._run(run, transaction=False)

    async def page(self, ref: int) -> PageRecord | None:
        async def run(conn: Any) -> list[PageRecord]:
            return await pg2.pages(conn, await conn.fetch(f"SELECT {pg2.PAGE_COLUMNS} FROM pages WHERE ref=$1", ref))

        found = await self._run(run)
        return found[0] if found else None

    async def last_page(self, number: str) -> PageRecord | None:
        async def run(conn: Any) -> list[PageRecord]:
            return await pg2.pages(conn, await conn.fetch(pg2.LAST_PAGE, number))

        found = await self._run(run)
        return found[0] if found else None

    async def pages_of(self, message_ids: Sequence[str]) -> dict[str, PageRecord]:
        async def run(conn: Any) -> dict[str, PageRecord]:
            by_ref: dict[int, list[str]] = {}
            for ref, mid in await conn.fetch(pg2.PAGES_OF, list(message_ids)):
                by_ref.setdefault(ref, []).append(mid)
            if not by_ref:
                return {}
            records = await pg2.pages(conn, await conn.fetch(
                f"SELECT {pg2.PAGE_COLUMNS} FROM pages WHERE ref = ANY($1::bigint[])", list(by_ref)))
            return {mid: rec for rec in records for mid in by_ref[rec.ref]}

        return await self._run(run)

    async def reply_seen(self, reply_id: str, number: str, at: float, action: str) -> bool:
        return rowcount(await self._run(lambda conn: conn.execute(
            "INSERT INTO replies(id, number, at, action) VALUES ($1,$2,$3,$4) ON CONFLICT DO NOTHING",
            reply_id, number, at, action))) == 1

    async def replied_since(self, number: str, action: str, since: float) -> int:
        return int(await self._run(lambda conn: conn.fetchval(
            "SELECT count(*) FROM replies WHERE number=$1 AND action=$2 AND at>$3", number, action, since),
            transaction=False))

    async def ack(self, ack: NewAck) -> bool:
        async def run(conn: Any) -> bool:
            if rowcount(await conn.execute(
                    "INSERT INTO acks(reply_id, ref, number, by_name, at, until) VALUES ($1,$2,$3,$4,$5,$6) "
                    "ON CONFLICT DO NOTHING", ack.reply_id, ack.ref, ack.number, ack.by, ack.at, ack.until)) != 1:
                return False
            await conn.execute("UPDATE pages SET acked_at=$1, escalate_at=NULL WHERE ref=$2", ack.at, ack.ref)
            return True

        return await self._run(run)

    async def ack_outcome(self, reply_id: str, silence_ids: Sequence[str], outcome: str) -> None:
        await self._run(lambda conn: conn.execute("UPDATE acks SET silence_ids=$1, outcome=$2 WHERE reply_id=$3",
                                                  json.dumps(list(silence_ids)), outcome, reply_id))

    async def unack(self, ref: int, at: float, escalate_at: float | None) -> list[str]:
        async def run(conn: Any) -> list[str]:
            rows = await conn.fetch("UPDATE acks SET unacked_at=$1 WHERE ref=$2 AND unacked_at IS NULL "
                                    "RETURNING silence_ids", at, ref)
            await conn.execute("UPDATE pages SET acked_at=NULL, escalate_at=$1 WHERE ref=$2", escalate_at, ref)
            return [sid for (ids,) in rows for sid in json.loads(ids or "[]")]

        return await self._run(run)

    async def escalate_at(self, ref: int, at: float) -> bool:
        return rowcount(await self._run(lambda conn: conn.execute(
            "UPDATE pages SET escalate_at=$1 WHERE ref=$2 AND acked_at IS NULL", at, ref))) == 1

    async def due_escalations(self, now: float, limit: int) -> list[PageRecord]:
        async def run(conn: Any) -> list[PageRecord]:
            return await pg2.pages(conn, await conn.fetch(pg2.DUE_ESCALATIONS, now, limit))

        return await self._run(run)

    async def escalated(self, ref: int, rounds: int, next_at: float | None, at: float,
                        messages: Sequence[NewMessage], groups: Sequence[str]) -> bool:
        async def run(conn: Any) -> bool:
            # the conditional UPDATE is the claim: of two replicas, the second finds rounds moved on
            if rowcount(await conn.execute(
                    "UPDATE pages SET rounds=rounds+1, escalate_at=$1 WHERE ref=$2 AND rounds=$3 "
                    "AND acked_at IS NULL", next_at, ref, rounds)) != 1:
                return False
            await insert(conn, messages, [at] * len(messages))
            await conn.executemany(
                "INSERT INTO escalations(ref, round, group_id, at, message_id) VALUES ($1,$2,$3,$4,$5)",
                [(ref, rounds + 1, g, at, m.id) for g, m in zip(groups, messages, strict=True)])
            return True

        return await self._run(run)


def _flat(statement: tuple[str, list[Any]]) -> tuple[Any, ...]:
    return (statement[0], *statement[1])
