"""The outbox through its protocol, on both backends (SQLite and a real PostgreSQL): intake and
dedup, planning, claims and leases, results, holds, reports, stats, pruning; then what is each
backend's own: SQLite's file lock, WAL and query plans; PostgreSQL's shared claims, fencing and
policy lock; and both schemas' versions."""

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
import contextlib
from contextlib import asynccontextmanager, closing
from pathlib import Path

import pytest

from receiver.models import AlertStatus, Item, NewMessage, SmsText
from receiver.pipeline import new_message_id
from receiver.store import (
    REPORT_WINDOW,
    Changes,
    Fold,
    MessageQuery,
    NumberHistory,
    Planned,
    Received,
    RecipientUpdate,
    Result,
    StoreError,
)
from receiver.config import Storage
from receiver.store.postgres import POOL_SIZE as POOL
from receiver.store.postgres import PostgresStore
from receiver.store.postgres_schema import MIGRATIONS as PG_MIGRATIONS
from receiver.store.schema import MIGRATIONS, SchemaError, migrate
from receiver.store.sqlite import SQLiteStore

A, B = "+886911960999", "+886911960998"


def key(i: object) -> str:
    """A dedup key as the receiver makes them: a SHA-256 hex digest."""
    return hashlib.sha256(str(i).encode()).hexdigest()


def msg(i: str, priority: int = 1, recipients=(A, B), **kw) -> NewMessage:
    return NewMessage(id=i, group_id="db", level="warning", status=AlertStatus.FIRING,
                      sms=SmsText("hello", "GSM-7", 1), recipients=recipients, source="alertmanager",
                      alert_count=1, priority=priority, **kw)


def result(mid: str, at: float, *updates: RecipientUpdate, retry_at: float | None = None,
           error: str | None = None, dead: bool = False) -> Result:
    return Result(mid, tuple(updates), at, retry_at, error, dead)


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(path))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@asynccontextmanager
async def opened_pg(url: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(Storage(url))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path: Path):
    if request.param == "sqlite":
        async with opened(tmp_path / "outbox.db") as s:
            yield s
    else:
        async with opened_pg(request.getfixturevalue("pg_url")) as s:
            yield s


def counted_by_state(store) -> dict[str, int]:
    """The messages per state as the table holds them, counted the slow way."""
    if isinstance(store, SQLiteStore):
        with closing(sqlite3.connect(store.path)) as conn:
            return dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state"))
    out = subprocess.run(["psql", "-X", "-At", "-F", " ", store.storage.url, "-c",
                          "SELECT state, count(*) FROM messages GROUP BY state"],
                         capture_output=True, text=True, check=True).stdout
    return {state: int(n) for state, n in (line.split() for line in out.splitlines())}


# -- intake and planning ---------------------------------------------------------------------------


async def test_receive_dedups_within_the_window_and_keeps_the_body(store):
    n1 = Received("n1", 1000.0, "alertmanager", b'{"a":1}')
    assert await store.receive(n1, key(1), 60.0)
    assert not await store.receive(Received("n2", 1030.0, "alertmanager", b"{}"), key(1), 60.0)
    assert await store.received("n2") is None  # a replay stores nothing
    assert await store.receive(Received("n3", 1061.0, "alertmanager", b"{}"), key(1), 60.0)  # window passed
    assert [r.id for r in await store.unplanned(10)] == ["n1", "n3"]
    assert (await store.received("n1")).body == b'{"a":1}'


async def test_concurrent_receives_share_commits_and_twins_in_one_commit_dedup(store):
    """200 webhooks at once (50 keys): one notification per key, whichever commit they share."""
    results = await asyncio.gather(*[
        store.receive(Received(f"n{i:03d}", 1000.0, "grafana", b"{}"), key(i % 50), 60.0)
        for i in range(200)
    ])
    assert sum(results) == 50 and all(results[:50])
    assert len(await store.unplanned(1000)) == 50
    assert (await store.stats()).unplanned == 50


async def test_the_most_urgent_notifications_are_planned_first(store):
    for i, priority in enumerate((2, 1, 2, 0, 1)):  # a storm of warnings and infos, one critical
        await store.receive(Received(f"n{i}", 1000.0 + i, "alertmanager", b"{}", priority), key(i), 60.0)
    assert [r.id for r in await store.unplanned(10)] == ["n3", "n1", "n4", "n0", "n2"]
    assert [r.id for r in await store.unplanned(2)] == ["n3", "n1"]


async def test_planning_stores_messages_and_removes_the_notification_at_once(store):
    await store.receive(Received("n1", 1000.0, "alertmanager", b"{}"), key(1), 60.0)
    await store.receive(Received("n2", 1001.0, "alertmanager", b"{}"), key(2), 60.0)
    await store.planned([Planned("n1", 1000.0, (msg("n1-a"),)),
                         Planned("n2", 1001.0, error="ValueError: a bug")])
    assert [r.id for r in await store.unplanned(10)] == []  # the failed one is not retried …
    kept = await store.received("n2")  # … but kept, with its error, for an operator
    assert kept is not None and kept.error == "ValueError: a bug"
    stats = await store.stats()
    assert (stats.unplanned, stats.unplanned_failed, stats.pending) == (0, 1, 1)
    m = await store.get_message("n1-a")
    assert m.created_at == 1000.0 and m.state == "pending"  # created when received


async def test_a_plan_the_database_refuses_fails_alone(store):
    for i in (1, 2):
        await store.receive(Received(f"n{i}", 1000.0, "alertmanager", b"{}"), key(i), 60.0)
    # both plans name the same message id (a bug): the first is stored, the second kept with its error
    await store.planned([Planned("n1", 1000.0, (msg("same"),)), Planned("n2", 1000.0, (msg("same"),))])
    assert (await store.received("n1")) is None
    refused = await store.received("n2")
    assert refused is not None and "cannot store its messages" in refused.error


# -- sending ---------------------------------------------------------------------------------------


async def test_claim_priority_lease_and_finish(store):
    await store.accept([msg("warn", priority=1)], 1000.0)
    await store.accept([msg("crit", priority=0)], 1001.0)
    claimed = await store.claim(1002.0, 1, lease=30.0)
    assert [m.id for m in claimed] == ["crit"]  # most urgent first
    assert claimed[0].attempts == 1 and claimed[0].state == "sending"
    assert set(claimed[0].pending_numbers) == {A, B}
    # a claimed message is not handed out again until its lease runs out
    assert [m.id for m in await store.claim(1003.0, 10, 30.0)] == ["warn"]
    assert await store.claim(1010.0, 10, 30.0) == []
    again = await store.claim(1033.0, 10, 30.0)  # crit's lease ran out (its sender died mid-send)
    assert {m.id for m in again} == {"crit", "warn"}

    state = await store.finish(result("crit", 1034.0, RecipientUpdate(A, "accepted", "a" * 32),
                                      RecipientUpdate(B, "failed", None, "105", "Invalid destination address.")))
    assert state == "partial"
    rec = await store.get_message("crit")
    assert rec.accepted_at == 1034.0
    assert {r.number: r.state for r in rec.recipients} == {A: "accepted", B: "failed"}


async def test_claim_never_hands_out_an_excluded_message(store):
    await store.accept([msg("a", priority=0), msg("b", priority=1)], 1000.0)
    assert [m.id for m in await store.claim(1000.0, 1, 30.0, exclude=["a"])] == ["b"]
    # b's lease runs out; a result for it is still held by the dispatcher: not handed out
    assert [m.id for m in await store.claim(1100.0, 10, 30.0, exclude=["b"])] == ["a"]


async def test_many_results_in_one_commit_each_get_their_state(store):
    ids = [f"m{i}" for i in range(30)]
    await store.accept([msg(i) for i in ids], 1000.0)
    await store.claim(1000.0, 30, 30.0)
    states = await asyncio.gather(*[
        store.finish(result(i, 1001.0, RecipientUpdate(A, "accepted", "x" * 32),
                            *([RecipientUpdate(B, "accepted", "y" * 32)] if n % 3 else []),
                            retry_at=None if n % 3 else 1050.0))
        for n, i in enumerate(ids)
    ])
    assert states == ["pending" if n % 3 == 0 else "sent" for n in range(30)]
    assert (await store.stats()).by_state["sent"] == 20


async def test_retry_then_dead(store):
    await store.accept([msg("m")], 1000.0)
    await store.claim(1000.0, 10, 30.0)
    state = await store.finish(result("m", 1001.0, RecipientUpdate(A, "accepted", "x" * 32),
                                      retry_at=1050.0, error="HTTP 503"))
    assert state == "pending"
    assert await store.claim(1010.0, 10, 30.0) == []  # not due before retry_at
    assert await store.retry_now(1010.0) == 1  # a reload makes it due now
    claimed = await store.claim(1010.0, 10, 30.0)
    assert claimed[0].pending_numbers == (B,)  # the accepted one is never resent
    assert await store.finish(result("m", 5000.0, error="gave up", dead=True)) == "dead"
    assert (await store.list_messages(MessageQuery(state="dead")))[0].last_error == "gave up"


async def test_claims_of_a_dead_process_are_due_at_once_when_reopened(tmp_path: Path):
    async with opened(tmp_path / "outbox.db") as s:
        await s.accept([msg("m")], 1000.0)
        assert [m.id for m in await s.claim(1000.0, 10, lease=3600.0)] == ["m"]
    async with opened(tmp_path / "outbox.db") as s:  # this process holds the lock: nobody sends
        assert [m.id for m in await s.claim(1001.0, 10, lease=3600.0)] == ["m"]


# -- holds -----------------------------------------------------------------------------------------


async def test_throttle_history_holds_and_folds(store):
    await store.accept([msg("m1"), msg("m2")], 1000.0)
    await store.claim(1000.0, 10, 30.0)
    # the throttle clears A for m1 (a send now) and holds B on m1 and both on m2
    await store.apply(Changes(1000.0, sends=(("m1", A),),
                              holds=(("m1", B, 1060.0), ("m2", A, 1060.0), ("m2", B, 1060.0)),
                              hold_reason="throttle"))
    m1, m2 = await store.get_message("m1"), await store.get_message("m2")
    assert m1.state == "sending"  # A is still to be sent now
    assert [r.admitted for r in m1.recipients if r.number == A] == [True]
    assert (m2.state, m2.hold_reason) == ("held", "throttle")  # nothing left to send now
    history = await store.history([A, B, "+4915112345678"], since=900.0)
    assert history[A].sent_at == [1000.0] and history[A].holding and history[B].holding
    assert history["+4915112345678"].sent_at == [] and not history["+4915112345678"].holding
    assert await store.finish(result("m1", 1001.0, RecipientUpdate(A, "accepted", "x" * 32))) == "held"

    assert await store.held_numbers(1059.0) == {}
    due = await store.held_numbers(1060.0)
    assert {n: [m.id for m in ms] for n, ms in due.items()} == {A: ["m2"], B: ["m1", "m2"]}
    bundle = msg("bundle", recipients=(B,), admitted=True)
    await store.apply(Changes(1060.0, messages=(bundle,), sends=(("bundle", B),),
                              folds=(Fold(("m1", "m2"), "bundle", B),),
                              holds=(("m2", A, 1120.0),)))  # A's hold pushed back
    m1, m2 = await store.get_message("m1"), await store.get_message("m2")
    assert m1.state == "sent" and {r.number: r.state for r in m1.recipients} == {A: "accepted", B: "bundled"}
    assert m2.state == "held" and [r.hold_until for r in m2.recipients if r.number == A] == [1120.0]
    assert list(await store.held_numbers(1100.0)) == []
    assert [m.id for m in await store.claim(1060.0, 10, 30.0)] == ["bundle"]
    assert (await store.stats()).held_recipients == 1


async def test_a_send_that_did_not_go_out_gives_its_throttle_place_back(store):
    await store.accept([msg("m")], 1000.0)
    await store.claim(1000.0, 10, 30.0)
    await store.apply(Changes(1000.0, sends=(("m", A), ("m", B))))
    assert (await store.history([A], 900.0))[A].sent_at == [1000.0]
    # Clickatell answered 503: nothing went out, and the throttle must not count it
    await store.finish(result("m", 1001.0, retry_at=1005.0, error="HTTP 503"))
    assert (await store.history([A, B], 900.0)) == {A: NumberHistory([], False), B: NumberHistory([], False)}
    assert not any(r.admitted for r in (await store.get_message("m")).recipients)
    # the next attempt is cleared again, and what goes out stays counted
    (m,) = await store.claim(1005.0, 10, 30.0)
    await store.apply(Changes(1005.0, sends=(("m", A), ("m", B))))
    await store.finish(result("m", 1006.0, RecipientUpdate(A, "accepted", "a" * 32), retry_at=1010.0))
    history = await store.history([A, B], 900.0)
    assert history[A].sent_at == [1005.0] and history[B].sent_at == []


async def test_whole_message_holds_and_collapse(store):
    await store.accept([msg("d1", hold_reason="digest 15m", hold_until=1900.0),
                        msg("d2", hold_reason="digest 15m", hold_until=1900.0)], 1000.0)
    assert await store.claim(1000.0, 10, 30.0) == []  # held messages are not due
    assert await store.held_messages(1899.0) == []
    held = await store.held_messages(1900.0)
    assert [m.id for m in held] == ["d1", "d2"] and set(held[0].pending_numbers) == {A, B}
    await store.apply(Changes(1900.0, folds=(Fold(("d1",), None), Fold(("d2",), "summary"))))
    assert (await store.get_message("d1")).state == "collapsed"
    d2 = await store.get_message("d2")
    assert (d2.state, d2.bundle_id) == ("bundled", "summary")


# -- reporting and housekeeping ---------------------------------------------------------------------


async def test_delivery_reports_move_forward_only(store):
    await store.accept([msg("m", recipients=(A,))], 1000.0)
    await store.claim(1000.0, 10, 30.0)
    await store.finish(result("m", 1001.0, RecipientUpdate(A, "accepted", "f" * 32)))
    assert await store.delivery_report("f" * 32, "4 RECEIVED_BY_RECIPIENT", "delivered", 1002.0)
    assert await store.delivery_report("f" * 32, "3 DELIVERED_TO_GATEWAY", None, 1003.0)  # late
    r = (await store.get_message("m")).recipients[0]
    assert (r.state, r.delivery_status) == ("delivered", "4 RECEIVED_BY_RECIPIENT")
    assert not await store.delivery_report("0" * 32, "4", "delivered", 1004.0)


async def test_delivery_reports_found_through_their_message(store):
    """A report names our message (clientMessageId): found at any age. Without it, only the
    messages of the last REPORT_WINDOW are searched (their ids start with their creation time)."""
    day = 86400.0
    old, new = new_message_id(1000.0), new_message_id(1000.0 + 4 * day)
    for mid, api_id, at in ((old, "a" * 32, 1000.0), (new, "b" * 32, 1000.0 + 4 * day)):
        await store.accept([msg(mid, recipients=(A,))], at)
        await store.claim(at, 10, 30.0)
        await store.finish(result(mid, at, RecipientUpdate(A, "accepted", api_id)))
    now = 1000.0 + 4 * day + 10
    assert not await store.delivery_report("a" * 32, "4", "delivered", now)  # 4 days old, no client id
    assert not await store.delivery_report("a" * 32, "4", "delivered", now, new)  # not that message's
    assert await store.delivery_report("a" * 32, "4", "delivered", now, old)
    assert await store.delivery_report("b" * 32, "4", "delivered", now)
    states = {m.id: m.recipients[0].state for m in await store.list_messages(MessageQuery())}
    assert states == {old: "delivered", new: "delivered"}
    assert REPORT_WINDOW < 4 * day


async def test_list_filters(store):
    for i in range(5):
        await store.accept([msg(f"n{i}" + "0a1b2c3d")], 1000.0 + i)
    assert len(await store.list_messages(MessageQuery(since=1003.0))) == 2
    assert len(await store.list_messages(MessageQuery(group="nope"))) == 0
    assert len(await store.list_messages(MessageQuery(limit=3))) == 3
    assert [m.id for m in await store.list_messages(MessageQuery(notification="n2"))] == ["n20a1b2c3d"]


async def test_stats_count_every_state_without_a_scan(store):
    await store.accept([msg("a"), msg("b"), msg("c", suppressed=True, hold_reason="delivery none")], 1000.0)
    await store.claim(1000.0, 1, 30.0)
    stats = await store.stats()
    assert {k: v for k, v in stats.by_state.items() if v} == {"pending": 1, "sending": 1, "suppressed": 1}
    assert stats.pending == 2 and stats.oldest_pending_age(1010.0) == 10.0
    # kept by triggers: equal to a count
    assert {k: v for k, v in stats.by_state.items() if v} == counted_by_state(store)


async def test_prune_is_chunked_and_keeps_recent_and_unfinished(store):
    for i in range(25):
        await store.accept([msg(f"old{i}")], 1000.0)
        await store.claim(1000.0, 1, 30.0)
        await store.finish(result(f"old{i}", 1000.0, *(RecipientUpdate(n, "failed", None, "105", "x")
                                                       for n in (A, B))))
    await store.accept([msg("new")], 9000.0)
    await store.accept([msg("stuck")], 1000.0)
    await store.receive(Received("n", 400.0, "grafana", b"{}"), key("k"), 60.0)
    # 10 messages (with their 20 recipients) per call at most, plus the keys that are due
    assert await store.prune(5000.0, keys_before=500.0, sends_before=500.0, limit=10) == 31
    while await store.prune(5000.0, keys_before=500.0, sends_before=500.0, limit=10) == 10 * 3:
        pass
    left = {m.id for m in await store.list_messages(MessageQuery())}
    assert left == {"new", "stuck"}  # recent, and never-finished, messages stay
    assert sum((await store.stats()).by_state.values()) == 2


# -- the file -----------------------------------------------------------------------------------


async def test_a_second_store_on_the_same_file_is_refused_naming_the_holder(tmp_path: Path):
    async with opened(tmp_path / "outbox.db") as store:
        with pytest.raises(StoreError, match=rf"in use by another sms-receiver \(pid {os.getpid()}"):
            await SQLiteStore(store.path).open()
        await store.ping()  # the holder is unaffected
        link = tmp_path / "elsewhere" / "outbox.db"  # the same file by another name
        link.parent.mkdir()
        link.symlink_to(store.path)
        with pytest.raises(StoreError, match="in use by another sms-receiver"):
            await SQLiteStore(str(link)).open()


def test_the_lock_is_held_by_the_process_and_dropped_when_it_dies(tmp_path: Path):
    db = tmp_path / "outbox.db"
    child = subprocess.Popen(
        [sys.executable, "-c", f"from receiver.store.sqlite import lock; import sys, time; lock({str(db)!r}); "
                               "print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        probe = [sys.executable, "-c", f"from receiver.store.sqlite import lock; lock({str(db)!r})"]
        refused = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and f"(pid {child.pid}" in refused.stderr
        child.kill()
        child.wait(timeout=10)
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    finally:
        child.kill()


async def test_no_storage_directory_means_a_clear_error(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot open the outbox"):
        await SQLiteStore(str(tmp_path / "file" / "outbox.db")).open()  # parent is a file


def test_migrations_run_in_order_each_in_one_transaction(tmp_path: Path):
    steps = ("CREATE TABLE a (x);", "ALTER TABLE a ADD COLUMN y; INSERT INTO a VALUES (1, 2);",
             "CREATE TABLE broken (x); INSERT INTO nope VALUES (1);")
    with closing(sqlite3.connect(tmp_path / "m.db", isolation_level=None)) as conn:
        assert migrate(conn, steps[:1]) == 0
        assert migrate(conn, steps[:2]) == 1  # only the new one runs
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        assert conn.execute("SELECT * FROM a").fetchall() == [(1, 2)]
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, steps)
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)  # the failed one left no trace
        assert conn.execute("SELECT count(*) FROM sqlite_schema WHERE name='broken'").fetchone() == (0,)
        conn.execute("PRAGMA user_version=7")
        with pytest.raises(SchemaError, match="newer than this release knows"):
            migrate(conn, steps)


async def test_a_file_from_a_newer_release_is_refused(tmp_path: Path):
    with closing(sqlite3.connect(tmp_path / "outbox.db")) as conn:
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="written by a newer sms-receiver"):
        await SQLiteStore(str(tmp_path / "outbox.db")).open()


async def test_a_file_from_an_earlier_development_version_is_refused(tmp_path: Path):
    """0.x edits the first migration in place: a file at version 1 that lacks part of it was
    made by an earlier development commit, and is refused with what to do, never half used."""
    store = SQLiteStore(str(tmp_path / "outbox.db"))
    await store.open()
    await store.close()
    with closing(sqlite3.connect(tmp_path / "outbox.db")) as conn:
        conn.execute("DROP TABLE pages")
    with pytest.raises(StoreError, match="earlier development version .* lacks pages.* move the outbox aside"):
        await SQLiteStore(str(tmp_path / "outbox.db")).open()


async def test_every_message_field_round_trips(store):
    item = Item("fp1", "DiskFull db-1", "warning", 1, "firing")
    await store.accept([msg("m", items=(item,), template_error="boom")], 1000.0)
    m = await store.get_message("m")
    assert (m.items, m.template_error, m.text, m.encoding, m.parts) == ((item,), "boom", "hello", "GSM-7", 1)


def test_what_runs_every_second_never_walks_the_finished_messages(tmp_path: Path):
    """The planner, the dispatcher and /metrics run their queries over and over: each must go
    through a partial index of what waits, never through all messages (a million of them, most
    finished). Checked on SQLite's own query plans."""
    from receiver.store import sql, twoway_sql

    conn = sqlite3.connect(tmp_path / "plans.db", isolation_level=None)
    migrate(conn)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    now = 1000.0
    sql.held_messages(conn, now)
    sql.held_numbers(conn, now)
    sql.claim(conn, now, 16, 60.0, set())
    sql.unplanned(conn, 25)
    sql.stats(conn)
    sql.history(conn, ["+14155550123"], now - 3600)
    sql.prune(conn, now, now, now, 100)
    twoway_sql.prune_pages(conn, now, 100)
    conn.set_trace_callback(None)
    partial = ("messages_due", "messages_held", "messages_lease", "messages_waiting",
               "recipients_held", "notifications_waiting")
    for statement in statements:
        if not statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            continue
        for *_, step in conn.execute("EXPLAIN QUERY PLAN " + statement):
            if step.startswith("SCAN") and not any(index in step for index in partial):
                # message_states has eleven rows; notifications only what is not planned yet
                assert step in ("SCAN message_states", "SCAN notifications"), f"{step!r} in {statement!r}"
    conn.close()


async def test_the_wal_starts_over_under_writes_that_never_pause(tmp_path: Path, monkeypatch):
    """A checkpoint from its own connection never catches a writer that never pauses: past
    WAL_LIMIT frames the writer checkpoints between two batches, and the WAL stays bounded."""
    from receiver.store import sqlite as backend

    monkeypatch.setattr(backend, "WAL_LIMIT", 64)
    monkeypatch.setattr(backend, "CHECKPOINT_INTERVAL", 0.0)
    wal, largest = tmp_path / "outbox.db-wal", 0

    async def stream(s: SQLiteStore, worker: int) -> None:
        nonlocal largest
        for i in range(60):
            body = os.urandom(2000)  # a page per notification, about
            await s.receive(Received(f"{worker:03}-{i:03}", 1000.0 + i, "alertmanager", body),
                            key((worker, i)), 60.0)
            largest = max(largest, wal.stat().st_size)

    async with opened(tmp_path / "outbox.db") as s:
        await asyncio.gather(*(stream(s, w) for w in range(40)))
        assert len(await s.unplanned(10_000)) == 2400
    written = 2400 * 2000
    assert largest < written, (largest, written)  # it started over: ~1 MB (without: 18 MB)


# -- PostgreSQL: several replicas on one database ---------------------------------------------------


@pytest.fixture
async def replicas(pg_url):
    """Two stores on one database, as two replicas have."""
    async with opened_pg(pg_url) as a, opened_pg(pg_url) as b:
        yield a, b


async def test_an_ha_pair_sending_to_two_replicas_pages_once(replicas):
    """Both Alertmanagers of a pair send each notification, one to each replica, at once: the
    dedup key is checked in the transaction that stores it, so one notification is stored."""
    a, b = replicas
    answers = await asyncio.gather(*[
        s.receive(Received(f"{s is a}{i:03d}", 1000.0, "alertmanager", b"{}"), key(i), 60.0)
        for i in range(100) for s in (a, b)])
    assert sum(answers) == 100
    assert all(answers[2 * i] != answers[2 * i + 1] for i in range(100))  # exactly one of each pair
    assert len(await a.unplanned(1000)) + len(await b.unplanned(1000)) == 100


async def test_replicas_plan_and_claim_each_message_once(replicas):
    a, b = replicas
    for i in range(40):
        await a.receive(Received(f"n{i:02d}", 1000.0, "alertmanager", b"{}"), key(i), 60.0)
    taken = [await a.unplanned(25), await b.unplanned(25)]  # each planner leases its own
    assert len(taken[0]) == 25 and len(taken[1]) == 15
    assert not {n.id for n in taken[0]} & {n.id for n in taken[1]}
    await a.accept([msg(f"m{i:02d}") for i in range(40)], 1000.0)
    claims = await asyncio.gather(*[s.claim(1000.0, 5, 30.0) for _ in range(8) for s in (a, b)])
    ids = [m.id for c in claims for m in c]
    assert len(ids) == len(set(ids)) == 40


async def test_a_dead_replicas_claims_are_taken_over_and_its_late_result_is_fenced(replicas):
    a, b = replicas
    await a.accept([msg("m")], 1000.0)
    (mine,) = await a.claim(1000.0, 10, lease=30.0)  # a sends, then loses the database
    assert await b.claim(1029.0, 10, 30.0) == []  # the lease still holds
    (theirs,) = await b.claim(1030.0, 10, 30.0)
    assert theirs.attempts == mine.attempts + 1 and b.usage().claims_taken_over == 1
    # a's result arrives late: what its recipients became is kept, the message is b's
    assert await a.finish(result("m", 1031.0, RecipientUpdate(A, "accepted", "a" * 32),
                                 retry_at=1040.0)) == "sending"
    m = await a.get_message("m")
    assert m.state == "sending" and m.pending_numbers == (B,)
    assert await b.finish(result("m", 1032.0, RecipientUpdate(B, "accepted", "b" * 32))) == "sent"
    assert {r.number: r.api_message_id for r in (await b.get_message("m")).recipients} == {
        A: "a" * 32, B: "b" * 32}


async def test_one_replica_decides_the_paging_policy_at_a_time(replicas, pg_server):
    """While one replica reads the throttle history and writes its decision, the other waits
    for the policy lock: both cannot clear a phone's last allowed send."""
    a, b = replicas
    entered = asyncio.Event()

    async def second() -> dict[str, NumberHistory]:
        async with b.deciding() as d:
            entered.set()
            return await d.history([A], 900.0)

    async with a.deciding() as d:
        assert (await d.history([A], 900.0))[A].sent_at == []
        waiting = asyncio.create_task(second())

        def blocked() -> bool:  # b's connection waits on the advisory lock
            return pg_server.psql("SELECT count(*) FROM pg_locks WHERE locktype='advisory' "
                                  "AND NOT granted") == "1"

        await eventually_true(blocked)
        assert not entered.is_set()
        await d.apply(Changes(1000.0, sends=(("m", A),)))
    assert (await waiting)[A].sent_at == [1000.0]  # it read what a wrote


async def test_a_failed_decision_writes_nothing(replicas):
    a, _ = replicas
    with pytest.raises(RuntimeError):
        async with a.deciding() as d:
            await d.apply(Changes(1000.0, sends=(("m", A),)))
            raise RuntimeError("the policy failed half-way")
    assert (await a.history([A], 900.0))[A].sent_at == []


async def test_replicas_starting_together_migrate_once_and_a_newer_schema_is_refused(pg_url, pg_server):
    stores = [PostgresStore(Storage(pg_url)) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    await asyncio.gather(*(s.close() for s in stores))
    db = pg_url.rsplit("/", 1)[1]
    assert pg_server.psql("SELECT version FROM sms_receiver_schema", db) == str(len(PG_MIGRATIONS))
    pg_server.psql(f"UPDATE sms_receiver_schema SET version={len(PG_MIGRATIONS) + 1}", db)
    with pytest.raises(StoreError, match="newer than this release knows"):
        await PostgresStore(Storage(pg_url)).open()
    pg_server.psql(f"UPDATE sms_receiver_schema SET version={len(PG_MIGRATIONS)}", db)
    pg_server.psql("DROP TABLE escalations", db)  # as if made by an earlier development commit
    with pytest.raises(StoreError, match="earlier development version .* lacks escalations"):
        await PostgresStore(Storage(pg_url)).open()


async def test_an_unreachable_database_is_a_store_error_naming_it_without_its_password():
    from tests.tools import free_port

    url = f"postgresql://sms:hunter2@127.0.0.1:{free_port()}/sms"
    with pytest.raises(StoreError) as info:
        await PostgresStore(Storage(url)).open()
    assert "127.0.0.1" in str(info.value) and "hunter2" not in str(info.value)


async def eventually_true(check, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(check):
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- what the review and the hostile tests found --------------------------------------------------


async def test_a_nul_character_is_stored_not_refused(store):
    """A NUL in a label, a template's output or Clickatell's error text (PostgreSQL's text
    cannot hold one) must not keep a page from being stored or its result from being recorded."""
    await store.accept([NewMessage(id="m", group_id="db", level="warning", status=AlertStatus.FIRING,
                                   sms=SmsText("disk\x00full", "GSM-7", 1), recipients=(A,),
                                   source="alertmanager", alert_count=1, priority=1,
                                   items=(Item("k", "Disk\x00Full", "warning", 1, "firing"),))], 1000.0)
    (m,) = await store.claim(1000.0, 10, 30.0)
    assert m.text.replace("\ufffd", "\x00") == "disk\x00full"
    assert await store.finish(result("m", 1001.0, RecipientUpdate(A, "failed", None, "105", "bad\x00body"),
                                     error="HTTP 502: \x00\x01")) == "failed"
    assert (await store.get_message("m")).recipients[0].error.replace("\ufffd", "\x00") == "bad\x00body"


async def test_a_result_recorded_while_a_hold_is_released_settles_the_message(store):
    """One recipient being sent, another held by the throttle and bundled away at that moment:
    whichever commits first, the message ends sent, never stuck as held."""
    ids = [f"m{i:02d}" for i in range(20)]
    await store.accept([msg(i) for i in ids], 1000.0)
    await store.claim(1000.0, 20, 30.0)
    await store.apply(Changes(1000.0, sends=tuple((i, A) for i in ids),
                              holds=tuple((i, B, 1060.0) for i in ids), hold_reason="throttle"))
    await store.accept([msg("bundle", recipients=(B,), admitted=True)], 1060.0)
    await asyncio.gather(
        *(store.finish(result(i, 1060.0, RecipientUpdate(A, "accepted", "a" * 32))) for i in ids),
        store.apply(Changes(1060.0, folds=(Fold(tuple(ids), "bundle", B),))))
    assert {(await store.get_message(i)).state for i in ids} == {"sent"}


async def test_a_late_result_after_a_takeover_settles_what_is_left(replicas):
    """b took the message over and ended with a retry; a's late result says both recipients
    were accepted: the message is sent, not pending with nobody to send to."""
    a, b = replicas
    await a.accept([msg("m")], 1000.0)
    await a.claim(1000.0, 10, lease=30.0)
    await b.claim(1030.0, 10, 30.0)
    assert await b.finish(result("m", 1031.0, retry_at=1040.0, error="HTTP 503")) == "pending"
    assert await a.finish(result("m", 1032.0, RecipientUpdate(A, "accepted", "a" * 32),
                                 RecipientUpdate(B, "accepted", "b" * 32))) == "sent"
    assert await b.claim(1100.0, 10, 30.0) == []


async def test_a_replica_frozen_inside_a_decision_does_not_hold_the_others_back(pg_url):
    """A replica stopped (SIGSTOP, a lost network) while it holds the policy lock: the server
    ends its idle transaction, and the other replicas decide again."""
    async with opened_pg(pg_url) as b:
        frozen = PostgresStore(Storage(pg_url), session={"idle_in_transaction_session_timeout": "1s"})
        await frozen.open()
        try:
            with pytest.raises(StoreError):
                async with frozen.deciding() as d:
                    await d.apply(Changes(1000.0, sends=(("m", A),)))
                    async with b.deciding() as other:  # waits for the frozen one's session to end
                        assert (await other.history([A], 900.0))[A].sent_at == []  # nothing of it
        finally:
            await frozen.close()


async def test_the_session_settings_the_guarantees_need_win_over_the_url(pg_url):
    url = f"{pg_url}?synchronous_commit=off&default_transaction_isolation=serializable"
    async with opened_pg(url) as s:
        async with s._conn() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
            assert await conn.fetchval("SHOW default_transaction_isolation") == "read committed"


async def test_the_state_counts_are_summed_in_bounded_steps(pg_url, pg_server):
    async with opened_pg(pg_url) as s:
        await s.accept([msg(f"m{i}") for i in range(50)], 1000.0)
        for _ in range(50):  # a row of counts per claim
            await s.claim(1000.0, 1, 30.0)
        db = pg_url.rsplit("/", 1)[1]
        assert int(pg_server.psql("SELECT count(*) FROM message_counts", db)) > 50
        await s.prune(0.0, 0.0, 0.0)
        assert int(pg_server.psql("SELECT count(*) FROM message_counts", db)) <= 11
        assert {k: v for k, v in (await s.stats()).by_state.items() if v} == {"sending": 50}


async def test_notifications_that_could_not_be_planned_are_tried_again_at_start(pg_url):
    async with opened_pg(pg_url) as s:
        await s.receive(Received("n1", 1000.0, "alertmanager", b"{}"), key(1), 60.0)
        await s.planned([Planned("n1", 1000.0, error="ValueError: a bug")])
        assert await s.unplanned(10) == []
    async with opened_pg(pg_url) as s:  # a new release started
        assert [n.id for n in await s.unplanned(10)] == ["n1"]


async def test_a_database_made_writable_again_is_written_at_once(pg_url, pg_server):
    """Sessions keep the read-only default they started with (a standby promoted, a database
    set read-only and back): one that meets it is dropped, and the next write works."""
    db = pg_url.rsplit("/", 1)[1]
    async with opened_pg(pg_url) as s:
        pg_server.psql(f"ALTER DATABASE {db} SET default_transaction_read_only = on")
        pg_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'")
        errors = []
        while not any("read-only" in e for e in errors):  # the terminated session first, then
            with pytest.raises(StoreError) as info:       # a new one, read-only
                await s.ping()
            errors.append(str(info.value))
            assert len(errors) <= POOL + 1, errors
        pg_server.psql(f"ALTER DATABASE {db} SET default_transaction_read_only = off")
        for _ in range(POOL):  # each read-only session left in the pool is dropped when met
            with contextlib.suppress(StoreError):
                await s.ping()
                break
        else:
            raise AssertionError("still read-only: the pool kept the sessions that were")
        assert await s.receive(Received("n1", 1000.0, "alertmanager", b"{}"), key(1), 60.0)


async def test_a_dead_replicas_critical_page_goes_before_a_storm_of_warnings(replicas):
    a, b = replicas
    await a.accept([msg("crit", priority=0)], 1000.0)
    assert [m.id for m in await a.claim(1000.0, 1, lease=30.0)] == ["crit"]  # then a dies
    await b.accept([msg(f"w{i:02d}", priority=1) for i in range(20)], 1010.0)
    assert [m.id for m in await b.claim(1030.0, 1, 30.0)] == ["crit"]  # its lease ran out: first
    assert b.usage().claims_taken_over == 1


async def test_readiness_fails_while_the_dedup_table_is_locked(pg_url, pg_server):
    """What a webhook writes, not a probe row of its own: a lock that holds every webhook
    back makes the store not ready (a one-row upsert elsewhere said ready)."""
    import asyncpg

    async with opened_pg(pg_url) as s:
        await s.ping()
        other = await asyncpg.connect(pg_url)
        try:
            async with other.transaction():
                await other.execute("LOCK TABLE dedup IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(StoreError, match="lock"):
                    await s.ping()
        finally:
            await other.close()
        await s.ping()
        assert await s.stats()  # the probes left nothing behind
        assert (await s.stats()).unplanned == 0
