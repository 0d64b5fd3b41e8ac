"""Receive, then plan: a webhook is answered once its body is durable in the inbox; the planner
turns it into messages afterwards, exactly once. And the worker process that does it in
`sms-receiver run`."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from prometheus_client import generate_latest

from receiver.ingest import parse_webhook
from receiver.metrics import Metrics, merge_expositions
from receiver.pipeline import Snapshot, inbox_plan, new_message_id, plan_received
from tests.conftest import Fake, eventually, planned
from tests.helpers import fixture, make_config
from tests.tools import ReceiverProcess, free_port, receiver_config

FIRING = fixture("alertmanager-0.25-firing.json")


def metric_line(text: str, prefix: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(prefix))


async def test_answered_before_planning_then_planned_once(start_receiver, http, fake: Fake):
    s = await start_receiver(settle=False, run_planner=False, run_dispatcher=False)
    async with http.post(f"{s.url}/webhook/alertmanager", data=FIRING) as r:
        assert r.status == 200
        accepted = await r.json()
    nid = accepted["notification"]
    async with http.get(f"{s.url}/api/v1/messages/{nid}") as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["state"] == "received" and answer["source"] == "alertmanager"
    async with http.get(f"{s.url}/metrics") as r:
        text = await r.text()
    assert metric_line(text, "sms_receiver_inbox_notifications ") == "sms_receiver_inbox_notifications 1.0"
    assert 'sms_receiver_notifications_routed_total{group="web",level="critical"} 0.0' in text

    await s.receiver.planner.drain()
    await s.receiver.planner.drain()  # nothing left: planning twice adds nothing
    (mid,) = await planned(http, s.url, accepted)
    async with http.get(f"{s.url}/api/v1/messages/{mid}") as r:
        msg = await r.json()
    assert msg["state"] == "pending" and len(msg["recipients"]) == 1
    assert len((await (await http.get(f"{s.url}/api/v1/messages")).json())["messages"]) == 1
    async with http.get(f"{s.url}/metrics") as r:
        text = await r.text()
    assert metric_line(text, "sms_receiver_inbox_notifications ") == "sms_receiver_inbox_notifications 0.0"


async def test_a_row_that_cannot_be_planned_is_kept_and_does_not_block(start_receiver, http):
    s = await start_receiver(settle=False, run_planner=False, run_dispatcher=False)
    store, now = s.receiver.store, s.receiver.clock.now()
    # a routing that points at an alert the body does not have: only a bug could store this
    assert await store.receive("bad", "alertmanager", now, 3600, FIRING, '[["0badc0de","web","critical","firing",[7]]]')
    async with http.post(f"{s.url}/webhook/alertmanager", data=FIRING) as r:
        accepted = await r.json()
    await s.receiver.planner.drain()
    (good,) = await planned(http, s.url, accepted)
    async with http.get(f"{s.url}/api/v1/messages/{good}") as r:
        assert (await r.json())["state"] == "pending"
    async with http.get(f"{s.url}/api/v1/messages/0badc0de") as r:
        kept = await r.json()
    assert kept["state"] == "received" and "IndexError" in kept["planningError"]
    async with http.get(f"{s.url}/metrics") as r:
        text = await r.text()
    assert "sms_receiver_planning_failures_total 1.0" in text
    assert (await store.stats()).inbox_failed == 1


def test_planning_again_gives_the_same_messages():
    """A crash between the planner's two commits plans a notification again: the message ids
    come from its notification id and group, so the outbox keeps the first copy only."""
    snap = Snapshot.build(make_config())
    body = json.loads(FIRING)
    body["alerts"][0]["labels"]["team"] = "db"  # routes to db (continue: false) …
    body["alerts"].append({**body["alerts"][0], "labels": {"alertname": "Other", "job": "node",
                                                            "severity": "critical"}})  # … and web
    n = parse_webhook(json.dumps(body).encode(), "alertmanager")
    nid = new_message_id(1000.0)
    first, _ = plan_received(n, inbox_plan(nid), snap, 1000.0)
    again, _ = plan_received(n, inbox_plan(nid), snap, 1000.0)
    ids = [m.id for m in first.messages]
    assert ids == [m.id for m in again.messages] and len(set(ids)) == 2
    assert all(i.startswith(nid) for i in ids)
    other, _ = plan_received(n, inbox_plan(new_message_id(1000.0)), snap, 1000.0)
    assert not set(ids) & {m.id for m in other.messages}


async def test_rows_routed_on_receipt_by_an_older_release_keep_their_ids(start_receiver, http):
    s = await start_receiver(settle=False, run_planner=False, run_dispatcher=False)
    now = s.receiver.clock.now()
    assert await s.receiver.store.receive("old", "alertmanager", now, 3600, FIRING,
                                          '[["0123abcd","web","critical","firing",[0]]]')
    await s.receiver.planner.drain()
    async with http.get(f"{s.url}/api/v1/messages/0123abcd") as r:
        msg = await r.json()
    assert (msg["state"], msg["group"]) == ("pending", "web")


async def test_the_planner_counts_what_reached_no_group(start_receiver, http):
    s = await start_receiver(settle=False, run_planner=False, run_dispatcher=False, default_groups=[])
    body = json.loads(FIRING)
    body["alerts"][0]["labels"] = {"alertname": "Nobody", "severity": "critical"}
    async with http.post(f"{s.url}/webhook/alertmanager", json=body) as r:
        assert r.status == 200 and (await r.json())["status"] == "accepted"
    await s.receiver.planner.drain()
    async with http.get(f"{s.url}/metrics") as r:
        text = await r.text()
    assert 'sms_receiver_alerts_unrouted_total{reason="no_route",source="alertmanager"} 1.0' in text
    assert metric_line(text, "sms_receiver_inbox_notifications ") == "sms_receiver_inbox_notifications 0.0"


async def test_a_replay_the_web_process_forgot_is_dropped_by_the_planner_and_counted(
        start_receiver, http, monkeypatch):
    from receiver.store import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "KEYS_IN_MEMORY", 4)  # the web process remembers few keys
    s = await start_receiver(settle=False, run_planner=False, run_dispatcher=False)
    first = json.loads(FIRING)
    async with http.post(f"{s.url}/webhook/alertmanager", json=first) as r:
        accepted = await r.json()
    for i in range(8):  # enough others that the web process forgets the first
        other = json.loads(FIRING)
        other["groupKey"] = f"other-{i}"
        async with http.post(f"{s.url}/webhook/alertmanager", json=other) as r:
            assert (await r.json())["status"] == "accepted"
    await s.receiver.planner.drain()
    async with http.post(f"{s.url}/webhook/alertmanager", json=first) as r:
        assert (await r.json())["status"] == "accepted"  # forgotten here: the planner knows it
    await s.receiver.planner.drain()
    (mid,) = await planned(http, s.url, accepted)
    async with http.get(f"{s.url}/api/v1/messages?limit=100") as r:
        assert len((await r.json())["messages"]) == 9  # the replay added nothing
    async with http.get(f"{s.url}/metrics") as r:
        text = await r.text()
    assert 'sms_receiver_sms_deduplicated_total{group="web"} 1.0' in text


def test_merged_metrics_add_counters_and_keep_the_setters_gauges():
    web, worker = Metrics(), Metrics()
    web.webhooks.labels("alertmanager", "accepted").inc(3)
    worker.sms_sent.labels("db").inc(5)
    worker.delivery_latency.observe(0.2)
    web.outbox_pending.set(7)
    web.reload_ok.set(0)
    worker.reload_ok.set(1)  # not exported by the worker: the web process's reload state counts
    text = merge_expositions(generate_latest(web.registry), worker.worker_exposition()).decode()
    assert 'sms_receiver_webhooks_received_total{outcome="accepted",source="alertmanager"} 3.0' in text
    assert 'sms_receiver_sms_sent_total{group="db"} 5.0' in text
    assert "sms_receiver_delivery_latency_seconds_count 1.0" in text
    assert "sms_receiver_outbox_pending_messages 7.0" in text
    assert "sms_receiver_config_last_reload_successful 0.0" in text
    assert text.count("# TYPE sms_receiver_sms_sent_total counter") == 1
    doubled = merge_expositions(generate_latest(worker.registry), generate_latest(worker.registry)).decode()
    assert 'sms_receiver_sms_sent_total{group="db"} 10.0' in doubled


async def test_run_plans_and_sends_in_a_worker_that_is_restarted(tmp_path: Path, fake: Fake, http):
    config = receiver_config(tmp_path, fake.url, {"poll_interval": "100ms"})
    proc = ReceiverProcess(config, free_port(), tmp_path / "receiver.log")
    try:
        await proc.start(http)
        assert proc.proc is not None
        (worker,) = proc.workers()
        assert os.getpriority(os.PRIO_PROCESS, worker) > os.getpriority(os.PRIO_PROCESS, proc.proc.pid)

        async def post(name: str) -> None:
            body = json.loads(FIRING)
            body["alerts"][0]["labels"]["alertname"] = name
            body["groupKey"] = name
            async with http.post(f"{proc.url}/webhook/alertmanager", json=body) as r:
                assert r.status == 200, await r.text()

        async def sent(n: int) -> bool:
            return len(await fake.messages(http)) == n

        await post("First")
        await eventually(lambda: sent(1))
        async with http.get(f"{proc.url}/metrics") as r:
            text = await r.text()
        assert 'sms_receiver_sms_sent_total{group="web"} 1.0' in text  # counted by the worker
        assert 'sms_receiver_webhooks_received_total{outcome="accepted",source="alertmanager"} 1.0' in text
        async with http.get(f"{proc.url}/api/v1/status") as r:
            assert (await r.json())["dispatcher"]["process"] == "worker"

        os.kill(worker, signal.SIGKILL)  # the web process starts another one
        await post("Second")  # answered while no worker runs: it waits in the inbox

        async def restarted() -> bool:
            return len(proc.workers()) == 1 and proc.workers() != [worker]

        await eventually(restarted, timeout=10)
        await eventually(lambda: sent(2), timeout=10)
        assert "worker process" in proc.log.read_text() and "starting it again" in proc.log.read_text()
    finally:
        proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0
