"""The receiver as a real HTTP server on 127.0.0.1, sending to the fake Clickatell."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from pathlib import Path

import pytest
import yaml

from tests.conftest import API_KEY, eventually, planned
from tests.helpers import BASE, fixture

JSON = {"Content-Type": "application/json"}


async def post(http, url, body: bytes, headers=None):
    async with http.post(url, data=body, headers={**JSON, **(headers or {})}) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text and r.content_type == "application/json" else text), r.headers


async def test_firing_fixture_reaches_clickatell(start_receiver, fake, http):
    rx = await start_receiver()
    status, body, _ = await post(http, f"{rx.url}/webhook/alertmanager", fixture("alertmanager-0.25-firing.json"))
    assert status == 200 and body["status"] == "accepted" and len(body["notification"]) == 27
    (mid,) = await planned(http, rx.url, body)

    async def sent():
        return len(await fake.messages(http)) == 1

    await eventually(sent)
    (sms,) = await fake.messages(http)
    assert sms["to"] == "14155550123"  # group "web" (job=node, critical), MSISDN without "+"
    assert sms["content"] == "[CRITICAL] FIRING 1: HighLatency web-1:9100 p99 latency above 2s"
    assert sms["clientMessageId"] == mid and mid.startswith(body["notification"])


async def test_grouped_alerts_become_one_text_per_group_and_replays_send_nothing(start_receiver, fake, http):
    rx = await start_receiver()
    payload = fixture("alertmanager-0.25-grouped-firing.json")
    status, body, _ = await post(http, f"{rx.url}/webhook/alertmanager", payload)
    assert status == 200 and len(await planned(http, rx.url, body)) == 1
    # the same notification again (Alertmanager retry, HA peer): 200, nothing new
    for _ in range(3):
        status, again, _ = await post(http, f"{rx.url}/webhook/alertmanager", payload)
        assert (status, again["status"]) == (200, "duplicate")

    async def sent():
        return len(await fake.messages(http)) == 2

    await eventually(sent)
    msgs = await fake.messages(http)
    assert sorted(m["to"] for m in msgs) == ["886911960998", "886911960999"]
    assert len({m["content"] for m in msgs}) == 1
    assert "DiskFull db-1:9100" in msgs[0]["content"] and "DiskFull db-2:9100" in msgs[0]["content"]
    async with http.get(f"{rx.url}/metrics") as r:
        metrics = await r.text()
    assert 'sms_receiver_sms_deduplicated_total{group="db"} 3.0' in metrics
    assert 'sms_receiver_webhooks_received_total{outcome="duplicate",source="alertmanager"} 3.0' in metrics

    # resolved: a new notification
    status, body, _ = await post(http, f"{rx.url}/webhook/alertmanager", fixture("alertmanager-0.25-resolved.json"))
    assert body["status"] == "accepted"

    async def resolved_sent():
        return len(await fake.messages(http)) == 4

    await eventually(resolved_sent)
    assert (await fake.messages(http))[-1]["content"].startswith("[WARNING] RESOLVED 2:")


async def test_grafana_fixture(start_receiver, fake, http):
    rx = await start_receiver()
    status, body, _ = await post(http, f"{rx.url}/webhook/grafana", fixture("grafana-webhook-firing.json"))
    assert status == 200 and body["status"] == "accepted"
    (mid,) = await planned(http, rx.url, body)

    async def sent():
        return len(await fake.messages(http)) == 1

    await eventually(sent)  # no severity → default level warning → default group "info"
    async with http.get(f"{rx.url}/api/v1/messages/{mid}") as r:
        msg = await r.json()
    assert msg["group"] == "info" and msg["source"] == "grafana"


async def test_truncated_alerts_reach_the_text(start_receiver, fake, http):
    rx = await start_receiver()
    body = json.loads(fixture("alertmanager-0.25-firing.json"))
    body["truncatedAlerts"] = 7
    status, answer, _ = await post(http, f"{rx.url}/webhook/alertmanager", json.dumps(body).encode())
    (mid,) = await planned(http, rx.url, answer)
    async with http.get(f"{rx.url}/api/v1/messages/{mid}") as r:
        assert "(+7 not shown)" in (await r.json())["text"]


async def test_bad_inputs(start_receiver, http):
    rx = await start_receiver(max_body_bytes=2048)
    url = f"{rx.url}/webhook/alertmanager"
    status, body, _ = await post(http, url, b"{nope")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body, _ = await post(http, url, b'{"alerts":[{"status":"firing","labels":{"a":1}}]}')
    assert status == 422 and "alerts.0.labels.a" in body["error"]
    status, body, _ = await post(http, url, b'{"alerts": []}')
    assert status == 422
    status, body, _ = await post(http, url, b"x" * 5000)
    assert status == 413 and "max_body_bytes" in body["error"]
    # a few hundred bytes of gzip that inflate past max_body_bytes: refused unread
    import gzip
    bomb = gzip.compress(b'{"alerts": [' + b" " * 300_000 + b"]}")
    assert len(bomb) < 2048
    status, body, _ = await post(http, url, bomb, {"Content-Encoding": "gzip"})
    assert status == 415 and "uncompressed" in body["error"]
    legacy = json.dumps({"title": "t", "ruleId": 1, "ruleName": "r", "state": "alerting", "evalMatches": []})
    status, body, _ = await post(http, f"{rx.url}/webhook/grafana", legacy.encode())
    assert status == 422 and "legacy Grafana" in body["error"]
    async with http.get(url) as r:
        assert r.status == 405


async def test_webhook_auth_tokens_basic_and_hmac(start_receiver, http):
    rx = await start_receiver(webhook_auth={
        "bearer_tokens": ["old-token", "new-token"],
        "basic_auth": {"username": "alertmanager", "password": "pw"},
        "grafana_hmac_secret": "hmac-secret",
    })
    url = f"{rx.url}/webhook/alertmanager"
    payload = fixture("alertmanager-0.25-firing.json")
    status, body, headers = await post(http, url, payload)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert (await post(http, url, payload, {"Authorization": "Bearer wrong"}))[0] == 401
    assert (await post(http, url, payload, {"Authorization": "Bearer new-token"}))[0] == 200
    assert (await post(http, url, payload, {"Authorization": "Bearer old-token"}))[0] == 200  # rotation
    basic = base64.b64encode(b"alertmanager:pw").decode()
    assert (await post(http, url, payload, {"Authorization": f"Basic {basic}"}))[0] == 200
    wrong = base64.b64encode(b"alertmanager:nope").decode()
    assert (await post(http, url, payload, {"Authorization": f"Basic {wrong}"}))[0] == 401

    g = fixture("grafana-webhook-firing.json")
    gurl = f"{rx.url}/webhook/grafana"
    auth = {"Authorization": "Bearer new-token"}
    assert (await post(http, gurl, g, auth))[0] == 401  # HMAC required
    sig = hmac.new(b"hmac-secret", g, hashlib.sha256).hexdigest()
    assert (await post(http, gurl, g, {**auth, "X-Grafana-Alerting-Signature": "0" * 64}))[0] == 401
    assert (await post(http, gurl, g, {**auth, "X-Grafana-Alerting-Signature": sig}))[0] == 200


async def test_store_failure_answers_503(start_receiver, http):
    rx = await start_receiver()
    await rx.receiver.store.close()
    status, body, _ = await post(http, f"{rx.url}/webhook/alertmanager", fixture("alertmanager-0.25-firing.json"))
    assert status == 503 and "retry" in body["error"]
    async with http.get(f"{rx.url}/-/ready") as r:
        assert r.status == 503 and "store" in await r.text()


async def test_send_api(start_receiver, fake, http):
    rx = await start_receiver(
        admin_auth={"bearer_tokens": ["admin"]},
        send_templates={"hello": {"syntax": "jinja2", "text": "Hello {{ name }}, {{ variables.what }} at {{ group.id }}"}},
        groups=[*BASE["groups"][:2], {**BASE["groups"][2], "send_template": "hello"}],
    )
    items = [
        {"groupId": "info", "useTemplate": True, "variables": {"name": "Steven", "what": "disk"}},
        {"groupId": "db", "message": "plain text"},
        {"groupId": "ghost", "message": "x"},
        {"message": "no group"},
    ]
    admin = {"Authorization": "Bearer admin"}
    assert (await post(http, f"{rx.url}/send", json.dumps(items).encode()))[0] == 401
    status, body, _ = await post(http, f"{rx.url}/send", json.dumps(items).encode(), admin)
    assert status == 207
    results = body["results"]
    assert [r["status"] for r in results] == ["accepted", "accepted", "rejected", "rejected"]
    assert "unknown groupId 'ghost'" in results[2]["error"]
    assert "groupId" in results[3]["error"]

    async def sent():
        return len(await fake.messages(http)) == 3

    await eventually(sent)
    contents = {m["content"] for m in await fake.messages(http)}
    assert contents == {"Hello Steven, disk at info", "plain text"}

    status, body, _ = await post(http, f"{rx.url}/send", json.dumps(items[:2]).encode(), admin)
    assert status == 202 and body["status"] == "accepted"
    status, body, _ = await post(http, f"{rx.url}/send", json.dumps(items[2:]).encode(), admin)
    assert status == 422


async def test_admin_api_shows_messages_without_secrets(start_receiver, fake, http):
    rx = await start_receiver(admin_auth={"bearer_tokens": ["admin"]})
    admin = {"Authorization": "Bearer admin"}
    _, body, _ = await post(http, f"{rx.url}/webhook/alertmanager", fixture("alertmanager-0.25-grouped-firing.json"))
    (mid,) = await planned(http, rx.url, body, admin)

    async def sent():
        async with http.get(f"{rx.url}/api/v1/messages/{mid}", headers=admin) as r:
            return (await r.json())["state"] == "sent"

    await eventually(sent)
    async with http.get(f"{rx.url}/api/v1/messages/{mid}", headers=admin) as r:
        msg = await r.json()
    assert msg["group"] == "db" and msg["attempts"] == 1 and msg["parts"] == 1
    assert {rc["number"] for rc in msg["recipients"]} == {"+886911960999", "+886911960998"}
    assert all(len(rc["clickatellMessageId"]) == 32 for rc in msg["recipients"])
    async with http.get(f"{rx.url}/api/v1/messages?group=db&status=sent&since=1h", headers=admin) as r:
        assert [m["id"] for m in (await r.json())["messages"]] == [mid]
    async with http.get(f"{rx.url}/api/v1/messages?status=bogus", headers=admin) as r:
        assert r.status == 400
    async with http.get(f"{rx.url}/api/v1/messages/nope", headers=admin) as r:
        assert r.status == 404
    async with http.get(f"{rx.url}/api/v1/messages") as r:
        assert r.status == 401
    for path in ("/api/v1/groups", "/api/v1/status", "/metrics", f"/api/v1/messages/{mid}"):
        async with http.get(f"{rx.url}{path}", headers=admin) as r:
            assert r.status == 200
            text = await r.text()
            assert API_KEY not in text


async def test_delivery_report_callback(start_receiver, fake, http):
    rx = await start_receiver(callbacks={"secret": "cb-secret"})
    _, body, _ = await post(http, f"{rx.url}/webhook/alertmanager", fixture("alertmanager-0.25-firing.json"))
    (mid,) = await planned(http, rx.url, body)

    async def sent():  # at the fake, and its result recorded (reports find it by its api id)
        async with http.get(f"{rx.url}/api/v1/messages/{mid}") as r:
            return (await r.json())["state"] == "sent"

    await eventually(sent)
    api_id = (await fake.messages(http))[0]["apiMessageId"]
    cb = f"{rx.url}/callbacks/clickatell/status"
    async with http.get(cb, params={"messageId": api_id, "statusCode": "4"}) as r:
        assert r.status == 401
    async with http.post(f"{cb}?secret=cb-secret", json={"messageId": api_id, "clientMessageId": mid,
                                                          "statusCode": 4, "status": "RECEIVED_BY_RECIPIENT"}) as r:
        assert r.status == 200
    async with http.get(cb, params={"secret": "cb-secret", "messageId": api_id, "statusCode": "3"}) as r:
        assert r.status == 200  # late, out of order: ignored
    async with http.get(f"{rx.url}/api/v1/messages/{mid}") as r:
        rc = (await r.json())["recipients"][0]
    assert (rc["state"], rc["deliveryStatus"]) == ("delivered", "4 RECEIVED_BY_RECIPIENT")
    async with http.get(f"{rx.url}/metrics") as r:
        assert 'sms_receiver_delivery_reports_total{status="delivered"} 1.0' in await r.text()


async def test_dry_run_records_and_sends_nothing(start_receiver, fake, http, caplog):
    caplog.set_level(logging.WARNING)
    rx = await start_receiver(clickatell={"api_key": ""})
    assert rx.receiver.config.dry_run
    _, body, _ = await post(http, f"{rx.url}/webhook/alertmanager", fixture("alertmanager-0.25-firing.json"))
    (mid,) = await planned(http, rx.url, body)

    async def recorded():
        async with http.get(f"{rx.url}/api/v1/messages/{mid}") as r:
            return (await r.json())["state"] == "dry_run"

    await eventually(recorded)
    assert await fake.messages(http) == []
    assert any("DRY-RUN" in rec.getMessage() for rec in caplog.records)


async def test_health_ready_metrics(start_receiver, http):
    rx = await start_receiver()
    async with http.get(f"{rx.url}/-/healthy") as r:
        assert r.status == 200
    async def ready():
        async with http.get(f"{rx.url}/-/ready") as r:
            return r.status == 200
    await eventually(ready)
    async with http.get(f"{rx.url}/metrics") as r:
        text = await r.text()
    for series in ('sms_receiver_sms_sent_total{group="db"} 0.0',
                   "sms_receiver_config_last_reload_successful 1.0",
                   "sms_receiver_outbox_pending_messages 0.0",
                   'sms_receiver_build_info{python='):
        assert series in text


async def test_reload_keeps_old_config_on_error(start_receiver, http, tmp_path: Path):
    rx = await start_receiver()
    path = tmp_path / "config.yaml"
    rx.receiver.config_path = path
    path.write_text("groups: [{id: a, members: ['+1']}]\n")
    async with http.post(f"{rx.url}/-/reload") as r:
        assert r.status == 400
        errors = (await r.json())["errors"]
    assert any(e.startswith("groups.0.members.0:") for e in errors)
    assert rx.receiver.config.group("db") is not None  # still the old config
    async with http.get(f"{rx.url}/metrics") as r:
        assert "sms_receiver_config_last_reload_successful 0.0" in await r.text()

    new = {**BASE, "groups": [*BASE["groups"], {"id": "new", "members": ["+886911960999"]}],
           "storage": rx.receiver.config.storage.url}
    path.write_text(yaml.safe_dump(new))
    async with http.post(f"{rx.url}/-/reload") as r:
        assert r.status == 200
    assert rx.receiver.config.group("new") is not None
    async with http.get(f"{rx.url}/metrics") as r:
        text = await r.text()
    assert "sms_receiver_config_last_reload_successful 1.0" in text
    assert 'sms_receiver_sms_sent_total{group="new"} 0.0' in text


async def test_the_planner_yields_to_answers_but_never_stops(start_receiver, fake, http):
    """A storm that never ends (webhooks being answered all the time) still gets its pages
    planned and sent: the planner takes a share of the loop, not what is left of it."""
    rx = await start_receiver(settle=False)
    rx.receiver.answering += 1  # as if a webhook were always being answered
    try:
        answers = []
        for i in range(20):
            body = json.loads(fixture("alertmanager-0.25-firing.json"))
            body["groupKey"] = f"storm-{i}"
            status, answer, _ = await post(http, f"{rx.url}/webhook/alertmanager", json.dumps(body).encode())
            assert status == 200
            answers.append(answer)
        for answer in answers:
            await planned(http, rx.url, answer)

        async def sent() -> bool:
            return len(await fake.messages(http)) == 20

        await eventually(sent)
    finally:
        rx.receiver.answering -= 1


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_reload_checks_the_lease_against_the_storage_it_runs_on(start_receiver, http, tmp_path: Path):
    """A file naming other storage (taken at the next restart) must not let a lease too short
    for the running replicas through: they would never start a send."""
    rx = await start_receiver()
    path = tmp_path / "config.yaml"
    rx.receiver.config_path = path
    path.write_text(yaml.safe_dump({**BASE, "storage": f"sqlite://{tmp_path}/other.db",
                                    "dispatch": {"lease": "1s"}, "clickatell": {"timeout": "10s"}}))
    async with http.post(f"{rx.url}/-/reload") as r:
        assert r.status == 400
        (error,) = (await r.json())["errors"]
    assert error.startswith("dispatch.lease: 1s is not longer")
    assert rx.receiver.config.dispatch.lease != 1.0
