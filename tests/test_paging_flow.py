"""Paging behaviour end to end: real HTTP into the receiver, the fake Clickatell as the phone
network, and an injected clock that the test moves (the dispatcher is driven step by step).

Every test runs on both outbox backends (SQLite and a real PostgreSQL): the paging policy
lives outside the store, and must behave the same on either. The storm test prints its numbers
(SMS per phone, worst critical delay, alerts that reached nobody); run it with ``-s`` to see
them."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp

import pytest

from receiver.clock import FakeClock
from receiver.config import DEFAULT_THROTTLE
from tests.conftest import Fake, Running, eventually, planned
from tests.helpers import fixture

JSON = {"Content-Type": "application/json"}
TEMPLATE = json.loads(fixture("alertmanager-0.25-grouped-firing.json"))
DB_MEMBERS = ("886911960999", "886911960998")
START = 1_800_000_000.0  # 2027-01-15 08:00 UTC


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@dataclass
class Sim:
    """The receiver under a fake clock; every SMS the fake receives is stamped with clock time."""

    rx: Running
    fake: Fake
    http: aiohttp.ClientSession
    clock: FakeClock
    sms: list[dict[str, Any]] = field(default_factory=list)
    accepted_at: dict[str, float] = field(default_factory=dict)

    async def post(self, *alerts: dict[str, Any], key: str = "") -> dict[str, Any]:
        body = copy.deepcopy(TEMPLATE)
        body["alerts"] = list(alerts)
        body["groupKey"] = key or f"{{}}:{{alertname=\"{alerts[0]['labels']['alertname']}\"}}"
        async with self.http.post(f"{self.rx.url}/webhook/alertmanager", json=body) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        answer["messages"] = await planned(self.http, self.rx.url, answer)
        for mid in answer["messages"]:
            self.accepted_at[mid] = self.clock.now()
        return answer

    async def step(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        d = self.rx.receiver.dispatcher
        while await d.run_once():
            await d.drain()
        await d.drain()
        async with self.http.get(f"{self.fake.url}/_fake/messages") as r:
            got = await r.json()
        for m in got[len(self.sms):]:
            self.sms.append({**m, "at": self.clock.now()})

    async def api(self, path: str) -> Any:
        async with self.http.get(f"{self.rx.url}/api/v1/{path}") as r:
            assert r.status == 200
            return await r.json()

    async def metrics(self) -> str:
        async with self.http.get(f"{self.rx.url}/metrics") as r:
            return await r.text()


def alert(name: str, severity: str = "warning", status: str = "firing", **labels: str) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": name, "team": "db", "severity": severity, "instance": "db-1", **labels},
        "annotations": {"summary": "disk almost full"},
        "startsAt": "2027-01-15T08:00:00Z",
        "endsAt": "2027-01-15T08:30:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": f"{abs(hash(name)):016x}",
    }


def levels_with_warning(delivery: Any) -> list[dict[str, Any]]:
    return [{"name": "critical", "severities": ["critical"]},
            {"name": "warning", "severities": ["warning"], "delivery": delivery},
            {"name": "info", "severities": ["info"]}]


async def sim(start_receiver, fake, http, **overrides: Any) -> Sim:
    clock = FakeClock(START)
    overrides.setdefault("paging", {})  # the defaults: GoAlert's limits, critical within 60 s
    rx = await start_receiver(receiver_kwargs={"clock": clock}, run_dispatcher=False, **overrides)
    return Sim(rx, fake, http, clock)


def accounted(text: str) -> int:
    """Alerts an SMS stands for: the one it leads with plus the "+N more" it counts, or the
    "N held" of a bundle that leads with none."""
    held = re.match(r"(\d+) held: ", text)
    if held:
        return int(held[1])
    more = re.search(r"\+(\d+) more", text)
    return 1 + (int(more[1]) if more else 0)


async def test_storm_of_500_alerts_to_one_group(start_receiver, fake, http):
    s = await sim(start_receiver, fake, http)
    critical_delays: list[float] = []
    for i in range(500):  # 5 new alerts a second for 100 s, one webhook each
        await s.post(alert(f"Storm{i:03d}"))
        if i == 250:  # a critical page in the middle of the flood
            crit = (await s.post(alert("DatabaseDown", "critical")))["messages"][0]
        if i % 5 == 4:
            await s.step(1)
    while True:
        await s.step(5)
        status = await s.api("status")
        if status["outbox"]["pending"] == 0 and not status["outbox"]["byState"].get("held"):
            break
        assert s.clock.now() - START < 6 * 3600, "the storm never drained"

    for number in DB_MEMBERS:
        mine = [m for m in s.sms if m["to"] == number]
        # the critical passed the flood control: GoAlert's limits hold for every other SMS, on
        # every phone, in every window (counting the critical among the earlier sends)
        urgent = [m["at"] for m in mine if m["content"].startswith("[CRITICAL] FIRING")]
        times = sorted(m["at"] for m in mine)
        for rule in DEFAULT_THROTTLE:
            for start in times:
                inside = [t for t in times if start <= t < start + rule.window]
                passed = sum(1 for t in urgent if start <= t < start + rule.window)
                assert len(inside) - passed <= rule.count, (number, rule, start)
        # Every alert is named in some SMS or counted in a bundle: 500 + the critical one.
        assert sum(accounted(m["content"]) for m in mine) == 501
        crit_sms = next(m for m in mine if "DatabaseDown" in m["content"].split("\n")[0])
        critical_delays.append(crit_sms["at"] - s.accepted_at[crit])

    # The store agrees: every original message went out itself or inside a bundle that went out.
    messages = (await s.api("messages?limit=1000"))["messages"]
    originals = [m for m in messages if m["source"] == "alertmanager"]
    assert len(originals) == 501
    sent_bundles = {m["id"] for m in messages if m["source"] == "summary" and m["state"] == "sent"}
    unreached = [
        m["id"] for m in originals for rc in m["recipients"]
        if not (rc["state"] == "accepted" or rc["bundleId"] in sent_bundles)
    ]
    assert unreached == []
    assert max(critical_delays) <= 2  # issue #22: at once, not after the storm's budget
    metrics = await s.metrics()
    assert 'sms_receiver_sms_throttled_total{group="db"}' in metrics
    print(f"\nstorm: 500 warning + 1 critical alerts to 2 phones over 100 s; SMS per phone: "
          f"{ {n: sum(m['to'] == n for m in s.sms) for n in DB_MEMBERS} }; worst critical delay "
          f"{max(critical_delays):.0f} s; alerts that reached nobody: {len(unreached)}")


async def test_a_critical_in_a_warning_storm_reaches_the_phone_within_2s_in_real_time(
    start_receiver, fake, http
):
    """The real receiver, clock and dispatcher: warnings keep coming while a critical is paged;
    the fake Clickatell has the critical for both members within 2 s of the webhook's answer."""
    rx = await start_receiver(paging={})  # the shipped defaults: GoAlert's limits
    url = f"{rx.url}/webhook/alertmanager"

    async def post(a: dict[str, Any]) -> None:
        body = {**copy.deepcopy(TEMPLATE), "alerts": [a], "groupKey": a["labels"]["alertname"]}
        async with http.post(url, json=body) as r:
            assert r.status == 200, await r.text()

    for i in range(100):  # the storm is under way: the phones' budgets are spent, bundles held
        await post(alert(f"Storm{i:03d}"))
    more = asyncio.gather(*(post(alert(f"Late{i:03d}")) for i in range(100)))  # still coming
    loop = asyncio.get_running_loop()
    posted = loop.time()
    await post(alert("DatabaseDown", "critical"))
    seen: dict[str, float] = {}

    async def arrived() -> bool:
        for m in await fake.messages(http):
            if "DatabaseDown" in m["content"]:
                seen.setdefault(m["to"], loop.time())
        return len(seen) == len(DB_MEMBERS)

    try:
        await eventually(arrived, timeout=10)
    finally:
        await more
    latency = max(seen.values()) - posted
    print(f"\ncritical in a storm of 200 warnings: on both phones {latency * 1000:.0f} ms after its webhook was posted")
    assert latency <= 2.0


async def test_critical_is_not_held_past_the_bound_when_the_rules_are_exhausted(
    start_receiver, fake, http
):
    s = await sim(start_receiver, fake, http)
    for minute in range(8):  # a warning a minute: by minute 5 the 5-in-15-minutes rule is spent
        await s.post(alert(f"Flap{minute}"))
        for _ in range(60):
            await s.step(1)
    sent_before = len(s.sms)
    crit = (await s.post(alert("DatabaseDown", "critical")))["messages"][0]
    for _ in range(70):
        await s.step(1)
    crit_sms = [m for m in s.sms[sent_before:] if "DatabaseDown" in m["content"]]
    assert len(crit_sms) == 2  # both members
    delay = crit_sms[0]["at"] - s.accepted_at[crit]
    assert 0 < delay <= 60  # held (the rules said 15 minutes) but only up to the urgency bound
    detail = await s.api(f"messages/{crit}")
    assert detail["state"] == "bundled"


async def test_a_new_critical_does_not_wait_for_the_resolved_sms_of_an_earlier_alert(
    start_receiver, fake, http
):
    """Issue #22's report: the resolved SMS of an earlier alert used the number's 1-a-minute
    budget, and a new critical page waited 36 s for it."""
    s = await sim(start_receiver, fake, http)
    await s.post(alert("DiskFull", "critical"))
    for _ in range(61):
        await s.step(1)
    await s.post(alert("DiskFull", "critical", status="resolved"), key="resolved")
    await s.step(1)
    assert [m["content"][:19] for m in s.sms] == ["[CRITICAL] FIRING 1", "[CRITICAL] FIRING 1",
                                                  "[CRITICAL] RESOLVED", "[CRITICAL] RESOLVED"]
    s.clock.advance(24)  # the reported case: 36 s before the budget frees up
    crit = (await s.post(alert("DatabaseDown", "critical")))["messages"][0]
    await s.step(1)
    got = [m for m in s.sms if "DatabaseDown" in m["content"]]
    assert sorted(m["to"] for m in got) == sorted(DB_MEMBERS)
    assert all(m["at"] - s.accepted_at[crit] <= 1 for m in got)
    assert (await s.api(f"messages/{crit}"))["state"] == "sent"


async def test_a_critical_takes_what_is_held_for_its_number_with_it(start_receiver, fake, http):
    s = await sim(start_receiver, fake, http)
    await s.post(alert("First"))
    await s.step(1)
    for i in range(3):  # the throttle holds these for a minute
        await s.post(alert(f"Held{i}"))
        s.clock.advance(0.001)
    await s.step(1)
    assert len(s.sms) == 2
    crit = (await s.post(alert("DatabaseDown", "critical")))["messages"][0]
    await s.step(1)
    bundles = s.sms[2:]
    assert len(bundles) == 2  # one SMS per member, at once: the critical leads, the held follow
    assert bundles[0]["content"] == (
        "[CRITICAL] FIRING 1: DatabaseDown db-1 disk almost full\n+3 more: Held0 db-1 (warning), "
        "Held1 db-1 (warning), Held2 db-1 (warning)")
    assert bundles[0]["at"] - s.accepted_at[crit] <= 1
    assert (await s.api(f"messages/{crit}"))["state"] == "bundled"
    assert not (await s.api("status"))["outbox"]["byState"].get("held")


async def test_past_the_urgent_ceiling_criticals_are_throttled_again(start_receiver, fake, http):
    """A flapping critical alert: two criticals an hour go out at once (the ceiling here),
    the third waits for the rules, at most urgent_max_delay; resolved SMS never count."""
    s = await sim(start_receiver, fake, http, groups=[{"id": "db", "members": ["+886911960999"]}],
                  routes=[], default_groups=["db"], paging={"urgent_ceiling": {"count": 2, "window": "1h"}})
    delays = []
    for i in range(3):
        crit = (await s.post(alert(f"Flap{i}", "critical")))["messages"][0]
        sent_before = len(s.sms)
        for _ in range(70):
            await s.step(1)
            if len(s.sms) > sent_before:
                break
        delays.append(s.sms[sent_before]["at"] - s.accepted_at[crit])
        await s.post(alert(f"Flap{i}", "critical", status="resolved"), key=f"resolved{i}")
        for _ in range(61):  # the resolved SMS goes out a minute after the page, by the rules
            await s.step(1)
    assert delays[:2] == [1, 1]
    assert 1 < delays[2] <= 60  # past the ceiling: the 1-a-minute rule, the resolved SMS counted
    assert sum("RESOLVED" in m["content"] for m in s.sms) == 3


async def test_digest_sends_one_summary_per_window(start_receiver, fake, http):
    s = await sim(
        start_receiver, fake, http,
        levels=levels_with_warning({"digest": "15m"}),
    )
    first = (await s.post(alert("DiskFull")))["messages"][0]
    await s.step(60)
    await s.post(alert("CPUHigh", instance="web-2"))
    await s.step(60)
    held = await s.api(f"messages/{first}")
    assert held["state"] == "held" and held["heldFor"] == "digest 15m"
    assert held["nextAttemptAt"].startswith("2027-01-15T08:15:00")
    assert s.sms == []
    for _ in range(13):
        await s.step(60)  # past 08:15
    assert len(s.sms) == 2  # one summary per member
    assert s.sms[0]["content"] == (
        "[digest 15m] 2 alerts: DiskFull db-1 (warning), CPUHigh web-2 (warning)"
    )
    assert (await s.api(f"messages/{first}"))["state"] == "bundled"
    assert 'sms_receiver_summaries_total{kind="digest"} 1.0' in await s.metrics()


async def test_resolved_while_held_sends_nothing_stale(start_receiver, fake, http):
    s = await sim(
        start_receiver, fake, http,
        levels=levels_with_warning({"digest": "15m"}),
    )
    await s.post(alert("Blip"))
    await s.step(30)
    await s.post(alert("Blip", status="resolved"), key="resolved")
    for _ in range(16):
        await s.step(60)
    assert s.sms == []  # fired and resolved inside the window: nothing worth a page
    states = {m["state"] for m in (await s.api("messages"))["messages"]}
    assert states == {"collapsed"}
    assert 'sms_receiver_alerts_collapsed_total{kind="digest"} 1.0' in await s.metrics()


async def test_quiet_hours_hold_all_but_critical_and_summarise_at_the_end(
    start_receiver, fake, http
):
    s = await sim(
        start_receiver, fake, http,
        groups=[{"id": "db", "level": "info", "members": ["+886911960999"],
                 "quiet_hours": {"timezone": "Europe/Berlin", "start": "22:00", "end": "07:00",
                                 "min_level": "critical"}}],
        routes=[], default_groups=["db"],
    )
    s.clock.advance(14 * 3600)  # 22:00 UTC = 23:00 in Berlin
    warn = (await s.post(alert("DiskFull")))["messages"][0]
    await s.post(alert("DatabaseDown", "critical"))
    await s.step(1)
    assert [m["content"].split(":")[1].strip() for m in s.sms] == ["DatabaseDown db-1 disk almost full"]
    held = await s.api(f"messages/{warn}")
    assert held["state"] == "held" and held["heldFor"] == "quiet hours"
    assert held["nextAttemptAt"].startswith("2027-01-16T06:00:00")  # 07:00 Berlin
    for _ in range(8 * 6):
        await s.step(600)
    assert len(s.sms) == 2
    assert s.sms[1]["content"] == "[quiet hours] 1 alert: DiskFull db-1 (warning)"
    assert s.sms[1]["at"] - (START + 22 * 3600) < 600


async def test_delivery_none_is_recorded_never_sent(start_receiver, fake, http):
    s = await sim(
        start_receiver, fake, http,
        levels=levels_with_warning("none"),
    )
    mid = (await s.post(alert("Noise")))["messages"][0]
    for _ in range(3):
        await s.step(60)
    assert s.sms == []
    detail = await s.api(f"messages/{mid}")
    assert detail["state"] == "suppressed" and detail["heldFor"] == "delivery none"
    assert 'sms_receiver_messages_suppressed_total{group="db"} 1.0' in await s.metrics()


async def test_held_messages_survive_a_restart(start_receiver, fake, http):
    s = await sim(start_receiver, fake, http, db="held.db")
    await s.post(alert("First"))
    await s.step(1)
    for i in range(3):  # the throttle holds these for a minute
        await s.post(alert(f"Held{i}"))
        s.clock.advance(0.001)
    await s.step(1)
    assert len(s.sms) == 2
    assert (await s.api("status"))["outbox"]["byState"].get("held") == 3
    await s.rx.receiver.stop()

    s2 = await sim(start_receiver, fake, http, db="held.db")
    s2.clock.advance(s.clock.now() - START)
    s2.sms = list(s.sms)
    for _ in range(60):
        await s2.step(1)
    bundles = s2.sms[2:]
    assert len(bundles) == 2  # one bundle per member, a minute after the first page
    assert bundles[0]["content"] == (
        "[WARNING] FIRING 1: Held0 db-1 disk almost full\n+2 more: Held1 db-1 (warning), "
        "Held2 db-1 (warning)"
    )
    assert round(bundles[0]["at"] - START) == 61


async def test_an_outage_does_not_become_a_burst_when_clickatell_is_back(start_receiver, fake, http):
    """Warnings every 5 s while Clickatell is down for 100 s: what could not be sent is not
    counted by the throttle, so when Clickatell is back the phones still get no more than the
    rules allow (one a minute, three in two minutes here), every alert named or counted."""
    rules = [{"count": 1, "window": "20s"}, {"count": 3, "window": "2m"}]
    s = await sim(start_receiver, fake, http, paging={"throttle": rules})
    await fake.mode(http, global_error={"code": 901, "status": 503})
    for i in range(20):
        await s.post(alert(f"Outage{i}"))
        for _ in range(5):
            await s.step(1)
    assert s.sms == []
    await fake.mode(http, global_error=None)
    while True:
        await s.step(5)
        status = await s.api("status")
        if status["outbox"]["pending"] == 0 and not status["outbox"]["byState"].get("held"):
            break
        assert s.clock.now() - START < 3 * 3600, "never drained"
    for number in DB_MEMBERS:
        times = sorted(m["at"] for m in s.sms if m["to"] == number)
        for count, window in ((1, 20), (3, 120)):
            worst = max(sum(1 for t in times if start <= t < start + window) for start in times)
            assert worst <= count, (number, count, window, times)
        assert sum(accounted(m["content"]) for m in s.sms if m["to"] == number) == 20, [(m["at"] - START, m["content"]) for m in s.sms if m["to"] == number]
