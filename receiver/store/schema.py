"""The SQLite outbox's schema, as numbered migrations.

``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1`` (``PRAGMA user_version``), each in
one transaction: a crash half-way leaves the file at the version before. A file newer than the
last migration was written by a newer release: it is refused rather than misread. To change the
schema, append a migration; never edit one that has been released. Until the first release (0.x)
``_V1`` itself is edited: a file made by an earlier development version lacks some of its tables
or indexes and is refused by :func:`missing_objects`'s check rather than half used.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence

from receiver.models import MESSAGE_STATES

_V1 = f"""
-- Webhooks answered 2xx and not planned yet (or that could not be: ``error``). A row leaves in
-- the transaction that inserts its messages.
CREATE TABLE notifications (
    id          TEXT PRIMARY KEY,  -- time-ordered hex, in the webhook's answer
    received_at REAL NOT NULL,
    source      TEXT NOT NULL,
    body        BLOB NOT NULL,     -- validated on receipt
    priority    INTEGER NOT NULL,  -- its most urgent alert's level rank: planned first
    error       TEXT
);
CREATE INDEX notifications_waiting ON notifications(priority, id) WHERE error IS NULL;
-- Replay detection: a notification's identity and when it was last accepted.
CREATE TABLE dedup (
    key     TEXT PRIMARY KEY,
    seen_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX dedup_seen ON dedup(seen_at);

CREATE TABLE messages (
    id              TEXT PRIMARY KEY,  -- the notification id + 8 hex of the group's
    created_at      REAL NOT NULL,
    source          TEXT NOT NULL,
    group_id        TEXT NOT NULL,
    level           TEXT NOT NULL,
    priority        INTEGER NOT NULL,  -- the level's rank: 0 is sent first
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
    items           TEXT               -- JSON: its alerts as a summary names them
);
-- Partial indexes: claim and release walk only what waits, in order, and stop at their LIMIT;
-- finished messages (nearly all rows) cost no index upkeep beyond id and created_at.
CREATE INDEX messages_due ON messages(priority, next_attempt_at) WHERE state='pending';
CREATE INDEX messages_lease ON messages(lease_until) WHERE state='sending';
CREATE INDEX messages_held ON messages(next_attempt_at) WHERE state='held';
CREATE INDEX messages_created ON messages(created_at, id);
CREATE INDEX messages_waiting ON messages(created_at) WHERE state IN ('pending','sending');
-- The history page (receiver.ui) walks these newest first, keyset-paged on (created_at, id).
CREATE INDEX messages_group_history ON messages(group_id, created_at, id);
CREATE INDEX messages_state_history ON messages(state, created_at, id);

CREATE TABLE recipients (
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
    admitted_at     REAL,              -- the throttle counted its send then (sends.sent_at)
    PRIMARY KEY (message_id, number)
) WITHOUT ROWID;
-- the throttle's view: what each number has held
CREATE INDEX recipients_held ON recipients(number, hold_until) WHERE state='held';
-- Recipients by group, hour of their message's creation and state, kept by triggers in the same
-- transactions: the groups page (receiver.ui) sums a week of hours instead of joining a week
-- of messages to their recipients (seconds, at a million).
CREATE TABLE group_hours (
    group_id TEXT NOT NULL,
    hour     INTEGER NOT NULL,         -- created_at // 3600
    state    TEXT NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (group_id, hour, state)
) WITHOUT ROWID;
CREATE TRIGGER recipient_added AFTER INSERT ON recipients BEGIN
    INSERT INTO group_hours(group_id, hour, state, n)
    SELECT group_id, CAST(created_at / 3600 AS INTEGER), NEW.state, 1 FROM messages WHERE id = NEW.message_id
    ON CONFLICT(group_id, hour, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER recipient_moved AFTER UPDATE OF state ON recipients WHEN OLD.state <> NEW.state BEGIN
    UPDATE group_hours SET n = n - 1 WHERE (group_id, hour, state) =
        (SELECT group_id, CAST(created_at / 3600 AS INTEGER), OLD.state FROM messages WHERE id = OLD.message_id);
    INSERT INTO group_hours(group_id, hour, state, n)
    SELECT group_id, CAST(created_at / 3600 AS INTEGER), NEW.state, 1 FROM messages WHERE id = NEW.message_id
    ON CONFLICT(group_id, hour, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER recipient_deleted AFTER DELETE ON recipients BEGIN
    UPDATE group_hours SET n = n - 1 WHERE (group_id, hour, state) =
        (SELECT group_id, CAST(created_at / 3600 AS INTEGER), OLD.state FROM messages WHERE id = OLD.message_id);
    DELETE FROM group_hours WHERE n <= 0 AND (group_id, hour, state) =
        (SELECT group_id, CAST(created_at / 3600 AS INTEGER), OLD.state FROM messages WHERE id = OLD.message_id);
END;

-- The throttle's history: when each number was sent to.
CREATE TABLE sends (
    number  TEXT NOT NULL,
    sent_at REAL NOT NULL
);
CREATE INDEX sends_number ON sends(number, sent_at);
CREATE INDEX sends_at ON sends(sent_at);

-- Messages per state, kept by triggers in the same transactions: a /metrics scrape reads
-- eleven rows instead of counting a million.
CREATE TABLE message_states (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO message_states(state, n) VALUES {", ".join(f"('{s}', 0)" for s in MESSAGE_STATES)};
CREATE TRIGGER message_added AFTER INSERT ON messages BEGIN
    UPDATE message_states SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER message_moved AFTER UPDATE OF state ON messages WHEN OLD.state <> NEW.state BEGIN
    UPDATE message_states SET n = n - 1 WHERE state = OLD.state;
    UPDATE message_states SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER message_deleted AFTER DELETE ON messages BEGIN
    UPDATE message_states SET n = n - 1 WHERE state = OLD.state;
END;

-- Written by a readiness probe while writes fail, to learn when they work again.
CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);

-- Two-way paging (receiver.acks, receiver.escalation): the firing pages of two_way groups by
-- their short reference (" #<ref>" in the text), what was acknowledged and what escalated.
CREATE TABLE page_refs (id INTEGER PRIMARY KEY CHECK (id = 1), last INTEGER NOT NULL);
INSERT INTO page_refs(id, last) VALUES (1, 0);
CREATE TABLE pages (
    ref         INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL UNIQUE,
    group_id    TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    acked_at    REAL,              -- acknowledged (and not undone) then
    escalate_at REAL,              -- its next escalation round is due then; NULL: none
    rounds      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX pages_due ON pages(escalate_at) WHERE escalate_at IS NOT NULL;
CREATE INDEX pages_created ON pages(created_at);  -- pruning
CREATE TABLE page_alerts (
    ref      INTEGER NOT NULL,
    key      TEXT NOT NULL,        -- the alert's fingerprint (Item.key)
    labels   TEXT NOT NULL,        -- JSON: its label set, a silence's matchers
    resolved INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ref, key)
) WITHOUT ROWID;
CREATE INDEX page_alerts_firing ON page_alerts(key) WHERE resolved = 0;
CREATE TABLE acks (
    reply_id    TEXT PRIMARY KEY,  -- the SMS reply that acknowledged: a repeated callback is one ack
    ref         INTEGER NOT NULL,
    number      TEXT NOT NULL,
    by_name     TEXT NOT NULL,
    at          REAL NOT NULL,
    until       REAL NOT NULL,
    silence_ids TEXT,              -- JSON list, once Alertmanager answered
    outcome     TEXT,              -- created, failed: …, none: …
    unacked_at  REAL
);
CREATE INDEX acks_ref ON acks(ref);
CREATE TABLE escalations (
    ref        INTEGER NOT NULL,
    round      INTEGER NOT NULL,
    group_id   TEXT NOT NULL,
    at         REAL NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (ref, round, group_id)
) WITHOUT ROWID;
CREATE INDEX escalations_message ON escalations(message_id);
CREATE TABLE replies (
    id     TEXT PRIMARY KEY,       -- Clickatell's reply id: a repeated callback is seen once
    number TEXT NOT NULL,
    at     REAL NOT NULL,
    action TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX replies_number ON replies(number, action, at);
CREATE INDEX replies_at ON replies(at);  -- pruning
"""

MIGRATIONS: tuple[str, ...] = (_V1,)


class SchemaError(Exception):
    """The file's schema is one this release cannot use."""


_OBJECT = re.compile(r"^\s*CREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX|TRIGGER)\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)",
                     re.IGNORECASE | re.MULTILINE)


def schema_objects(migrations: Sequence[str]) -> list[str]:
    """The tables, indexes and triggers the migrations create, by name."""
    return [m[1] for script in migrations for m in _OBJECT.finditer(script)]


def missing_objects(expected: Sequence[str], present: set[str]) -> str | None:
    """Why a store at the last version that lacks some of ``expected`` cannot be used, if so."""
    missing = [name for name in expected if name not in present]
    if not missing:
        return None
    return (f"the outbox was made by an earlier development version of sms-receiver: it lacks "
            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}. Before the first release "
            "no migration connects development versions: let the old version send what is pending, "
            "then move the outbox aside (a new one is made at start)")


def check_complete(conn: sqlite3.Connection, migrations: Sequence[str] = MIGRATIONS) -> None:
    """Raise :class:`SchemaError` when the file lacks an object of the schema."""
    present = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    problem = missing_objects(schema_objects(migrations), present)
    if problem:
        raise SchemaError(problem)


def migrate(conn: sqlite3.Connection, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Bring the file to the last version, one transaction per migration; returns the version
    it was at. ``conn`` is in autocommit mode (``isolation_level=None``)."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > len(migrations):
        raise SchemaError(
            f"the outbox has schema version {found}, newer than this release knows "
            f"({len(migrations)}): it was written by a newer sms-receiver"
        )
    for version in range(found, len(migrations)):
        # one script, its own transaction: executescript would commit a transaction begun outside
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{migrations[version]}\n"
                               f"PRAGMA user_version = {version + 1};\nCOMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    check_complete(conn, migrations)
    return int(found)
