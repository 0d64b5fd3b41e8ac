"""Every statement the PostgreSQL outbox runs, as functions of an asyncpg connection inside a
transaction the store opened (:mod:`receiver.store.postgres`); the SQLite ones are
:mod:`receiver.store.sql`, and these keep their semantics. No policy: what to hold, release or
send was decided before (:mod:`receiver.holds`).

Rows go in as arrays through ``unnest``: one statement for a group of results or messages, and
one plan per statement text (asyncpg prepares each once per connection).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from receiver.models import MessageState, NewMessage, message_state
from receiver.store import Changes, MessageRecord, NumberHistory, RecipientRecord, Result
from receiver.store.sql import MESSAGE_COLUMNS, RECIPIENT_COLUMNS, record
from receiver.store import AckRecord, EscalationRecord, PageRecord  # two-way paging

log = logging.getLogger("sms_receiver.store")
COUNTS_CHUNK = 10_000  # message_counts rows summed per statement


def message_rows(messages: Sequence[NewMessage], times: Sequence[float]) -> list[list[Any]]:
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
COLUMNS_M = ", ".join("m." + c.strip() for c in MESSAGE_COLUMNS.split(","))


async def insert(conn: Any, messages: Sequence[NewMessage], times: Sequence[float]) -> None:
    if not messages:
        return
    await conn.execute(_INSERT_MESSAGES, *message_rows(messages, times))
    rows = [(m.id, n, "suppressed" if m.suppressed else "pending", t, t if m.admitted else None)
            for m, t in zip(messages, times, strict=True) for n in m.recipients]
    await conn.execute(_INSERT_RECIPIENTS, *[list(c) for c in zip(*rows, strict=True)])


async def with_recipients(conn: Any, rows: Sequence[Any]) -> list[MessageRecord]:
    if not rows:
        return []
    by_message: dict[str, list[RecipientRecord]] = {r[0]: [] for r in rows}
    for row in await conn.fetch(f"SELECT message_id, {RECIPIENT_COLUMNS} FROM recipients "
                                "WHERE message_id = ANY($1::text[]) ORDER BY message_id, number",
                                list(by_message)):
        by_message[row[0]].append(RecipientRecord(*row[1:10], admitted=row[10] is not None))
    return [record(tuple(r), by_message[r[0]]) for r in rows]


async def settle(conn: Any, message_id: str, at: float) -> None:
    counts = {r[0]: r[1] for r in await conn.fetch(
        "SELECT state, count(*) FROM recipients WHERE message_id=$1 GROUP BY state", message_id)}
    await conn.execute("UPDATE messages SET state=$1, lease_until=NULL, updated_at=$2 WHERE id=$3",
                       message_state(counts), at, message_id)


class Decider:
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
        return await with_recipients(self._conn, await self._conn.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE state='held' AND next_attempt_at <= $1 "
            "AND EXISTS (SELECT 1 FROM recipients r WHERE r.message_id=messages.id AND r.state='pending') "
            "ORDER BY created_at, id", now))

    async def held_numbers(self, now: float) -> dict[str, list[MessageRecord]]:
        numbers = [r[0] for r in await self._conn.fetch(
            "SELECT number FROM recipients WHERE state='held' GROUP BY number "
            "HAVING min(hold_until) <= $1 ORDER BY number", now)]
        out = {}
        for number in numbers:
            out[number] = await with_recipients(self._conn, await self._conn.fetch(
                f"SELECT {COLUMNS_M} FROM recipients r JOIN messages m ON m.id=r.message_id "
                "WHERE r.number=$1 AND r.state='held' ORDER BY m.created_at, m.id", number))
        return out

    async def apply(self, c: Changes) -> None:
        conn, at = self._conn, c.at
        # The messages it changes locked first, in id order as finish locks them: a result being
        # recorded meanwhile (this replica's sends go on while it decides) waits, or is waited
        # for, and each settles the message on the other's rows
        touched = {m for m, _ in c.sends} | {m for m, _, _ in c.holds} | {i for f in c.folds for i in f.message_ids}
        if touched:
            await conn.execute("SELECT 1 FROM messages WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
                               sorted(touched))
        if c.messages:
            await insert(conn, c.messages, [at] * len(c.messages))
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
                await settle(conn, mid, at)
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
                await settle(conn, mid, at)

    async def urgent_sends(self, numbers: Sequence[str], since: float, created_since: float,
                           rank: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for number, at in await self._conn.fetch(
                "SELECT r.number, r.admitted_at FROM messages m JOIN recipients r ON r.message_id=m.id "
                "WHERE m.created_at > $1 AND m.priority <= $2 AND m.status='firing' "
                "AND r.number = ANY($3::text[]) AND r.admitted_at > $4 ORDER BY r.admitted_at",
                created_since, rank, list(numbers), since):
            out.setdefault(number, []).append(at)
        return out


async def fenced(conn: Any, r: Result, state: MessageState) -> MessageState:
    """Another claim owns the message now: only what its recipients became is recorded."""
    log.warning("message %s was claimed again while this replica sent it (its lease ran out): "
                "recording what its recipients became, not its state", r.message_id)
    for u in r.updates:
        await conn.execute(
            "UPDATE recipients SET state=$1, api_message_id=COALESCE($2, api_message_id), error_code=$3, "
            "error=$4, updated_at=$5 WHERE message_id=$6 AND number=$7 AND state='pending'",
            u.state, u.api_message_id, u.error_code, u.error, r.at, r.message_id, u.number)
    if state == "pending":  # the new claim ended with a retry: what is left to send may be nothing now
        await settle(conn, r.message_id, r.at)
        state = await conn.fetchval("SELECT state FROM messages WHERE id=$1", r.message_id)
    return state


async def record_results(conn: Any, results: Sequence[Result]) -> list[MessageState]:
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


async def compact_counts(conn: Any) -> int:
    """Sum the oldest rows of ``message_counts`` into one per state (see postgres_schema):
    a bounded statement, however long nobody scraped. Returns how many rows it summed."""
    return int(await conn.fetchval(
        "WITH gone AS (DELETE FROM message_counts WHERE id IN (SELECT id FROM message_counts "
        "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING state, n), "
        "summed AS (INSERT INTO message_counts(state, n) SELECT state, sum(n) FROM gone GROUP BY state) "
        "SELECT count(*) FROM gone", COUNTS_CHUNK))


async def compact_group_hours(conn: Any) -> int:
    """The same for ``group_hours`` (the history page's counts): its rows summed per group, hour
    and state, and those that sum to 0 (an hour whose messages were all pruned) dropped. Returns
    how many rows it summed."""
    return int(await conn.fetchval(
        "WITH gone AS (DELETE FROM group_hours WHERE id IN (SELECT id FROM group_hours "
        "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING group_id, hour, state, n), "
        "summed AS (INSERT INTO group_hours(group_id, hour, state, n) SELECT group_id, hour, state, sum(n) "
        "FROM gone GROUP BY 1, 2, 3 HAVING sum(n) <> 0) SELECT count(*) FROM gone", COUNTS_CHUNK))


def _clean(value: Any) -> Any:
    """PostgreSQL's text cannot hold NUL (SQLite's can): it becomes U+FFFD, so a label, an error
    or a template output that carries one is stored rather than refused."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class Clean:
    """An asyncpg connection whose text arguments never carry NUL (see :func:`_clean`)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def transaction(self) -> Any:
        return self._conn.transaction()

    async def execute(self, query: str, *args: Any, **kw: Any) -> str:
        return await self._conn.execute(query, *map(_clean, args), **kw)

    async def executemany(self, query: str, rows: Any, **kw: Any) -> None:
        await self._conn.executemany(query, [tuple(map(_clean, r)) for r in rows], **kw)

    async def fetch(self, query: str, *args: Any, **kw: Any) -> list[Any]:
        return await self._conn.fetch(query, *map(_clean, args), **kw)

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self._conn.fetchrow(query, *map(_clean, args), **kw)

    async def fetchval(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self._conn.fetchval(query, *map(_clean, args), **kw)


def rowcount(status: str) -> int:
    """The row count of an asyncpg command status (``DELETE 12``)."""
    return int(status.split()[-1])


# ---------------------------------------------------------------------------------------------
# Two-way paging: the statements of sql.py's two-way section, in PostgreSQL's dialect

PAGE_COLUMNS = "ref, message_id, group_id, source, created_at, acked_at, escalate_at, rounds"
_ALL_FAILED = ("(p.rounds = 0 AND EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = p.message_id) AND NOT EXISTS "
               "(SELECT 1 FROM recipients r WHERE r.message_id = p.message_id "
               "AND r.state NOT IN ('failed', 'undelivered')))")


async def insert_pages(conn: Any, plans: Sequence[Any]) -> None:
    pages = [(p.received_at, pg) for p in plans for pg in p.pages]
    if pages:
        await conn.executemany(
            "INSERT INTO pages(ref, message_id, group_id, source, created_at, escalate_at) "
            "VALUES ($1,$2,$3,$4,$5,$6)",
            [(pg.ref, pg.message_id, pg.group_id, pg.source, at, pg.escalate_at) for at, pg in pages])
        await conn.executemany(
            "INSERT INTO page_alerts(ref, key, labels) VALUES ($1,$2,$3) ON CONFLICT DO NOTHING",
            [(pg.ref, key, json.dumps(labels, sort_keys=True)) for _, pg in pages for key, labels in pg.alerts])
    keys = sorted({k for p in plans for k in p.resolved})
    if keys:
        refs = [r[0] for r in await conn.fetch(
            "UPDATE page_alerts SET resolved=true WHERE NOT resolved AND key = ANY($1::text[]) RETURNING ref", keys)]
        if refs:  # all resolved: out of the escalation index, which the escalator reads every poll
            await conn.execute("UPDATE pages SET escalate_at=NULL WHERE ref = ANY($1::bigint[]) AND NOT EXISTS "
                               "(SELECT 1 FROM page_alerts a WHERE a.ref = pages.ref AND NOT a.resolved)",
                               sorted(set(refs)))


async def prune_pages(conn: Any, before: float, limit: int) -> int:
    """Pages created before ``before`` (retention), with their alerts, acks and escalations, and
    replies recorded before it."""
    refs = [r[0] for r in await conn.fetch("SELECT ref FROM pages WHERE created_at < $1 ORDER BY created_at LIMIT $2 "
                                           "FOR UPDATE SKIP LOCKED", before, limit)]
    n = 0
    if refs:
        for table in ("page_alerts", "acks", "escalations", "pages"):
            n += rowcount(await conn.execute(f"DELETE FROM {table} WHERE ref = ANY($1::bigint[])", refs))
    n += rowcount(await conn.execute("DELETE FROM replies WHERE id IN (SELECT id FROM replies WHERE at < $1 "
                                     "LIMIT $2 FOR UPDATE SKIP LOCKED)", before, limit))
    return n


async def pages(conn: Any, rows: Sequence[Any]) -> list[PageRecord]:
    refs = [r[0] for r in rows]
    if not refs:
        return []
    alerts: dict[int, list[Any]] = {}
    acks: dict[int, list[AckRecord]] = {}
    escalations: dict[int, list[EscalationRecord]] = {}
    for ref, key, labels, resolved in await conn.fetch(
            "SELECT ref, key, labels, resolved FROM page_alerts WHERE ref = ANY($1::bigint[]) ORDER BY ref, key", refs):
        alerts.setdefault(ref, []).append((key, json.loads(labels), bool(resolved)))
    for r in await conn.fetch("SELECT ref, by_name, number, at, until, silence_ids, outcome, unacked_at "
                              "FROM acks WHERE ref = ANY($1::bigint[]) ORDER BY at", refs):
        acks.setdefault(r[0], []).append(AckRecord(r[1], r[2], r[3], r[4], tuple(json.loads(r[5] or "[]")),
                                                   r[6], r[7]))
    for r in await conn.fetch("SELECT ref, round, group_id, at, message_id FROM escalations "
                              "WHERE ref = ANY($1::bigint[]) ORDER BY round, group_id", refs):
        escalations.setdefault(r[0], []).append(EscalationRecord(r[1], r[2], r[3], r[4]))
    return [PageRecord(*tuple(r), alerts=tuple(alerts.get(r[0], ())), acks=tuple(acks.get(r[0], ())),
                       escalations=tuple(escalations.get(r[0], ()))) for r in rows]


LAST_PAGE = (f"SELECT {PAGE_COLUMNS} FROM pages p WHERE EXISTS (SELECT 1 FROM recipients r WHERE "
             "r.message_id = p.message_id AND r.number = $1) OR EXISTS (SELECT 1 FROM escalations e JOIN "
             "recipients r ON r.message_id = e.message_id AND r.number = $1 WHERE e.ref = p.ref) "
             "ORDER BY ref DESC LIMIT 1")
PAGES_OF = ("SELECT ref, message_id FROM pages WHERE message_id = ANY($1::text[]) UNION ALL "
            "SELECT ref, message_id FROM escalations WHERE message_id = ANY($1::text[])")
DUE_ESCALATIONS = (
    f"SELECT {PAGE_COLUMNS} FROM pages p WHERE escalate_at IS NOT NULL AND acked_at IS NULL "
    f"AND (escalate_at <= $1 OR {_ALL_FAILED}) AND EXISTS (SELECT 1 FROM page_alerts a "
    "WHERE a.ref = p.ref AND NOT a.resolved) ORDER BY escalate_at LIMIT $2")
