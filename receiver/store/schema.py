"""The SQLite outbox's schema, as numbered migrations.

``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1`` (``PRAGMA user_version``), each in
one transaction: a crash half-way leaves the file at the version before. A file newer than the
last migration was written by a newer release: it is refused rather than misread. To change the
schema, append a migration; never edit one that has been released.
"""

from __future__ import annotations

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
CREATE INDEX messages_created ON messages(created_at);
CREATE INDEX messages_waiting ON messages(created_at) WHERE state IN ('pending','sending');

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
"""

MIGRATIONS: tuple[str, ...] = (_V1,)


class SchemaError(Exception):
    """The file's schema is one this release cannot use."""


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
    return int(found)
