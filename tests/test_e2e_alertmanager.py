"""Real Alertmanager 0.25 (Debian's prometheus-alertmanager) → sms-receiver → fake Clickatell.

Required in CI (.ci/run installs Alertmanager); skipped on a machine without it.
"""

from __future__ import annotations

import re
import resource
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import Fake, eventually
from tests.tools import ReceiverProcess, free_port, need, receiver_config, terminate, until_ready

TOKEN = "e2e-webhook-token"


@dataclass
class Stack:
    am_url: str
    receiver: ReceiverProcess
    db: Path


async def metric(http: aiohttp.ClientSession, url: str, series: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        m = re.search(rf"^{re.escape(series)} (\S+)$", await r.text(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
async def stack(tmp_path: Path, fake: Fake, http: aiohttp.ClientSession) -> AsyncIterator[Stack]:
    alertmanager = need("prometheus-alertmanager")
    rx_port, am_port = free_port(), free_port()
    db = tmp_path / "outbox.db"
    rx_config = receiver_config(
        tmp_path, fake.url,
        {"retry_initial": "100ms", "retry_max": "500ms", "poll_interval": "100ms"},
        storage=f"sqlite://{db}",
        webhook_auth={"bearer_tokens": [TOKEN]},
    )
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(yaml.safe_dump({
        "route": {"receiver": "sms", "group_by": ["alertname"], "group_wait": "1s",
                  "group_interval": "2s", "repeat_interval": "1h"},
        "receivers": [{"name": "sms", "webhook_configs": [{
            "url": f"http://127.0.0.1:{rx_port}/webhook/alertmanager",
            "send_resolved": True,
            "http_config": {"authorization": {"credentials": TOKEN}},
        }]}],
    }))
    receiver = ReceiverProcess(rx_config, rx_port, tmp_path / "receiver.log")
    am_log = (tmp_path / "alertmanager.log").open("wb")
    am = subprocess.Popen(
        [alertmanager, f"--config.file={am_config}", f"--storage.path={tmp_path / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{am_port}", f"--web.external-url=http://127.0.0.1:{am_port}",
         "--cluster.listen-address="],
        stdout=am_log, stderr=subprocess.STDOUT,
    )
    am_url = f"http://127.0.0.1:{am_port}"
    try:
        await receiver.start(http)
        await until_ready(http, am_url)
        yield Stack(am_url, receiver, db)
    finally:
        terminate(am)
        am_log.close()
        receiver.stop()


async def post_alert(http, am_url: str, name: str, *, resolved: bool = False) -> None:
    now = datetime.now(timezone.utc)
    alert = {"labels": {"alertname": name, "team": "db", "severity": "critical", "instance": "db-9:9100"},
             "annotations": {"summary": f"{name} from a real Alertmanager"},
             "startsAt": (now - timedelta(minutes=1)).isoformat()}
    if resolved:
        alert["endsAt"] = (now - timedelta(seconds=1)).isoformat()
    async with http.post(f"{am_url}/api/v2/alerts", json=[alert]) as r:
        assert r.status == 200, await r.text()


async def test_firing_then_resolved_with_bearer_auth(stack: Stack, fake: Fake, http):
    await post_alert(http, stack.am_url, "E2EDiskFull")

    async def texts() -> list[str]:
        return [m["content"] for m in await fake.messages(http)]

    async def fired() -> bool:
        return any("FIRING" in t and "E2EDiskFull" in t for t in await texts())

    await eventually(fired, timeout=20)
    firing = [m for m in await fake.messages(http) if "FIRING" in m["content"]]
    assert sorted(m["to"] for m in firing) == ["886911960998", "886911960999"]  # group "db"
    assert firing[0]["content"].startswith("[CRITICAL] FIRING 1: E2EDiskFull db-9:9100")

    await post_alert(http, stack.am_url, "E2EDiskFull", resolved=True)

    async def resolved() -> bool:
        return any(t.startswith("[CRITICAL] RESOLVED 1: E2EDiskFull") for t in await texts())

    await eventually(resolved, timeout=20)
    url = stack.receiver.url
    assert await metric(http, url, 'sms_receiver_webhooks_received_total{outcome="accepted",source="alertmanager"}') >= 2
    assert await metric(http, url, 'sms_receiver_webhooks_received_total{outcome="unauthorized",source="alertmanager"}') == 0
    assert len(await fake.messages(http)) == 4  # firing and resolved, two members each: nothing twice


async def test_store_outage_answers_5xx_alertmanager_retries_page_delivered(stack: Stack, fake: Fake, http):
    url = stack.receiver.url
    assert stack.receiver.proc is not None
    web = stack.receiver.proc.pid
    # the receiver may write no file larger than its outbox is: EFBIG, a write that does not
    # happen (Python ignores SIGXFSZ); it answers 503 and recovers in place once it can write
    resource.prlimit(web, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
    try:
        await post_alert(http, stack.am_url, "E2EOutage")
        series = 'sms_receiver_webhooks_received_total{outcome="store_error",source="alertmanager"}'

        async def retried() -> bool:  # answered 5xx at least twice: Alertmanager retried
            return await metric(http, url, series) >= 2

        await eventually(retried, timeout=20)
        assert await fake.messages(http) == []
        async with http.get(f"{url}/-/ready") as r:
            assert r.status == 503
    finally:
        resource.prlimit(web, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    async def delivered() -> bool:
        return any("E2EOutage" in m["content"] for m in await fake.messages(http))

    await eventually(delivered, timeout=30)
    assert len([m for m in await fake.messages(http) if "E2EOutage" in m["content"]]) == 2
    async with http.get(f"{url}/-/ready") as r:  # (its log could not be written either meanwhile)
        assert r.status == 200
