"""What keeps the receiver honest when something inside it goes wrong: a reload in the middle of
a send, a stage that stops on a bug, a pass that fails on bad data, a commit that hangs, a fault
seen by a read."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import yaml

from receiver.store import Received, StoreError
from receiver.store import sqlite as sqlite_store
from tests.conftest import eventually, planned
from tests.helpers import BASE, fixture

JSON = {"Content-Type": "application/json"}
MEMBERS = ["+886911960999", "+886911960998", "+14155550123"]


async def post(http, rx, body: bytes = fixture("alertmanager-0.25-grouped-firing.json")) -> str:
    async with http.post(f"{rx.url}/webhook/alertmanager", data=body, headers=JSON) as r:
        assert r.status == 200, await r.text()
        return (await planned(http, rx.url, await r.json()))[0]


async def state(http, rx, mid: str) -> str:
    async with http.get(f"{rx.url}/api/v1/messages/{mid}") as r:
        return (await r.json())["state"]


async def test_a_reload_in_the_middle_of_a_send_sends_nothing_twice(start_receiver, fake, http, tmp_path):
    """A reload that changes `clickatell` replaces the client while a message is being sent one
    request at a time; the old client stays open until that message is done."""
    groups = [{"id": "db", "level": "info", "members": MEMBERS}]
    rx = await start_receiver(groups=groups, routes=[], default_groups=["db"],
                              dispatch={"batch_size": 1, "lease": "30s"},
                              clickatell={"timeout": "1s"})
    await fake.mode(http, answer_delay=0.8)  # three requests: longer than the old timeout + 1 s
    mid = await post(http, rx)

    async def first_accepted() -> bool:
        return len(fake.state.messages) >= 1

    await eventually(first_accepted)
    config = tmp_path / "reload.yaml"
    cfg = rx.receiver.config
    config.write_text(yaml.safe_dump({
        **BASE, "groups": groups, "routes": [], "default_groups": ["db"],
        "storage": cfg.storage.url, "dispatch": {"batch_size": 1, "lease": "30s"},
        "clickatell": {"api_key": "another-key", "base_url": fake.url, "timeout": "1s"}}))
    rx.receiver.config_path = config
    assert await rx.receiver.reload() == []

    async def sent() -> bool:
        return await state(http, rx, mid) == "sent"

    await eventually(sent, timeout=10)
    assert sorted(m["to"] for m in fake.state.messages) == sorted(n.lstrip("+") for n in MEMBERS)


async def test_a_stage_that_stops_on_a_bug_stops_the_receiver(start_receiver, http):
    """Crash-only: a background stage that ends (not cancelled) makes the receiver fatal, so the
    CLI exits 1 and /-/healthy answers 503 until it does."""
    rx = await start_receiver()
    told: list[str] = []
    rx.receiver.on_fatal = told.append

    async def stage() -> None:
        raise ValueError("a bug")

    rx.receiver._spawn(stage(), "test stage")

    async def failed() -> bool:
        return bool(told)

    await eventually(failed)
    assert told == ["the test stage stopped: ValueError('a bug')"]
    async with http.get(f"{rx.url}/-/healthy") as r:
        assert r.status == 503 and "test stage stopped" in await r.text()


async def test_a_pass_that_fails_on_bad_data_does_not_stop_sending(start_receiver, fake, http):
    """A held message whose stored alerts cannot be read makes releasing holds fail every pass:
    readiness says so, and other pages still go out."""
    rx = await start_receiver(levels=[{"name": "critical", "severities": ["critical"]},
                                      {"name": "warning", "severities": ["warning"], "delivery": {"digest": "1s"}},
                                      {"name": "info", "severities": ["info"]}])
    held = await post(http, rx)  # a warning: held for its digest
    with sqlite3.connect(rx.receiver.store.path) as conn:  # damaged by hand: not JSON
        conn.execute("UPDATE messages SET items='{not json' WHERE id=?", (held,))

    async def not_ready() -> bool:
        async with http.get(f"{rx.url}/-/ready") as r:
            return r.status == 503 and "dispatcher: JSONDecodeError" in await r.text()

    await eventually(not_ready)
    critical = await post(http, rx, fixture("alertmanager-0.25-firing.json"))  # to group web

    async def sent() -> bool:
        return await state(http, rx, critical) == "sent"

    await eventually(sent)
    assert rx.receiver.fatal is None


async def test_a_commit_stuck_for_long_fails_liveness(start_receiver, http, monkeypatch):
    monkeypatch.setattr(sqlite_store, "STALL_LIMIT", 0.2)
    rx = await start_receiver()
    release = threading.Event()
    stuck = asyncio.ensure_future(rx.receiver.store._w.write(lambda conn: release.wait(10)))
    try:
        async def unhealthy() -> bool:
            async with http.get(f"{rx.url}/-/healthy") as r:
                return r.status == 503 and "running for" in await r.text()

        await eventually(unhealthy)
    finally:
        release.set()
        await stuck

    async def healthy() -> bool:
        async with http.get(f"{rx.url}/-/healthy") as r:
            return r.status == 200

    await eventually(healthy)


async def test_a_fault_seen_by_a_read_stops_every_write(start_receiver, http):
    """What SQLite reports on a read (a damaged page) ends the store: no webhook is answered 2xx
    afterwards, whatever the writer has seen."""
    rx = await start_receiver()
    store = rx.receiver.store
    store._on_broken("database disk image is malformed")  # as a read would report it
    async with http.post(f"{rx.url}/webhook/alertmanager", data=fixture("alertmanager-0.25-firing.json"),
                         headers=JSON) as r:
        assert r.status == 503
    try:
        await store.receive(Received("n", 1.0, "alertmanager", b"{}"), "k", 60.0)
        raise AssertionError("a broken store took a write")
    except StoreError as exc:
        assert "broken" in str(exc)
    async with http.get(f"{rx.url}/-/healthy") as r:
        assert r.status == 503 and "malformed" in await r.text()

