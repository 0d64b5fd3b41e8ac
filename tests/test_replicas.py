"""Several replicas on one PostgreSQL database, as real processes: two `sms-receiver run` on
127.0.0.1 sharing a real PostgreSQL (tests/pg.py), the fake Clickatell counting every SMS, and
a real Alertmanager HA pair (two clustered instances of Debian's, each sending to both
receivers). Counted at the fake: every page delivered, and never more often than the crash
windows allow.

Required in CI (.ci/run installs PostgreSQL and Alertmanager); skipped elsewhere without them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import API_KEY, Fake, eventually
from tests.pg import Server
from tests.tools import (
    DB_MEMBERS,
    ReceiverProcess,
    alert_body,
    free_port,
    need,
    receiver_config,
    terminate,
    until_ready,
)

JSON = {"Content-Type": "application/json"}
DISPATCH = {"retry_initial": "50ms", "retry_max": "300ms", "poll_interval": "100ms", "lease": "4s"}


@dataclass
class Replicas:
    rx: list[ReceiverProcess]
    pg: Server
    db: str  # the database's name

    def sql(self, query: str) -> str:
        return self.pg.psql(query, self.db)

    def idle(self) -> bool:
        """Nothing left to plan or send: every notification planned, no message waiting."""
        return self.sql("SELECT (SELECT count(*) FROM notifications) + (SELECT count(*) FROM messages "
                        "WHERE state IN ('pending','sending'))") == "0"


def start_replicas(tmp_path: Path, fake: Fake, pg_server: Server, url: str, n: int = 2,
                   **extra: Any) -> Replicas:
    rx = []
    for i in range(n):
        d = tmp_path / f"replica-{i}"
        d.mkdir()
        config = receiver_config(d, fake.url, {**DISPATCH, **extra.pop("dispatch", {})}, storage=url,
                                 clickatell={"api_key": API_KEY, "base_url": fake.url, "timeout": "2s"},
                                 **extra)
        rx.append(ReceiverProcess(config, free_port(), d / "receiver.log"))
    return Replicas(rx, pg_server, url.rsplit("/", 1)[1])


@pytest.fixture
async def replicas(tmp_path: Path, fake: Fake, pg_server: Server, http) -> AsyncIterator[Replicas]:
    r = start_replicas(tmp_path, fake, pg_server, pg_server.database())
    try:
        await asyncio.gather(*(x.start(http) for x in r.rx))
        yield r
    finally:
        for x in r.rx:
            x.stop()


async def until_idle(r: Replicas, fake: Fake, timeout: float = 60) -> None:
    async def idle() -> bool:
        return fake.state.in_flight == 0 and await asyncio.to_thread(r.idle)

    await eventually(idle, timeout=timeout)


def sms_per_alert(fake: Fake) -> Counter[tuple[str, str]]:
    """SMS at the fake per (alertname in the text, recipient)."""
    out: Counter[tuple[str, str]] = Counter()
    for m in fake.state.messages:
        for word in {w for w in m["content"].replace(";", " ").split() if w.startswith("Rep")}:
            out[(word, m["to"])] += 1
    return out


async def until_paged(fake: Fake, names: list[str], timeout: float) -> set[tuple[str, str]]:
    """Wait until every alert of ``names`` reached both members; those (alert, member) pairs."""
    expected = {(n, to) for n in names for to in DB_MEMBERS}

    async def all_delivered() -> bool:
        return set(sms_per_alert(fake)) >= expected

    await eventually(all_delivered, timeout=timeout)
    return expected


# ---------------------------------------------------------------------------------------------
# A real Alertmanager HA pair in front


@pytest.fixture
async def ha_pair(tmp_path: Path, replicas: Replicas, http) -> AsyncIterator[list[str]]:
    """Two clustered Alertmanagers, each with both replicas as webhook targets."""
    alertmanager = need("prometheus-alertmanager")
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump({
        "route": {"receiver": "sms", "group_by": ["alertname"], "group_wait": "1s",
                  "group_interval": "5s", "repeat_interval": "1h"},
        "receivers": [{"name": "sms", "webhook_configs": [
            {"url": f"{x.url}/webhook/alertmanager", "send_resolved": False} for x in replicas.rx]}],
    }))
    web, mesh = [free_port(), free_port()], [free_port(), free_port()]
    procs, logs = [], []
    for i in range(2):
        log = (tmp_path / f"alertmanager-{i}.log").open("wb")
        logs.append(log)
        procs.append(subprocess.Popen(
            [alertmanager, f"--config.file={config}", f"--storage.path={tmp_path / f'am-{i}'}",
             f"--web.listen-address=127.0.0.1:{web[i]}", f"--cluster.listen-address=127.0.0.1:{mesh[i]}",
             f"--cluster.peer=127.0.0.1:{mesh[1 - i]}", "--cluster.peer-timeout=2s"],
            stdout=log, stderr=subprocess.STDOUT))
    urls = [f"http://127.0.0.1:{p}" for p in web]
    try:
        for url in urls:
            await until_ready(http, url)
        yield urls
    finally:
        for p in procs:
            terminate(p)
        for log in logs:
            log.close()


async def fire(http: aiohttp.ClientSession, ams: list[str], names: list[str]) -> None:
    """Fire alerts at both Alertmanagers, as Prometheus does for an HA pair."""
    now = datetime.now(timezone.utc)
    alerts = [{"labels": {"alertname": n, "team": "db", "severity": "critical"},
               "annotations": {"summary": n}, "startsAt": (now - timedelta(minutes=1)).isoformat()}
              for n in names]
    for am in ams:
        for i in range(0, len(alerts), 50):
            async with http.post(f"{am}/api/v2/alerts", json=alerts[i:i + 50]) as r:
                assert r.status == 200, await r.text()


async def test_an_ha_pair_and_two_replicas_page_each_alert_once(ha_pair, replicas: Replicas, fake: Fake, http):
    names = [f"Rep{i:03d}" for i in range(200)]
    await fire(http, ha_pair, names)
    expected = await until_paged(fake, names, timeout=90)
    await until_idle(replicas, fake)
    counts = sms_per_alert(fake)
    assert set(counts) == expected and set(counts.values()) == {1}, Counter(counts.values())
    # each notification was sent to both replicas: one accepted it (whichever committed first:
    # often the same one, the first URL Alertmanager posts to), the other answered duplicate
    answers = [await metrics_of(http, x.url) for x in replicas.rx]
    assert sum(a['webhooks_received_total{outcome="accepted",source="alertmanager"}'] for a in answers) == 200
    assert sum(a['webhooks_received_total{outcome="duplicate",source="alertmanager"}'] for a in answers) >= 200


async def metrics_of(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("sms_receiver_"):
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("sms_receiver_")] = float(value)
    return out


async def test_a_replica_killed_mid_send_is_taken_over(ha_pair, replicas: Replicas, fake: Fake, http):
    """Clickatell is slow; one replica is kill -9'd (its process group) once about half the
    pages went out. The other takes its claims over when their lease runs out: every page is
    delivered, and only the messages the dead one was sending can go out twice."""
    await fake.mode(http, delay=0.3)
    names = [f"Rep{i:03d}" for i in range(200)]
    await fire(http, ha_pair, names)

    async def half() -> bool:
        return len(fake.state.messages) >= 200

    await eventually(half, timeout=90)
    victim, survivor = replicas.rx
    victim.kill9()
    expected = await until_paged(fake, names, timeout=120)
    await until_idle(replicas, fake)
    counts = sms_per_alert(fake)
    twice = [k for k, n in counts.items() if n > 1]
    taken = (await metrics_of(http, survivor.url))["claims_taken_over_total"]
    # the window: messages the dead replica had claimed (at most dispatch.concurrency of them),
    # each sent again to its recipients at most once
    assert max(counts.values()) <= 2, counts.most_common(3)
    assert len(twice) <= taken * len(DB_MEMBERS) <= 8 * len(DB_MEMBERS), (twice, taken)
    print(f"kill -9 of a replica mid-send: {len(expected)} pages delivered, {len(twice)} sent "
          f"twice, {taken:.0f} claims taken over")


# ---------------------------------------------------------------------------------------------
# The database goes away


async def test_the_database_stopped_under_load_loses_nothing(replicas: Replicas, pg_server: Server,
                                                              fake: Fake, http):
    """PostgreSQL stopped while webhooks arrive at both replicas: they answer 503 (Alertmanager
    retries) and fail readiness; once it is back, sending resumes by itself and every webhook
    that was answered 2xx is delivered."""
    answered: list[str] = []
    refused = Counter[int]()
    stop = asyncio.Event()

    async def load(rx: ReceiverProcess, tag: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            name = f"Db{tag}{i:05d}"
            try:
                async with http.post(f"{rx.url}/webhook/alertmanager", data=alert_body(name),
                                     headers=JSON) as r:
                    body = await r.text()
                    if r.status == 200 and json.loads(body)["status"] == "accepted":
                        answered.append(json.loads(body)["notification"])
                    else:
                        refused[r.status] += 1
            except aiohttp.ClientError:
                refused[0] += 1
            await asyncio.sleep(0.01)  # a steady stream, not a flood

    tasks = [asyncio.create_task(load(rx, str(i))) for i, rx in enumerate(replicas.rx)]
    try:
        async def some() -> bool:
            return len(answered) >= 50

        await eventually(some, timeout=30)
        await asyncio.to_thread(pg_server.stop, "fast")
        down = len(answered)

        async def refusing() -> bool:  # both replicas answer 503 and are not ready
            return refused[503] >= 40 and all([await ready(http, rx.url) == 503 for rx in replicas.rx])

        await eventually(refusing, timeout=30)
        await asyncio.to_thread(pg_server.start)

        async def back() -> bool:
            return len(answered) >= down + 50

        await eventually(back, timeout=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        if not pg_server.running():
            pg_server.start()
    assert set(refused) <= {503}, refused  # a clear 503, never a 500 or a dropped connection
    await until_idle(replicas, fake, timeout=90)
    reached = {m["clientMessageId"][:27] for m in fake.state.messages}
    lost = [n for n in answered if n not in reached]
    assert not lost, f"{len(lost)} of {len(answered)} answered webhooks never reached Clickatell"
    assert all([await ready(http, rx.url) == 200 for rx in replicas.rx])
    errors = sum([(await metrics_of(http, rx.url))["store_errors_total"] for rx in replicas.rx])
    assert errors > 0
    print(f"PostgreSQL stopped under load: {len(answered)} answered 2xx, all delivered; "
          f"{refused[503]} answered 503 while it was down")


async def ready(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/-/ready") as r:
        await r.read()
        return r.status


# ---------------------------------------------------------------------------------------------
# Flood control across replicas


async def test_a_storm_through_two_replicas_keeps_each_phones_limit(tmp_path: Path, fake: Fake,
                                                                    pg_server: Server, http):
    """500 warnings to one group, spread over two replicas, with the default throttle (the
    first rule: 1 SMS per phone per minute): each phone gets one SMS now, whichever replica
    sends it; the rest is held for a bundle. Without the shared policy lock both replicas
    would clear a send for the same phone."""
    r = start_replicas(tmp_path, fake, pg_server, pg_server.database(), paging={})
    try:
        await asyncio.gather(*(x.start(http) for x in r.rx))

        async def post(i: int) -> None:
            rx = r.rx[i % 2]
            async with http.post(f"{rx.url}/webhook/alertmanager", data=alert_body(f"Storm{i:03d}"),
                                 headers=JSON) as resp:
                assert resp.status == 200, await resp.text()

        for start in range(0, 500, 50):
            await asyncio.gather(*(post(i) for i in range(start, start + 50)))
        await until_idle(r, fake)
        per_phone = Counter(m["to"] for m in fake.state.messages)
        assert per_phone == {to: 1 for to in DB_MEMBERS}, per_phone
        held = int(r.sql("SELECT count(*) FROM recipients WHERE state='held'"))
        assert held == 499 * len(DB_MEMBERS)
    finally:
        for x in r.rx:
            x.stop()


async def test_run_names_its_backend_and_never_the_password(tmp_path: Path, fake: Fake, pg_server: Server, http):
    """The start-up line says where the outbox is; the password (accepted by the test cluster's
    trust authentication) is masked there, in /metrics and in /api/v1/status."""
    url = pg_server.database().replace("postgresql://sms@", "postgresql://sms:hunter2-secret@")
    (rx,) = start_replicas(tmp_path, fake, pg_server, url, n=1).rx
    try:
        await rx.start(http)
        for path in ("/metrics", "/api/v1/status"):
            async with http.get(f"{rx.url}{path}") as r:
                assert r.status == 200 and "hunter2" not in await r.text()
        assert 'sms_receiver_store_backend{backend="postgresql"} 1.0' in await (await http.get(f"{rx.url}/metrics")).text()
    finally:
        rx.stop()
    log = rx.log_text()
    assert "(storage postgresql://sms:***@127.0.0.1:" in log and "hunter2" not in log, log[-2000:]
