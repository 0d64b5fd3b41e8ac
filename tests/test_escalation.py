"""Escalation (issue #22 section 2): the chain rules, and rounds through the real receiver with
an injected clock (the real-time version with a real Alertmanager: tests/test_e2e_twoway.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest


from receiver.clock import FakeClock
from receiver.escalation import escalation_text, next_round_at, targets
from receiver.store import PageRecord
from tests.conftest import Fake, eventually
from tests.helpers import make_config
from tests.test_twoway import DB, _metric, _page, _texts
from tests.tools import alert_body


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    """Both outboxes: pages, acks, escalations and the history queries are SQL of each."""
    return request.param


WEB = "+14155550123"
GROUPS = [
    {"id": "db", "level": "warning", "members": DB, "two_way": True,
     "escalate": {"after": "5m", "to": ["web"], "repeat": 1}},
    {"id": "web", "level": "critical", "members": [WEB]},
    {"id": "info", "level": "info", "members": ["+4915112345678"]},
]


def _chain() -> Any:
    return make_config(groups=[
        {"id": "a", "members": ["+886911960999"], "two_way": True,
         "escalate": {"after": "1m", "to": ["b", "gone"][:1], "repeat": 3}},
        {"id": "b", "members": ["+886911960998"], "escalate": {"after": "9m", "to": ["c", "d"]}},
        {"id": "c", "members": ["+14155550123"]},
        {"id": "d", "members": ["+4915112345678"], "escalate": {"after": "1m", "to": ["c"]}},
        {"id": "info", "members": ["+4915112345679"]},
    ], routes=[], default_groups=["info"])


def _record(group: str, rounds: int) -> PageRecord:
    return PageRecord(7, "m", group, "alertmanager", 0.0, None, 60.0, rounds, (("k", {"a": "b"}, False),))


def test_chain_goes_down_then_repeats_its_last_groups():
    cfg = _chain()
    assert [targets(cfg, "a", n) for n in (1, 2, 3)] == [("b",), ("c", "d"), ("c",)]
    assert targets(cfg, "c", 1) == ()  # no escalate: nothing
    assert next_round_at(cfg, _record("a", 0), 100.0) == 160.0  # the paged group's "after"
    assert next_round_at(cfg, _record("a", 2), 100.0) is None  # round 3 of 3 was the last


def test_escalation_text_keeps_the_ref_at_the_end():
    assert escalation_text("[WARNING] FIRING 1: X #42", 42, 1, 1) == "ESC1 [WARNING] FIRING 1: X #42"
    long = escalation_text("z" * 156 + " #42", 42, 2, 1)  # the whole page filled its one part
    assert len(long) <= 160 and long.startswith("ESC2 ") and long.endswith("... #42")


async def _receiver(start_receiver, fake: Fake, clock: FakeClock, **extra: Any):
    rx = await start_receiver(groups=GROUPS, receiver_kwargs={"clock": clock}, **extra)
    fake.state.reply_callback_url = f"{rx.url}/callbacks/clickatell/reply"
    return rx


async def _escalated(http, fake: Fake) -> list[str]:
    return [t for t in await _texts(http, fake, WEB) if t.startswith("ESC")]


async def test_unacknowledged_page_escalates_after_once(start_receiver, fake: Fake, http):
    clock = FakeClock()
    rx = await _receiver(start_receiver, fake, clock)
    page = await _page(http, rx.url, "EscNoAck")
    clock.advance(299)
    assert await rx.receiver.escalator.run_once() == 0
    clock.advance(2)
    await rx.receiver.escalator.run_once()  # (or the escalator's own loop, as it polls)

    async def escalated() -> bool:
        return len(await _escalated(http, fake)) == 1

    await eventually(escalated)
    (text,) = await _escalated(http, fake)
    assert text.startswith("ESC1 [WARNING] FIRING 1: EscNoAck") and text.endswith(f" #{page['ref']}")
    async with http.get(f"{rx.url}/api/v1/messages/{page['id']}") as r:
        (round1,) = (await r.json())["escalations"]
    assert (round1["round"], round1["to"]) == (1, "web")
    async with http.get(f"{rx.url}/api/v1/messages/{round1['messageId']}") as r:
        assert (await r.json())["ref"] == page["ref"]  # the escalation is the same page
    clock.advance(3600)
    assert await rx.receiver.escalator.run_once() == 0  # repeat 1: that was the last round
    assert await _metric(http, rx.url, 'sms_receiver_escalations_total{group="db"}') == 1

    # whoever it reached may acknowledge it
    answer = await _reply_json(http, fake, WEB, f"ACK {page['ref']}")
    assert answer["replies"] == ["ack"]


async def _reply_json(http, fake: Fake, number: str, text: str) -> dict[str, Any]:
    async with http.post(f"{fake.url}/_fake/reply", json={"from": number, "text": text}) as r:
        return json.loads((await r.json())["answer"])


async def test_ack_before_after_stops_escalation(start_receiver, fake: Fake, http):
    clock = FakeClock()
    rx = await _receiver(start_receiver, fake, clock)
    page = await _page(http, rx.url, "EscAcked")
    clock.advance(60)
    assert (await _reply_json(http, fake, DB[0], f"ACK {page['ref']}"))["replies"] == ["ack"]
    clock.advance(3600)
    assert await rx.receiver.escalator.run_once() == 0
    assert await _escalated(http, fake) == []


async def test_unack_and_esc_escalate(start_receiver, fake: Fake, http):
    clock = FakeClock()
    rx = await _receiver(start_receiver, fake, clock)
    page = await _page(http, rx.url, "EscNow")
    assert (await _reply_json(http, fake, DB[0], f"ACK {page['ref']}"))["replies"] == ["ack"]
    assert (await _reply_json(http, fake, DB[0], f"ESC {page['ref']}"))["replies"] == ["esc"]
    assert await rx.receiver.escalator.run_once() == 0  # acknowledged: ESC says UNACK first
    assert (await _reply_json(http, fake, DB[1], f"UNACK {page['ref']}"))["replies"] == ["unack"]
    assert (await _reply_json(http, fake, DB[1], f"esc {page['ref']}"))["replies"] == ["esc"]
    await rx.receiver.escalator.run_once()

    async def escalated() -> bool:
        return len(await _escalated(http, fake)) == 1

    await eventually(escalated)  # at once: no clock moved


async def test_every_delivery_failed_escalates_at_once(start_receiver, fake: Fake, http):
    clock = FakeClock()
    rx = await _receiver(start_receiver, fake, clock)
    await fake.mode(http, reject_numbers={n.lstrip("+"): 105 for n in DB})
    await _page(http, rx.url, "EscFailed")

    async def escalated() -> bool:
        await rx.receiver.escalator.run_once()
        return len(await _escalated(http, fake)) == 1

    await eventually(escalated)


async def test_resolved_page_stops_escalating(start_receiver, fake: Fake, http):
    clock = FakeClock()
    rx = await _receiver(start_receiver, fake, clock)
    await _page(http, rx.url, "EscResolved")
    body = json.loads(alert_body("EscResolved"))
    body["status"] = body["alerts"][0]["status"] = "resolved"
    body["alerts"][0]["endsAt"] = "2027-01-15T08:00:00Z"
    async with http.post(f"{rx.url}/webhook/alertmanager", json=body) as r:
        assert r.status == 200, await r.text()
    clock.advance(3600)
    assert await rx.receiver.escalator.run_once() == 0
    assert await _escalated(http, fake) == []


async def test_two_replicas_never_send_one_round_twice(start_receiver, fake: Fake, http):
    clock = FakeClock()
    rx = await _receiver(start_receiver, fake, clock, run_dispatcher=False)
    page = await _page(http, rx.url, "EscRace")
    store = rx.receiver.store
    (due,) = await store.due_escalations(clock.now() + 301, 10)
    results = await asyncio.gather(*(store.escalated(due.ref, due.rounds, None, clock.now(), [], []) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    assert (await store.page(page["ref"])).rounds == 1
    assert await store.due_escalations(clock.now() + 3600, 10) == []


async def test_resolved_pages_leave_the_escalation_index_and_retention_prunes_pages(start_receiver, fake: Fake, http):
    clock = FakeClock()
    rx = await _receiver(start_receiver, fake, clock, run_dispatcher=False)
    page = await _page(http, rx.url, "EscPruned")
    store = rx.receiver.store
    body = json.loads(alert_body("EscPruned"))
    body["status"] = body["alerts"][0]["status"] = "resolved"
    async with http.post(f"{rx.url}/webhook/alertmanager", json=body) as r:
        assert r.status == 200, await r.text()
    record = await store.page(page["ref"])
    assert record is not None and record.escalate_at is None and not record.firing
    assert await store.prune(clock.now() + 1, keys_before=0, sends_before=0) >= 2
    assert await store.page(page["ref"]) is None


def test_only_pages_at_the_escalation_level_or_above_escalate():
    import json

    from receiver.ingest import parse_webhook
    from receiver.pipeline import Snapshot, plan_notification, refs_wanted, with_refs
    from tests.helpers import fixture, make_config

    cfg = make_config(groups=[
        {"id": "db", "members": ["+886911960999"], "level": "info", "two_way": True,
         "escalate": {"after": "5m", "to": ["web"], "level": "critical"}},
        {"id": "web", "members": ["+14155550123"]}], routes=[], default_groups=["db"])
    snap = Snapshot.build(cfg)
    due = {}
    for severity in ("critical", "warning"):
        body = json.loads(fixture("alertmanager-0.25-firing.json"))
        for a in body["alerts"]:
            a["labels"]["severity"] = severity
        plan = plan_notification(parse_webhook(json.dumps(body).encode(), "alertmanager"), "n", snap, 1000.0)
        (page,) = with_refs(plan, list(range(1, refs_wanted(plan, snap) + 1)), snap, 1000.0).pages
        due[severity] = page.escalate_at
    assert due == {"critical": 1300.0, "warning": None}


async def test_a_page_still_held_does_not_escalate_its_clock_starts_again(start_receiver, fake: Fake, http):
    """Quiet hours hold the page: at ``after`` nobody has seen it, so nothing goes further yet."""
    clock = FakeClock()
    quiet = [{**GROUPS[0], "quiet_hours": {"timezone": "UTC", "start": "00:00", "end": "23:59",
                                           "min_level": "critical"}}, *GROUPS[1:]]
    rx = await start_receiver(groups=quiet, receiver_kwargs={"clock": clock})
    page = await _page(http, rx.url, "EscHeld")
    clock.advance(301)
    assert await rx.receiver.escalator.run_once() == 0
    stored = await rx.receiver.store.page(page["ref"])
    assert stored.rounds == 0 and stored.escalate_at == pytest.approx(clock.now() + 300)
    assert await _escalated(http, fake) == []
