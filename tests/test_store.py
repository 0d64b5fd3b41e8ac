import asyncio
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import pytest

from receiver.models import AlertStatus, NewMessage, SmsText
from receiver.pipeline import new_message_id
from receiver.store import (
    REPORT_WINDOW,
    MessageQuery,
    RecipientUpdate,
    StoreError,
    open_store,
    sqlite_path,
)
from receiver.store import journal
from receiver.store import sqlite as sqlite_store
from receiver.store.sqlite import SQLiteStore


def key(i: int) -> str:
    """A dedup key as the receiver makes them: a SHA-256 hex digest."""
    return hashlib.sha256(str(i).encode()).hexdigest()


def msg(i: str, priority: int = 1, recipients=("+886911960999", "+886911960998")) -> NewMessage:
    return NewMessage(id=i, group_id="db", level="warning", status=AlertStatus.FIRING,
                      sms=SmsText("hello", "GSM-7", 1), recipients=recipients, source="alertmanager",
                      alert_count=1, priority=priority)


@asynccontextmanager
async def opened(path: Path, older_schema: str | None = None) -> AsyncIterator[SQLiteStore]:
    """A store on ``path``; with ``older_schema``, on a file an earlier release wrote."""
    if older_schema is not None:
        with closing(sqlite3.connect(path)) as conn:
            conn.executescript(older_schema)
            conn.commit()
    s = SQLiteStore(str(path))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def store(tmp_path: Path):
    async with opened(tmp_path / "outbox.db") as s:
        yield s


def test_sqlite_urls():
    assert sqlite_path("sqlite:///var/lib/x.db") == "/var/lib/x.db"
    assert sqlite_path("sqlite://./data/x.db") == "./data/x.db"
    with pytest.raises(StoreError):
        open_store("mysql://x")


async def test_accept_dedup_window(store):
    r = await store.accept("k1", "alertmanager", 1000.0, 60.0, [msg("m1")])
    assert not r.duplicate and r.message_ids == ("m1",)
    again = await store.accept("k1", "alertmanager", 1030.0, 60.0, [msg("m2")])
    assert again.duplicate
    assert await store.get_message("m2") is None
    later = await store.accept("k1", "alertmanager", 1100.0, 60.0, [msg("m3")])  # window passed
    assert not later.duplicate


async def test_group_commit_many_concurrent_accepts(store):
    results = await asyncio.gather(*[
        store.accept(f"k{i % 50}", "alertmanager", 1000.0, 60.0, [msg(f"m{i}")]) for i in range(200)
    ])
    assert sum(not r.duplicate for r in results) == 50  # concurrent replays in one batch too
    assert (await store.stats()).pending == 50


async def test_claim_priority_lease_and_finish(store):
    await store.accept("a", "alertmanager", 1000.0, 60.0, [msg("warn", priority=1)])
    await store.accept("b", "alertmanager", 1001.0, 60.0, [msg("crit", priority=0)])
    claimed = await store.claim(1002.0, 1, lease=30.0)
    assert [m.id for m in claimed] == ["crit"]  # most urgent first
    assert claimed[0].attempts == 1 and claimed[0].state == "sending"
    assert len(claimed[0].pending_numbers) == 2
    # a claimed message is not handed out again until its lease runs out
    assert [m.id for m in await store.claim(1003.0, 10, 30.0)] == ["warn"]
    assert await store.claim(1010.0, 10, 30.0) == []
    again = await store.claim(1033.0, 10, 30.0)  # crit's lease expired (process died mid-send)
    assert {m.id for m in again} == {"crit", "warn"}

    state = await store.finish("crit", [
        RecipientUpdate("+886911960999", "accepted", "a" * 32),
        RecipientUpdate("+886911960998", "failed", None, "105", "Invalid destination address."),
    ], 1034.0, retry_at=None, last_error=None)
    assert state == "partial"
    rec = await store.get_message("crit")
    assert rec.accepted_at == 1034.0
    assert {r.number: r.state for r in rec.recipients} == {"+886911960999": "accepted", "+886911960998": "failed"}


async def test_retry_then_dead(store):
    await store.accept("a", "alertmanager", 1000.0, 60.0, [msg("m")])
    await store.claim(1000.0, 10, 30.0)
    state = await store.finish("m", [RecipientUpdate("+886911960999", "accepted", "x" * 32)], 1001.0,
                               retry_at=1050.0, last_error="HTTP 503")
    assert state == "pending"
    assert await store.claim(1010.0, 10, 30.0) == []  # not due before retry_at
    assert await store.retry_now(1010.0) == 1  # a reload makes it due now
    claimed = await store.claim(1010.0, 10, 30.0)
    assert claimed[0].pending_numbers == ("+886911960998",)  # the accepted one is never resent
    state = await store.finish("m", [], 5000.0, retry_at=None, last_error="gave up", dead=True)
    assert state == "dead"
    assert (await store.list_messages(MessageQuery(state="dead")))[0].last_error == "gave up"


async def test_delivery_reports_move_forward_only(store):
    await store.accept("a", "alertmanager", 1000.0, 60.0, [msg("m", recipients=("+886911960999",))])
    await store.claim(1000.0, 10, 30.0)
    await store.finish("m", [RecipientUpdate("+886911960999", "accepted", "f" * 32)], 1001.0,
                       retry_at=None, last_error=None)
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
    for key, mid, api_id, at in (("k1", old, "a" * 32, 1000.0), ("k2", new, "b" * 32, 1000.0 + 4 * day)):
        await store.accept(key, "alertmanager", at, 60.0, [msg(mid, recipients=("+886911960999",))])
        await store.claim(at, 10, 30.0)
        await store.finish(mid, [RecipientUpdate("+886911960999", "accepted", api_id)], at,
                           retry_at=None, last_error=None)
    now = 1000.0 + 4 * day + 10
    assert not await store.delivery_report("a" * 32, "4", "delivered", now)  # 4 days old, no client id
    assert not await store.delivery_report("a" * 32, "4", "delivered", now, new)  # not that message's
    assert await store.delivery_report("a" * 32, "4", "delivered", now, old)
    assert await store.delivery_report("b" * 32, "4", "delivered", now)
    states = {m.id: m.recipients[0].state for m in await store.list_messages(MessageQuery())}
    assert states == {old: "delivered", new: "delivered"}
    assert REPORT_WINDOW < 4 * day


async def test_list_filters_and_prune(store):
    for i in range(5):
        await store.accept(f"k{i}", "alertmanager", 1000.0 + i, 60.0, [msg(f"m{i}")])
    assert len(await store.list_messages(MessageQuery(since=1003.0))) == 2
    assert len(await store.list_messages(MessageQuery(group="nope"))) == 0
    assert len(await store.list_messages(MessageQuery(limit=3))) == 3
    await store.claim(2000.0, 1, 30.0)
    first = (await store.list_messages(MessageQuery(state="sending")))[0].id
    await store.finish(first, [RecipientUpdate(n, "accepted", "x") for n in ("+886911960999", "+886911960998")],
                       2000.0, retry_at=None, last_error=None)
    assert await store.prune(5000.0) > 0
    remaining = {m.id for m in await store.list_messages(MessageQuery())}
    assert first not in remaining and len(remaining) == 4  # pending ones are never pruned


async def test_unwritable_store_raises_store_error(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    s = SQLiteStore(str(tmp_path / "file" / "outbox.db"))  # parent is a file
    with pytest.raises(StoreError):
        await s.open()


async def test_prune_is_chunked_and_keeps_recent_and_unfinished(store):
    for i in range(25):
        await store.accept(f"k{i}", "alertmanager", 1000.0, 60.0, [msg(f"old{i}")])
        await store.claim(1000.0, 1, 30.0)
        await store.finish(f"old{i}", [RecipientUpdate(n, "failed", None, "105", "x")
                                       for n in ("+886911960999", "+886911960998")],
                           1000.0, retry_at=None, last_error=None)
    await store.accept("new", "alertmanager", 9000.0, 60.0, [msg("new")])
    await store.accept("stuck", "alertmanager", 1000.0, 60.0, [msg("stuck")])
    # 10 messages (with their 20 recipients) per call at most, plus the keys that are due
    first = await store.prune(5000.0, keys_before=500.0, limit=10)
    assert first == 30
    while await store.prune(5000.0, keys_before=500.0, limit=10) == 10 * 3:
        pass
    left = {m.id for m in await store.list_messages(MessageQuery())}
    assert left == {"new", "stuck"}  # recent, and never-finished, messages stay


async def test_an_outbox_from_before_paging_is_upgraded_in_place(tmp_path: Path):
    older = (
        "CREATE TABLE messages (id TEXT PRIMARY KEY, created_at REAL NOT NULL, source TEXT NOT NULL,"
        " group_id TEXT NOT NULL, level TEXT NOT NULL, priority INTEGER NOT NULL, status TEXT NOT NULL,"
        " text TEXT NOT NULL, encoding TEXT NOT NULL, parts INTEGER NOT NULL, alert_count INTEGER NOT NULL,"
        " template_error TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " next_attempt_at REAL NOT NULL, lease_until REAL, last_error TEXT, updated_at REAL NOT NULL,"
        " accepted_at REAL);"
        "CREATE TABLE recipients (message_id TEXT NOT NULL, number TEXT NOT NULL, state TEXT NOT NULL,"
        " api_message_id TEXT, error_code TEXT, error TEXT, delivery_status TEXT,"
        " updated_at REAL NOT NULL, PRIMARY KEY (message_id, number)) WITHOUT ROWID;"
        "INSERT INTO messages VALUES ('m0', 1.0, 'alertmanager', 'db', 'warning', 1, 'firing', 'hi',"
        " 'GSM-7', 1, 1, NULL, 'pending', 0, 1.0, NULL, NULL, 1.0, NULL);"
        "INSERT INTO recipients VALUES ('m0', '+886911960999', 'pending', NULL, NULL, NULL, NULL, 1.0);"
    )
    async with opened(tmp_path / "old.db", older) as s:
        claimed = await s.claim(2.0, 10, 30.0)
        assert [m.id for m in claimed] == ["m0"] and claimed[0].pending_numbers == ("+886911960999",)


async def test_webhooks_go_to_the_journal_and_are_planned_from_it_once(store, tmp_path: Path):
    s = store
    assert await s.receive("k", "alertmanager", 1000.0, 60.0, b"{}", "[]")
    assert not await s.receive("k", "alertmanager", 1001.0, 60.0, b"{}", "[]")  # a replay
    assert (tmp_path / "outbox.journal.00000001").exists() and await s.inbox(10) == []
    assert (await s.stats()).inbox == 1  # answered, not planned
    batch = await s.unplanned(10)
    (row,) = batch.rows
    assert (row.source, row.key, row.window, row.received_at) == ("alertmanager", "k", 60.0, 1000.0)
    # planned twice (a crash before the position was kept is the same): stored once
    assert await s.planned_unplanned(batch, [(row.id, [msg("m1")], row.received_at)]) == set()
    assert await s.planned_unplanned(batch, [(row.id, [msg("m1")], row.received_at)]) == {row.id}
    assert [m.id for m in await s.claim(1002.0, 10, 30.0)] == ["m1"]
    assert (await s.unplanned(10)).rows == [] and (await s.stats()).inbox == 0


async def test_the_journal_survives_a_restart_and_a_torn_tail(tmp_path: Path):
    path = tmp_path / "outbox.db"
    async with opened(path) as s:
        assert await s.receive("a" * 64, "alertmanager", 1000.0, 60.0, b'{"n":1}', "[]")
    segment = tmp_path / "outbox.journal.00000001"
    whole = segment.stat().st_size
    with open(segment, "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # a crash in the middle of a write: never answered
    async with opened(path) as s:
        assert not await s.receive("a" * 64, "alertmanager", 1010.0, 60.0, b'{"n":1}', "[]")  # remembered
        assert segment.stat().st_size == whole  # cut off when the journal was opened for writing
        assert await s.receive("b" * 64, "alertmanager", 1011.0, 60.0, b'{"n":2}', "[]")
        assert [r.body for r in (await s.unplanned(10)).rows] == [b'{"n":1}', b'{"n":2}']


async def test_segments_rotate_and_planned_ones_are_deleted(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 300)
    async with opened(tmp_path / "outbox.db") as s:
        for i in range(6):
            assert await s.receive(key(i), "grafana", 1000.0 + i, 60.0, b"x" * 200, "[]")
        assert len(journal.segments(str(tmp_path / "outbox.journal"))) >= 3
        seen = []
        while (batch := await s.unplanned(2)).rows or batch.after is not None:
            seen += [r.body for r in batch.rows]
            await s.planned_unplanned(batch, [(r.id, [], r.received_at) for r in batch.rows])
        assert len(seen) == 6
        assert journal.segments(str(tmp_path / "outbox.journal")) == [journal.segments(str(tmp_path / "outbox.journal"))[-1]]


async def test_a_backlog_in_the_journal_is_counted_and_searched_a_chunk_at_a_time(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 1000)
    read = journal.read
    monkeypatch.setattr(journal, "read", lambda base, number, offset, max_bytes=0, max_records=None:
                        read(base, number, offset, 400, max_records))  # a few records per read
    times = journal.webhook_times
    monkeypatch.setattr(journal, "webhook_times", lambda base, number, offset, max_bytes=0:
                        times(base, number, offset, 400))
    async with opened(tmp_path / "outbox.db") as s:
        for i in range(20):
            plan = f'[{{"id": "m{i:04d}"}}]'
            assert await s.receive(key(i), "alertmanager", 1000.0 + i, 60.0, b"x" * 100, plan)
        await s._journal.append(journal.PROBE)  # a readiness probe is no webhook
        assert len(journal.segments(str(tmp_path / "outbox.journal"))) >= 3
        stats = await s.stats()
        assert (stats.inbox, stats.oldest_pending_created_at) == (20, 1000.0)
        found = await s.received("m0017")
        assert found is not None and (found.received_at, found.source) == (1017.0, "alertmanager")
        assert await s.received("m9999") is None


async def test_a_replay_the_web_process_forgot_is_dropped_when_planned(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "KEYS_IN_MEMORY", 4)  # the web process remembers few keys
    async with opened(tmp_path / "outbox.db") as s:
        for i in range(8):
            assert await s.receive(key(i), "alertmanager", 1000.0 + i, 600.0, b"{}", "[]")
        batch = await s.unplanned(100)
        assert await s.planned_unplanned(batch, [(r.id, [msg(f"m{r.id}")], r.received_at) for r in batch.rows]) == set()
        assert await s.receive(key(0), "alertmanager", 1100.0, 600.0, b"{}", "[]")  # forgotten here
        batch = await s.unplanned(100)
        assert await s.planned_unplanned(batch, [(0, [msg("again")], 1100.0)]) == {0}  # known there
        assert await s.get_message("again") is None


async def test_a_failed_journal_write_answers_an_error_and_its_twin_too(store, tmp_path: Path):
    s = store
    assert await s.receive("warm", "alertmanager", 999.0, 60.0, b"{}", "[]")
    real_write = os.write
    monkeypatch_fail = {"on": True}

    def failing_write(fd, data):
        if monkeypatch_fail["on"]:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    os.write = failing_write
    try:
        first = asyncio.ensure_future(s.receive("k", "alertmanager", 1000.0, 60.0, b"{}", "[]"))
        twin = asyncio.ensure_future(s.receive("k", "alertmanager", 1000.5, 60.0, b"{}", "[]"))
        results = await asyncio.gather(first, twin, return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results)  # the twin is no "duplicate" of nothing
        with pytest.raises(StoreError):
            await s.ping()
    finally:
        os.write = real_write
    await s.ping()  # a probe write clears it
    assert await s.receive("k", "alertmanager", 1001.0, 60.0, b"{}", "[]")  # not remembered: stored now
    assert [r.key for r in (await s.unplanned(10)).rows] == ["warm", "k"]


async def test_an_inbox_kept_in_the_outbox_file_moves_to_its_own(tmp_path: Path):
    path = tmp_path / "outbox.db"
    older = (
        "CREATE TABLE inbox (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, source TEXT NOT NULL,"
        " body BLOB NOT NULL, plan TEXT NOT NULL, error TEXT);"
        "INSERT INTO inbox VALUES (7, 1.0, 'alertmanager', x'7b7d', '[]', NULL);"
        "INSERT INTO inbox VALUES (8, 2.0, 'grafana', x'7b7d', '[]', 'broken');"
    )
    async with opened(path, older) as s:
        assert [(r.source, r.received_at) for r in await s.inbox(10)] == [("alertmanager", 1.0)]
        assert (await s.stats()).inbox_failed == 1
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_schema WHERE name='inbox'").fetchone() == (0,)
