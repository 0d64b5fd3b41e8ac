"""The PostgreSQL outbox's schema, as numbered migrations.

``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1`` (the one row of
``sms_receiver_schema``), each in one transaction, applied under an advisory lock so that
replicas starting together do not race: the second waits, then finds the work done. A database
newer than the last migration was written by a newer release: refused rather than misread. To
change the schema, append a migration; never edit one that has been released.

The tables are the SQLite outbox's (``schema.py``) in PostgreSQL's types: times are epoch
seconds (``float8``) as the store protocol speaks them. Counts per message state are kept as
rows added by statement triggers and summed on read: an insert never waits on another
replica's row lock (a single counter row per state would serialise every transaction and
deadlock two that move messages between the same states in opposite orders).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from receiver.store.schema import missing_objects, schema_objects

# pg_advisory_lock keys: arbitrary, fixed, and the same in every release.
MIGRATION_LOCK = 0x736D7372_00000001  # "smsr" 1
POLICY_LOCK = 0x736D7372_00000002

_V1 = """
CREATE TABLE notifications (
    id             text PRIMARY KEY,
    received_at    float8 NOT NULL,
    source         text NOT NULL,
    body           bytea NOT NULL,
    priority       integer NOT NULL,
    error          text,
    planning_until timestamptz,      -- a replica is planning it until then (its lease) …
    planning_by    text              -- … that one
);
CREATE INDEX notifications_waiting ON notifications(priority, id) WHERE error IS NULL;

CREATE TABLE dedup (
    key     text PRIMARY KEY,
    seen_at float8 NOT NULL
);
CREATE INDEX dedup_seen ON dedup(seen_at);

CREATE TABLE messages (
    id              text PRIMARY KEY,
    created_at      float8 NOT NULL,
    source          text NOT NULL,
    group_id        text NOT NULL,
    level           text NOT NULL,
    priority        integer NOT NULL,
    status          text NOT NULL,
    text            text NOT NULL,
    encoding        text NOT NULL,
    parts           integer NOT NULL,
    alert_count     integer NOT NULL,
    template_error  text,
    state           text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at float8 NOT NULL,
    lease_until     float8,
    last_error      text,
    updated_at      float8 NOT NULL,
    accepted_at     float8,
    hold_reason     text,
    bundle_id       text,
    items           text
);
CREATE INDEX messages_due ON messages(priority, next_attempt_at) WHERE state = 'pending';
CREATE INDEX messages_lease ON messages(lease_until) WHERE state = 'sending';
CREATE INDEX messages_held ON messages(next_attempt_at) WHERE state = 'held';
CREATE INDEX messages_created ON messages(created_at, id);
CREATE INDEX messages_waiting ON messages(created_at) WHERE state IN ('pending', 'sending');
-- The history page (receiver.ui) walks these newest first, keyset-paged on (created_at, id).
CREATE INDEX messages_group_history ON messages(group_id, created_at, id);
CREATE INDEX messages_state_history ON messages(state, created_at, id);

CREATE TABLE recipients (
    message_id      text NOT NULL,
    number          text NOT NULL,
    state           text NOT NULL,
    api_message_id  text,
    error_code      text,
    error           text,
    delivery_status text,
    updated_at      float8 NOT NULL,
    hold_until      float8,
    bundle_id       text,
    admitted_at     float8,
    PRIMARY KEY (message_id, number)
);
CREATE INDEX recipients_held ON recipients(number, hold_until) WHERE state = 'held';
-- Recipients by group, hour of their message's creation and state (the groups page): rows
-- added by statement triggers and summed on read, as message_counts (no replica waits on
-- another's counter row); group_counts compacts them.
CREATE TABLE group_hours (
    id       bigserial PRIMARY KEY,
    group_id text NOT NULL,
    hour     bigint NOT NULL,
    state    text NOT NULL,
    n        bigint NOT NULL
);
CREATE INDEX group_hours_hour ON group_hours(hour);
CREATE FUNCTION sms_receiver_group_hours_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO group_hours(group_id, hour, state, n)
    SELECT m.group_id, floor(m.created_at / 3600)::bigint, r.state, count(*)
    FROM new_rows r JOIN messages m ON m.id = r.message_id GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;
CREATE FUNCTION sms_receiver_group_hours_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO group_hours(group_id, hour, state, n)
    SELECT m.group_id, floor(m.created_at / 3600)::bigint, r.state, sum(r.n)
    FROM (SELECT message_id, state, -1 AS n FROM old_rows
          UNION ALL SELECT message_id, state, 1 FROM new_rows) AS r
    JOIN messages m ON m.id = r.message_id GROUP BY 1, 2, 3 HAVING sum(r.n) <> 0;
    RETURN NULL;
END $$;
CREATE FUNCTION sms_receiver_group_hours_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO group_hours(group_id, hour, state, n)
    SELECT m.group_id, floor(m.created_at / 3600)::bigint, r.state, -count(*)
    FROM old_rows r JOIN messages m ON m.id = r.message_id GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;
CREATE TRIGGER recipients_inserted AFTER INSERT ON recipients REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sms_receiver_group_hours_inserted();
CREATE TRIGGER recipients_updated AFTER UPDATE ON recipients
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sms_receiver_group_hours_updated();
CREATE TRIGGER recipients_deleted AFTER DELETE ON recipients REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sms_receiver_group_hours_deleted();

CREATE TABLE sends (
    id      bigserial PRIMARY KEY,
    number  text NOT NULL,
    sent_at float8 NOT NULL
);
CREATE INDEX sends_number ON sends(number, sent_at);
CREATE INDEX sends_at ON sends(sent_at);

CREATE TABLE message_counts (
    id    bigserial PRIMARY KEY,
    state text NOT NULL,
    n     bigint NOT NULL
);
CREATE FUNCTION sms_receiver_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts(state, n) SELECT state, count(*) FROM new_rows GROUP BY state;
    RETURN NULL;
END $$;
CREATE FUNCTION sms_receiver_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts(state, n)
    SELECT state, sum(n) FROM (SELECT state, -1 AS n FROM old_rows
                               UNION ALL SELECT state, 1 FROM new_rows) AS moved
    GROUP BY state HAVING sum(n) <> 0;
    RETURN NULL;
END $$;
CREATE FUNCTION sms_receiver_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counts(state, n) SELECT state, -count(*) FROM old_rows GROUP BY state;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_inserted AFTER INSERT ON messages REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sms_receiver_count_inserted();
CREATE TRIGGER messages_updated AFTER UPDATE ON messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sms_receiver_count_updated();
CREATE TRIGGER messages_deleted AFTER DELETE ON messages REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sms_receiver_count_deleted();

-- Two-way paging: see schema.py
CREATE SEQUENCE page_refs;
CREATE TABLE pages (
    ref         bigint PRIMARY KEY,
    message_id  text NOT NULL UNIQUE,
    group_id    text NOT NULL,
    source      text NOT NULL,
    created_at  float8 NOT NULL,
    acked_at    float8,
    escalate_at float8,
    rounds      integer NOT NULL DEFAULT 0
);
CREATE INDEX pages_due ON pages(escalate_at) WHERE escalate_at IS NOT NULL;
CREATE INDEX pages_created ON pages(created_at);  -- pruning
CREATE TABLE page_alerts (
    ref      bigint NOT NULL,
    key      text NOT NULL,
    labels   text NOT NULL,
    resolved boolean NOT NULL DEFAULT false,
    PRIMARY KEY (ref, key)
);
CREATE INDEX page_alerts_firing ON page_alerts(key) WHERE NOT resolved;
CREATE TABLE acks (
    reply_id    text PRIMARY KEY,
    ref         bigint NOT NULL,
    number      text NOT NULL,
    by_name     text NOT NULL,
    at          float8 NOT NULL,
    until       float8 NOT NULL,
    silence_ids text,
    outcome     text,
    unacked_at  float8
);
CREATE INDEX acks_ref ON acks(ref);
CREATE TABLE escalations (
    ref        bigint NOT NULL,
    round      integer NOT NULL,
    group_id   text NOT NULL,
    at         float8 NOT NULL,
    message_id text NOT NULL,
    PRIMARY KEY (ref, round, group_id)
);
CREATE INDEX escalations_message ON escalations(message_id);
CREATE TABLE replies (
    id     text PRIMARY KEY,
    number text NOT NULL,
    at     float8 NOT NULL,
    action text NOT NULL
);
CREATE INDEX replies_number ON replies(number, action, at);
CREATE INDEX replies_at ON replies(at);  -- pruning

"""

MIGRATIONS: tuple[str, ...] = (_V1,)


class SchemaError(Exception):
    """The database's schema is one this release cannot use."""


async def migrate(conn: Any, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Bring the database to the last version, one transaction per migration, under the
    migration lock; returns the version it was at. ``conn`` is an asyncpg connection."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS sms_receiver_schema (version integer NOT NULL)")
        found = await conn.fetchval("SELECT max(version) FROM sms_receiver_schema") or 0
        if found > len(migrations):
            raise SchemaError(
                f"the database has outbox schema version {found}, newer than this release knows "
                f"({len(migrations)}): it was written by a newer sms-receiver"
            )
        for version in range(found, len(migrations)):
            async with conn.transaction():
                await conn.execute(migrations[version])
                await conn.execute("DELETE FROM sms_receiver_schema")
                await conn.execute("INSERT INTO sms_receiver_schema(version) VALUES ($1)", version + 1)
        present = {r[0] for r in await conn.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
            "UNION SELECT tgname FROM pg_trigger")}
        problem = missing_objects(schema_objects(migrations), present)
        if problem:
            raise SchemaError(problem.replace("the outbox was", "the database's outbox was"))
        return int(found)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
