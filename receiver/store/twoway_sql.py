"""The SQLite outbox's statements for two-way paging (receiver.acks, receiver.escalation): page
references, pages and their alerts, acknowledgements, escalation rounds, replies. Each function
runs inside the caller's transaction, as those of :mod:`receiver.store.sql` do."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from receiver.models import NewMessage
from receiver.store import AckRecord, EscalationRecord, NewAck, PageRecord, Planned
from receiver.store.sql import chunks, insert, marks

_PAGE_COLUMNS = "ref, message_id, group_id, source, created_at, acked_at, escalate_at, rounds"
# Every recipient of the page's own message failed: it escalates at once rather than at its time
_ALL_FAILED = ("(p.rounds = 0 AND EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = p.message_id) AND NOT EXISTS "
               "(SELECT 1 FROM recipients r WHERE r.message_id = p.message_id "
               "AND r.state NOT IN ('failed', 'undelivered')))")


def insert_pages(conn: sqlite3.Connection, plans: Sequence[Planned]) -> None:
    """The two-way pages of stored plans, and the alerts they resolve (whose pages stop)."""
    pages = [page for p in plans for page in p.pages]
    conn.executemany(
        "INSERT INTO pages(ref, message_id, group_id, source, created_at, escalate_at) VALUES (?,?,?,?,?,?)",
        [(pg.ref, pg.message_id, pg.group_id, pg.source, p.received_at, pg.escalate_at)
         for p in plans for pg in p.pages])
    conn.executemany("INSERT OR IGNORE INTO page_alerts(ref, key, labels) VALUES (?,?,?)",
                     [(pg.ref, key, json.dumps(labels, sort_keys=True)) for pg in pages for key, labels in pg.alerts])
    keys = sorted({k for p in plans for k in p.resolved})
    for chunk in chunks(keys):
        refs = [r[0] for r in conn.execute(
            f"UPDATE page_alerts SET resolved=1 WHERE resolved=0 AND key IN ({marks(len(chunk))}) RETURNING ref", chunk)]
        # all resolved: out of the escalation index, which the escalator reads every poll
        for part in chunks(sorted(set(refs))):
            conn.execute(f"UPDATE pages SET escalate_at=NULL WHERE ref IN ({marks(len(part))}) AND NOT EXISTS "
                         "(SELECT 1 FROM page_alerts a WHERE a.ref = pages.ref AND a.resolved = 0)", part)


def prune_pages(conn: sqlite3.Connection, before: float, limit: int) -> int:
    """Pages created before ``before`` (retention), with their alerts, acks and escalations, and
    replies recorded before it."""
    refs = [r[0] for r in conn.execute("SELECT ref FROM pages WHERE created_at<? ORDER BY created_at LIMIT ?",
                                       (before, limit))]
    n = 0
    for chunk in chunks(refs):
        for table in ("page_alerts", "acks", "escalations", "pages"):
            n += conn.execute(f"DELETE FROM {table} WHERE ref IN ({marks(len(chunk))})", chunk).rowcount
    n += conn.execute("DELETE FROM replies WHERE id IN (SELECT id FROM replies WHERE at<? LIMIT ?)",
                      (before, limit)).rowcount
    return n


def allocate_refs(conn: sqlite3.Connection, n: int) -> list[int]:
    last = conn.execute("UPDATE page_refs SET last = last + ? WHERE id=1 RETURNING last", (n,)).fetchone()[0]
    return list(range(last - n + 1, last + 1))


def _pages(conn: sqlite3.Connection, rows: list[Any]) -> list[PageRecord]:
    refs = [r[0] for r in rows]
    alerts: dict[int, list[Any]] = {}
    acks: dict[int, list[AckRecord]] = {}
    escalations: dict[int, list[EscalationRecord]] = {}
    for chunk in chunks(refs):
        m = marks(len(chunk))
        for ref, key, labels, resolved in conn.execute(
                f"SELECT ref, key, labels, resolved FROM page_alerts WHERE ref IN ({m}) ORDER BY ref, key", chunk):
            alerts.setdefault(ref, []).append((key, json.loads(labels), bool(resolved)))
        for ref, *a in conn.execute(
                "SELECT ref, by_name, number, at, until, silence_ids, outcome, unacked_at FROM acks "
                f"WHERE ref IN ({m}) ORDER BY at", chunk):
            acks.setdefault(ref, []).append(AckRecord(a[0], a[1], a[2], a[3], tuple(json.loads(a[4] or "[]")),
                                                      a[5], a[6]))
        for ref, *e in conn.execute("SELECT ref, round, group_id, at, message_id FROM escalations "
                                    f"WHERE ref IN ({m}) ORDER BY round, group_id", chunk):
            escalations.setdefault(ref, []).append(EscalationRecord(*e))
    return [PageRecord(*r, alerts=tuple(alerts.get(r[0], ())), acks=tuple(acks.get(r[0], ())),
                       escalations=tuple(escalations.get(r[0], ()))) for r in rows]


def page(conn: sqlite3.Connection, ref: int) -> PageRecord | None:
    found = _pages(conn, conn.execute(f"SELECT {_PAGE_COLUMNS} FROM pages WHERE ref=?", (ref,)).fetchall())
    return found[0] if found else None


def last_page(conn: sqlite3.Connection, number: str) -> PageRecord | None:
    """Newest first by reference (refs grow): the first page whose message, or an escalation of
    which, has this number among its recipients (primary-key lookups, no scan of recipients)."""
    row = conn.execute(
        f"SELECT {_PAGE_COLUMNS} FROM pages p WHERE EXISTS (SELECT 1 FROM recipients r WHERE "
        "r.message_id = p.message_id AND r.number = ?) OR EXISTS (SELECT 1 FROM escalations e JOIN "
        "recipients r ON r.message_id = e.message_id AND r.number = ? WHERE e.ref = p.ref) "
        "ORDER BY ref DESC LIMIT 1", (number, number)).fetchall()
    found = _pages(conn, row)
    return found[0] if found else None


def pages_of(conn: sqlite3.Connection, message_ids: Sequence[str]) -> dict[str, PageRecord]:
    by_ref: dict[int, list[str]] = {}
    for chunk in chunks(list(message_ids)):
        m = marks(len(chunk))
        for ref, mid in conn.execute(f"SELECT ref, message_id FROM pages WHERE message_id IN ({m}) UNION ALL "
                                     f"SELECT ref, message_id FROM escalations WHERE message_id IN ({m})",
                                     (*chunk, *chunk)):
            by_ref.setdefault(ref, []).append(mid)
    out: dict[str, PageRecord] = {}
    for chunk in chunks(list(by_ref)):
        for record in _pages(conn, conn.execute(
                f"SELECT {_PAGE_COLUMNS} FROM pages WHERE ref IN ({marks(len(chunk))})", chunk).fetchall()):
            for mid in by_ref[record.ref]:
                out[mid] = record
    return out


def reply_seen(conn: sqlite3.Connection, reply_id: str, number: str, at: float, action: str) -> bool:
    return conn.execute("INSERT OR IGNORE INTO replies(id, number, at, action) VALUES (?,?,?,?)",
                        (reply_id, number, at, action)).rowcount == 1


def replied_since(conn: sqlite3.Connection, number: str, action: str, since: float) -> int:
    return int(conn.execute("SELECT count(*) FROM replies WHERE number=? AND action=? AND at>?",
                            (number, action, since)).fetchone()[0])


def ack(conn: sqlite3.Connection, a: NewAck) -> bool:
    if conn.execute("INSERT OR IGNORE INTO acks(reply_id, ref, number, by_name, at, until) VALUES (?,?,?,?,?,?)",
                    (a.reply_id, a.ref, a.number, a.by, a.at, a.until)).rowcount != 1:
        return False
    conn.execute("UPDATE pages SET acked_at=?, escalate_at=NULL WHERE ref=?", (a.at, a.ref))
    return True


def ack_outcome(conn: sqlite3.Connection, reply_id: str, silence_ids: Sequence[str], outcome: str) -> None:
    conn.execute("UPDATE acks SET silence_ids=?, outcome=? WHERE reply_id=?",
                 (json.dumps(list(silence_ids)), outcome, reply_id))


def unack(conn: sqlite3.Connection, ref: int, at: float, escalate_at: float | None) -> list[str]:
    rows = conn.execute("UPDATE acks SET unacked_at=? WHERE ref=? AND unacked_at IS NULL RETURNING silence_ids",
                        (at, ref)).fetchall()
    conn.execute("UPDATE pages SET acked_at=NULL, escalate_at=? WHERE ref=?", (escalate_at, ref))
    return [sid for (ids,) in rows for sid in json.loads(ids or "[]")]


def escalate_at(conn: sqlite3.Connection, ref: int, at: float) -> bool:
    return conn.execute("UPDATE pages SET escalate_at=? WHERE ref=? AND acked_at IS NULL",
                        (at, ref)).rowcount == 1


def due_escalations(conn: sqlite3.Connection, now: float, limit: int) -> list[PageRecord]:
    rows = conn.execute(
        f"SELECT {_PAGE_COLUMNS} FROM pages p WHERE escalate_at IS NOT NULL AND acked_at IS NULL "
        f"AND (escalate_at <= ? OR {_ALL_FAILED}) AND EXISTS (SELECT 1 FROM page_alerts a "
        "WHERE a.ref = p.ref AND a.resolved = 0) ORDER BY escalate_at LIMIT ?", (now, limit)).fetchall()
    return _pages(conn, rows)


def escalated(conn: sqlite3.Connection, ref: int, rounds: int, next_at: float | None, at: float,
              messages: Sequence[NewMessage], groups: Sequence[str]) -> bool:
    if conn.execute("UPDATE pages SET rounds=rounds+1, escalate_at=? WHERE ref=? AND rounds=? "
                    "AND acked_at IS NULL", (next_at, ref, rounds)).rowcount != 1:
        return False
    insert(conn, messages, at)
    conn.executemany("INSERT INTO escalations(ref, round, group_id, at, message_id) VALUES (?,?,?,?,?)",
                     [(ref, rounds + 1, g, at, m.id) for g, m in zip(groups, messages, strict=True)])
    return True
