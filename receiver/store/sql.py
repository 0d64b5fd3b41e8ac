"""Every statement the SQLite outbox runs, as functions of a connection: inside a writer
transaction (:class:`~receiver.store.writer.Writer`) or a read. No I/O of their own and no policy:
what to hold, release or send was decided before (:mod:`receiver.holds`, the dispatcher).

Writes that come many at a time (webhooks, send results, planned messages) take a statement per
few hundred rows rather than one per row: every statement hands the GIL between the writer's
thread and the event loop, and a busy loop makes that hand-off the cost.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from receiver.models import FINISHED_STATES, Item, MessageState, NewMessage, RecipientState, message_state
from receiver.store import (
    REPORT_WINDOW,
    Changes,
    GroupCounts,
    HistoryPage,
    HistoryQuery,
    MessageQuery,
    MessageRecord,
    NumberHistory,
    OutboxStats,
    Planned,
    Received,
    RecipientRecord,
    Result,
)
from receiver.store.writer import fault

MESSAGE_COLUMNS = (
    "id, created_at, source, group_id, level, status, text, encoding, parts, alert_count, state, "
    "attempts, next_attempt_at, updated_at, priority, template_error, last_error, accepted_at, "
    "hold_reason, bundle_id, items"
)
RECIPIENT_COLUMNS = (
    "number, state, api_message_id, error_code, error, delivery_status, updated_at, hold_until, "
    "bundle_id, admitted_at"
)
_FINISHED = "(" + ",".join(f"'{s}'" for s in FINISHED_STATES) + ")"


def marks(n: int) -> str:
    return ",".join("?" * n)


def chunks(values: list[Any], size: int = 500) -> list[list[Any]]:
    """Pieces small enough for SQLite's bound-parameter limit."""
    return [values[i : i + size] for i in range(0, len(values), size)]


def values(rows: int, columns: int) -> str:
    row = "(" + ",".join("?" * columns) + ")"
    return ",".join([row] * rows)


def receive(conn: sqlite3.Connection, items: list[tuple[Received, str, float]]) -> list[bool]:
    """The webhooks of one commit (notification, dedup key, window): a few statements for all
    of them. A key seen within its window is a replay, and so is a key a webhook earlier in the
    list has; every other key is recorded as seen now, and its notification stored."""
    fresh: list[bool] = []
    taken: set[str] = set()
    for chunk in chunks(items, 300):
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
            conn.execute("INSERT INTO dedup(key, seen_at) VALUES " + values(len(new), 2)
                         + " ON CONFLICT(key) DO UPDATE SET seen_at=excluded.seen_at",
                         [v for n, key in new for v in (key, n.received_at)])
            conn.execute("INSERT INTO notifications(id, received_at, source, body, priority) VALUES "
                         + values(len(new), 5),
                         [v for n, _ in new for v in (n.id, n.received_at, n.source, n.body, n.priority)])
    return fresh


def insert(conn: sqlite3.Connection, messages: Sequence[NewMessage],
            at: float | Sequence[float]) -> None:
    """Insert messages created at ``at`` (one time, or one per message), and their recipients:
    a statement per few hundred rows."""
    times = [at] * len(messages) if isinstance(at, (int, float)) else list(at)
    for chunk in chunks(list(zip(messages, times)), 100):
        conn.execute(
            "INSERT INTO messages(id, created_at, source, group_id, level, priority, status, text, "
            "encoding, parts, alert_count, template_error, state, next_attempt_at, updated_at, "
            "hold_reason, items) VALUES " + values(len(chunk), 17),
            [v for m, t in chunk for v in (
                m.id, t, m.source, m.group_id, m.level, m.priority, str(m.status), m.sms.text,
                m.sms.encoding, m.sms.parts, m.alert_count, m.template_error, m.state,
                m.hold_until if m.hold_until is not None else t, t, m.hold_reason,
                json.dumps([i.to_list() for i in m.items]) if m.items else None)],
        )
    rows = [(m.id, number, "suppressed" if m.suppressed else "pending", t, t if m.admitted else None)
            for m, t in zip(messages, times) for number in m.recipients]
    for chunk in chunks(rows, 300):
        conn.execute("INSERT INTO recipients(message_id, number, state, updated_at, admitted_at) "
                     "VALUES " + values(len(chunk), 5), [v for row in chunk for v in row])


def finish(conn: sqlite3.Connection, results: list[Result]) -> list[MessageState]:
    """The attempts recorded in one commit: a few statements for all of them (see
    :meth:`SQLiteStore.finish`); each message's new state, in order."""
    updates = [(r.message_id, u.number, u.state, u.api_message_id, u.error_code, u.error, r.at)
               for r in results for u in r.updates]
    for chunk in chunks(updates, 100):
        conn.execute(
            "UPDATE recipients AS r SET state=v.column3, api_message_id=COALESCE(v.column4, "
            "r.api_message_id), error_code=v.column5, error=v.column6, updated_at=v.column7 "
            f"FROM (VALUES {values(len(chunk), 7)}) AS v "
            "WHERE r.message_id=v.column1 AND r.number=v.column2", [x for row in chunk for x in row])
    for r in results:
        if r.dead:
            conn.execute("UPDATE recipients SET state='failed', error=?, updated_at=? "
                         "WHERE message_id=? AND state='pending'", (r.last_error, r.at, r.message_id))
    # what did not go out gives its place in the throttle's history back
    ids = [r.message_id for r in results if r.retry_at is not None]
    for chunk in chunks(ids):
        cleared = conn.execute(
            f"SELECT number, admitted_at FROM recipients WHERE message_id IN ({marks(len(chunk))}) "
            "AND state='pending' AND admitted_at IS NOT NULL", chunk).fetchall()
        conn.executemany("DELETE FROM sends WHERE rowid=(SELECT rowid FROM sends WHERE number=? "
                         "AND sent_at=? LIMIT 1)", cleared)
        conn.execute(f"UPDATE recipients SET admitted_at=NULL WHERE message_id IN ({marks(len(chunk))}) "
                     "AND state='pending'", chunk)
    counts: dict[str, dict[str, int]] = {r.message_id: {} for r in results}
    for chunk in chunks(list(counts)):
        for message_id, state, n in conn.execute(
                "SELECT message_id, state, count(*) FROM recipients WHERE message_id IN "
                f"({','.join('?' * len(chunk))}) GROUP BY message_id, state", chunk):
            counts[message_id][state] = n
    states = [message_state(counts[r.message_id], r.dead) for r in results]
    rows = [(r.message_id, state, r.retry_at if state == "pending" and r.retry_at is not None else r.at,
             r.last_error, r.at, r.at if any(u.state == "accepted" for u in r.updates) else None)
            for r, state in zip(results, states)]
    for chunk in chunks(rows, 100):
        conn.execute(
            "UPDATE messages AS m SET state=v.column2, next_attempt_at=v.column3, lease_until=NULL, "
            "last_error=v.column4, updated_at=v.column5, accepted_at=COALESCE(m.accepted_at, "
            f"v.column6) FROM (VALUES {values(len(chunk), 6)}) AS v WHERE m.id=v.column1",
            [x for row in chunk for x in row])
    return states


def recipient_counts(conn: sqlite3.Connection, message_id: str) -> dict[str, int]:
    return dict(conn.execute(
        "SELECT state, count(*) FROM recipients WHERE message_id=? GROUP BY state", (message_id,)
    ).fetchall())


def settle(conn: sqlite3.Connection, message_id: str, at: float) -> None:
    """Re-derive a message's state from its recipients after holds changed them (not for a
    message held whole, whose recipients wait as ``pending``: see models.message_state)."""
    conn.execute("UPDATE messages SET state=?, lease_until=NULL, updated_at=? WHERE id=?",
                 (message_state(recipient_counts(conn, message_id)), at, message_id))


def settle_idle(conn: sqlite3.Connection, message_id: str, at: float) -> None:
    """Settle a message whose recipients were just held, unless others of them are still to be
    sent now (it settles when their results are recorded)."""
    if not conn.execute("SELECT 1 FROM recipients WHERE message_id=? AND state='pending' LIMIT 1",
                        (message_id,)).fetchone():
        settle(conn, message_id, at)


def fold(conn: sqlite3.Connection, ids: Sequence[str], bundle_id: str | None, at: float,
         number: str | None) -> None:
    """Mark held messages (``number`` None: whole) or one number's held recipients as gone out
    in ``bundle_id`` (None: collapsed, nothing sent)."""
    state = "bundled" if bundle_id else "collapsed"
    for chunk in chunks(list(ids)):
        ids_in = f"IN ({marks(len(chunk))})"
        if number is None:
            conn.execute(f"UPDATE recipients SET state=?, bundle_id=?, updated_at=? "
                         f"WHERE state='pending' AND message_id {ids_in}", (state, bundle_id, at, *chunk))
            conn.execute(f"UPDATE messages SET state=?, bundle_id=?, updated_at=? "
                         f"WHERE state='held' AND id {ids_in}", (state, bundle_id, at, *chunk))
            continue
        conn.execute(f"UPDATE recipients SET state=?, bundle_id=?, hold_until=NULL, updated_at=? "
                     f"WHERE number=? AND state='held' AND message_id {ids_in}",
                     (state, bundle_id, at, number, *chunk))
        for (message_id,) in conn.execute(
                f"SELECT id FROM messages WHERE state='held' AND id {ids_in}", chunk).fetchall():
            settle(conn, message_id, at)  # a message still being sent to others settles later


def record(row: tuple[Any, ...], recipients: Sequence[RecipientRecord]) -> MessageRecord:
    items = tuple(Item.from_list(i) for i in json.loads(row[20])) if row[20] else ()
    return MessageRecord(*row[:20], items=items, recipients=tuple(recipients))


def with_recipients(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[MessageRecord]:
    if not rows:
        return []
    by_message: dict[str, list[RecipientRecord]] = {r[0]: [] for r in rows}
    for chunk in chunks(list(by_message)):
        for row in conn.execute(
                f"SELECT message_id, {RECIPIENT_COLUMNS} FROM recipients "
                f"WHERE message_id IN ({','.join('?' * len(chunk))})", chunk):
            by_message[row[0]].append(RecipientRecord(*row[1:10], admitted=row[10] is not None))
    return [record(r, by_message[r[0]]) for r in rows]


# ---------------------------------------------------------------------------------------------
# Intake and planning


def unplanned(conn: sqlite3.Connection, limit: int) -> list[Received]:
    return [Received(*row) for row in conn.execute(
        "SELECT id, received_at, source, body, priority FROM notifications WHERE error IS NULL "
        "ORDER BY priority, id LIMIT ?", (limit,))]


def received(conn: sqlite3.Connection, notification_id: str) -> Received | None:
    row = conn.execute("SELECT id, received_at, source, body, priority, error FROM notifications WHERE id=?",
                       (notification_id,)).fetchone()
    return None if row is None else Received(*row)


def planned(conn: sqlite3.Connection, plans: Sequence[Planned],
            pages: Callable[[sqlite3.Connection, Sequence[Planned]], None]) -> None:
    """Each plan's messages in (and, by ``pages``, its two-way pages: twoway_sql.insert_pages),
    its notification out; a plan that could not be made, or that the database refuses (a bug),
    keeps its notification with the error."""
    def store(plans: Sequence[Planned]) -> None:
        insert(conn, [m for p in plans for m in p.messages],
               [p.received_at for p in plans for _ in p.messages])
        pages(conn, plans)
        for chunk in chunks([p.notification_id for p in plans]):
            conn.execute(f"DELETE FROM notifications WHERE id IN ({marks(len(chunk))})", chunk)

    conn.executemany("UPDATE notifications SET error=? WHERE id=?",
                     [(p.error, p.notification_id) for p in plans if p.error is not None])
    done = [p for p in plans if p.error is None]
    conn.execute("SAVEPOINT plans")
    try:
        store(done)
    except sqlite3.Error as exc:
        if fault(exc):
            raise
        conn.execute("ROLLBACK TO plans")
        for plan in done:  # one by one: only the refused one keeps an error
            conn.execute("SAVEPOINT plan")
            try:
                store([plan])
            except sqlite3.Error as exc:
                if fault(exc):
                    raise
                conn.execute("ROLLBACK TO plan")
                conn.execute("UPDATE notifications SET error=? WHERE id=?",
                             (f"cannot store its messages: {exc}", plan.notification_id))
            conn.execute("RELEASE plan")
    conn.execute("RELEASE plans")


# ---------------------------------------------------------------------------------------------
# Sending


def claim(conn: sqlite3.Connection, now: float, limit: int, lease: float,
          skip: set[str]) -> list[MessageRecord]:
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
        f"UPDATE messages SET state='sending', lease_until=?, attempts=attempts+1, updated_at=? "
        f"WHERE id IN ({marks(len(due))}) RETURNING {MESSAGE_COLUMNS}", (now + lease, now, *due),
    ).fetchall()
    rows.sort(key=lambda r: (r[14], r[12]))  # priority, next_attempt_at
    return with_recipients(conn, rows)


def retry_now(conn: sqlite3.Connection, now: float) -> int:
    return conn.execute("UPDATE messages SET next_attempt_at=? WHERE state='pending' "
                        "AND next_attempt_at>?", (now, now)).rowcount


# ---------------------------------------------------------------------------------------------
# Holds


def history(conn: sqlite3.Connection, numbers: Sequence[str], since: float) -> dict[str, NumberHistory]:
    out = {n: NumberHistory([], False) for n in numbers}
    for chunk in chunks(list(numbers)):
        for number, at in conn.execute(
                f"SELECT number, sent_at FROM sends WHERE number IN ({marks(len(chunk))}) "
                "AND sent_at>?", (*chunk, since)):
            out[number].sent_at.append(at)
        for (number,) in conn.execute(
                "SELECT DISTINCT number FROM recipients INDEXED BY recipients_held "
                f"WHERE state='held' AND number IN ({marks(len(chunk))})", chunk):
            out[number] = NumberHistory(out[number].sent_at, True)
    return out


def held_messages(conn: sqlite3.Connection, now: float) -> list[MessageRecord]:
    return with_recipients(conn, conn.execute(
        # Without the hint the planner walks every finished message in created_at order.
        f"SELECT {MESSAGE_COLUMNS} FROM messages INDEXED BY messages_held "
        "WHERE state='held' AND next_attempt_at<=? "
        "AND EXISTS (SELECT 1 FROM recipients r WHERE r.message_id=messages.id AND r.state='pending') "
        "ORDER BY created_at", (now,)).fetchall())


def held_numbers(conn: sqlite3.Connection, now: float) -> dict[str, list[MessageRecord]]:
    numbers = [r[0] for r in conn.execute(
        "SELECT number FROM recipients INDEXED BY recipients_held WHERE state='held' "
        "GROUP BY number HAVING min(hold_until)<=?", (now,))]
    columns = ", ".join("m." + c.strip() for c in MESSAGE_COLUMNS.split(","))
    return {number: with_recipients(conn, conn.execute(
        f"SELECT {columns} FROM recipients r JOIN messages m ON m.id=r.message_id "
        "WHERE r.number=? AND r.state='held' ORDER BY m.created_at", (number,)).fetchall())
        for number in numbers}


def apply(conn: sqlite3.Connection, c: Changes) -> None:
    at = c.at
    if c.messages:
        insert(conn, c.messages, at)
    conn.executemany("INSERT INTO sends(number, sent_at) VALUES (?,?)", [(n, at) for _, n in c.sends])
    conn.executemany("UPDATE recipients SET admitted_at=? WHERE message_id=? AND number=?",
                     [(at, mid, n) for mid, n in c.sends])
    conn.executemany(
        "UPDATE recipients SET state='held', hold_until=?, updated_at=? "
        "WHERE message_id=? AND number=? AND state IN ('pending','held')",
        [(until, at, mid, number) for mid, number, until in c.holds])
    for mid in dict.fromkeys(mid for mid, _, _ in c.holds):
        conn.execute("UPDATE messages SET hold_reason=? WHERE id=?", (c.hold_reason or None, mid))
        settle_idle(conn, mid, at)
    for f in c.folds:
        fold(conn, f.message_ids, f.bundle_id, at, f.number)


# ---------------------------------------------------------------------------------------------
# Reporting and housekeeping


def reported_message(conn: sqlite3.Connection, api_message_id: str, now: float) -> str | None:
    """The message a report without our id is about: searched among the messages of the last
    REPORT_WINDOW (their ids start with their creation time), by the primary key's prefix."""
    row = conn.execute("SELECT message_id FROM recipients WHERE message_id>=? AND api_message_id=? "
                       "LIMIT 1", (f"{int((now - REPORT_WINDOW) * 1000):011x}", api_message_id)).fetchone()
    return None if row is None else str(row[0])


def delivery_report(conn: sqlite3.Connection, api_message_id: str, status: str,
                    final_state: RecipientState | None, now: float, message_id: str) -> bool:
    where = "message_id=? AND api_message_id=?"
    found = conn.execute(
        f"UPDATE recipients SET delivery_status=?, updated_at=? WHERE {where} "
        "AND state NOT IN ('delivered','undelivered')",  # reports can arrive out of order
        (status, now, message_id, api_message_id),
    ).rowcount
    if final_state is not None:
        conn.execute(f"UPDATE recipients SET state=? WHERE {where} AND state='accepted'",
                     (final_state, message_id, api_message_id))
    if not found:
        found = conn.execute(f"SELECT 1 FROM recipients WHERE {where}",
                             (message_id, api_message_id)).fetchone() is not None
    return bool(found)


def get_message(conn: sqlite3.Connection, message_id: str) -> MessageRecord | None:
    found = with_recipients(conn, conn.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id=?", (message_id,)).fetchall())
    return found[0] if found else None


def list_messages(conn: sqlite3.Connection, query: MessageQuery) -> list[MessageRecord]:
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
    sql = f"SELECT {MESSAGE_COLUMNS} FROM messages"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC LIMIT ?"
    args.append(query.limit)
    return with_recipients(conn, conn.execute(sql, args).fetchall())


def stats(conn: sqlite3.Connection) -> OutboxStats:
    by_state = dict(conn.execute("SELECT state, n FROM message_states"))
    oldest = conn.execute("SELECT min(created_at) FROM messages "
                          "WHERE state IN ('pending','sending')").fetchone()[0]
    held = conn.execute("SELECT count(*) FROM recipients INDEXED BY recipients_held "
                        "WHERE state='held'").fetchone()[0]
    waiting, failed, first = conn.execute(
        "SELECT count(*), count(error), min(CASE WHEN error IS NULL THEN received_at END) "
        "FROM notifications").fetchone()
    if first is not None and (oldest is None or first < oldest):
        oldest = first  # waiting to be planned is waiting too
    return OutboxStats(pending=by_state.get("pending", 0) + by_state.get("sending", 0),
                       oldest_pending_created_at=oldest, by_state=by_state, held_recipients=held,
                       unplanned=waiting - failed, unplanned_failed=failed)


def prune(conn: sqlite3.Connection, before: float, keys_before: float, sends_before: float,
          limit: int) -> int:
    ids = [r[0] for r in conn.execute(
        f"SELECT id FROM messages WHERE created_at<? AND state IN {_FINISHED} "
        f"ORDER BY created_at LIMIT ?", (before, limit))]
    n = 0
    for chunk in chunks(ids):
        n += conn.execute(f"DELETE FROM recipients WHERE message_id IN ({marks(len(chunk))})", chunk).rowcount
        n += conn.execute(f"DELETE FROM messages WHERE id IN ({marks(len(chunk))})", chunk).rowcount
    n += conn.execute("DELETE FROM dedup WHERE key IN (SELECT key FROM dedup "
                      "WHERE seen_at<? LIMIT ?)", (keys_before, limit)).rowcount
    n += conn.execute("DELETE FROM sends WHERE rowid IN (SELECT rowid FROM sends "
                      "WHERE sent_at<? LIMIT ?)", (sends_before, limit)).rowcount
    return n


# ---------------------------------------------------------------------------------------------
# The history page (receiver.ui); the statements serve PostgreSQL too (postgres.py)


def like_pattern(text: str) -> str:
    """A LIKE pattern (``ESCAPE '\\'``) matching ``text`` anywhere, its ``%`` and ``_`` literal."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class HistoryStatements:
    """The statements of one history page (``receiver.store.HistoryQuery``), for SQLite or,
    ``pg``, PostgreSQL. The index walked is the group's, else the state's, else created_at's;
    ``bound`` (None when that index serves every filter) finds the ``scan``-th entry of it,
    past which :attr:`page` does not look, so a page costs ``scan`` entries at most."""

    def __init__(self, q: HistoryQuery, pg: bool) -> None:
        self._pg = pg
        index = "messages_group_history" if q.group else "messages_state_history" if q.state \
            else "messages_created"
        keyed: list[tuple[str, list[Any]]] = []
        if q.group:
            keyed.append(("group_id=?", [q.group]))
        elif q.state:
            keyed.append(("state=?", [q.state]))
        if q.since is not None:
            keyed.append(("created_at >= ?::float8", [q.since]))
        if q.until is not None:
            keyed.append(("created_at < ?::float8", [q.until]))
        if q.before is not None:
            keyed.append(("(created_at, id) < (?::float8, ?::text)", list(q.before)))
        residual: list[tuple[str, list[Any]]] = []
        if q.group and q.state:
            residual.append(("state=?", [q.state]))
        if q.level:
            residual.append(("level=?", [q.level]))
        if q.text:
            residual.append((f"text {'ILIKE' if pg else 'LIKE'} ? ESCAPE '\\'", [like_pattern(q.text)]))
        self._from = "messages" if pg else f"messages INDEXED BY {index}"
        self._keyed, self._residual = keyed, residual
        order = " ORDER BY created_at DESC, id DESC"
        self.bound: tuple[str, list[Any]] | None = None
        if residual:
            where, args = self._where(keyed)
            self.bound = (self._sql(f"SELECT created_at, id FROM {self._from}{where}{order} "
                                    f"LIMIT 1 OFFSET {int(q.scan) - 1}"), args)
        self._order_limit = f"{order} LIMIT {int(q.limit) + 1}"

    def _where(self, parts: list[tuple[str, list[Any]]]) -> tuple[str, list[Any]]:
        if not parts:
            return "", []
        return " WHERE " + " AND ".join(p for p, _ in parts), [a for _, args in parts for a in args]

    def _sql(self, text: str) -> str:
        if not self._pg:
            return text.replace("::float8", "").replace("::text", "")
        pieces = text.split("?")
        return pieces[0] + "".join(f"${i}{p}" for i, p in enumerate(pieces[1:], 1))

    def page(self, bound: tuple[float, str] | None) -> tuple[str, list[Any]]:
        """The page's statement: rows (``MESSAGE_COLUMNS``) newest first, one more than the
        limit, down to ``bound`` (the entry :attr:`bound` found; None: no bound)."""
        parts = list(self._keyed)
        if bound is not None:
            parts.append(("(created_at, id) >= (?::float8, ?::text)", list(bound)))
        where, args = self._where(parts + self._residual)
        return self._sql(f"SELECT {MESSAGE_COLUMNS} FROM {self._from}{where}{self._order_limit}"), args


def history_page(q: HistoryQuery, rows: list[MessageRecord], bound: tuple[float, str] | None) -> HistoryPage:
    """The page from the rows :meth:`HistoryStatements.page` returned (with recipients)."""
    if len(rows) > q.limit:
        last = rows[q.limit - 1]
        return HistoryPage(rows[: q.limit], (last.created_at, last.id))
    if bound is not None:  # stopped at the scan bound: older messages may match
        return HistoryPage(rows, bound, bound[0])
    return HistoryPage(rows)


def message_history(conn: sqlite3.Connection, q: HistoryQuery) -> HistoryPage:
    statements = HistoryStatements(q, pg=False)
    bound = None
    if statements.bound is not None:
        found = conn.execute(*statements.bound).fetchone()
        bound = None if found is None else (float(found[0]), str(found[1]))
    rows = conn.execute(*statements.page(bound)).fetchall()
    shown = with_recipients(conn, rows[: q.limit])
    if len(rows) > q.limit:
        shown.append(record(rows[q.limit], ()))  # only its key is used
    return history_page(q, shown, bound)


def group_counts(conn: sqlite3.Connection, since: float) -> list[GroupCounts]:
    """From group_hours (schema.py): hours from the one ``since`` falls in."""
    by_group: dict[str, dict[str, int]] = {}
    for group, state, n in conn.execute("SELECT group_id, state, sum(n) FROM group_hours WHERE hour >= ? "
                                        "GROUP BY group_id, state", (int(since // 3600),)):
        if n:
            by_group.setdefault(group, {})[state] = n
    return [GroupCounts(g, counts) for g, counts in sorted(by_group.items())]


def urgent_sends(conn: sqlite3.Connection, numbers: Sequence[str], since: float, created_since: float,
                 rank: int) -> dict[str, list[float]]:
    """See :meth:`Decisions.urgent_sends` (recent messages by their index, then their recipients)."""
    out: dict[str, list[float]] = {}
    for chunk in chunks(list(numbers)):
        for number, at in conn.execute(
                "SELECT r.number, r.admitted_at FROM messages m INDEXED BY messages_created "
                "JOIN recipients r ON r.message_id=m.id WHERE m.created_at>? AND m.priority<=? "
                f"AND m.status='firing' AND r.number IN ({marks(len(chunk))}) AND r.admitted_at>? "
                "ORDER BY r.admitted_at", (created_since, rank, *chunk, since)):
            out.setdefault(number, []).append(at)
    return out
