"""Two-way paging end to end: real Alertmanager 0.25 (Debian's) → sms-receiver (a process) → the
fake Clickatell, whose reply injection answers back; ``amtool`` reads the silences.

Required in CI (.ci/run installs Alertmanager); skipped on a machine without it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import Fake, eventually
from tests.tools import ReceiverProcess, free_port, need, receiver_config, terminate, until_ready

SECRET = "e2e-reply-secret"
DB, OPS, WEB = ("886911960999", "886911960998"), ("4915112345678",), ("14155550123",)


@dataclass
class Stack:
    am_url: str
    receiver: ReceiverProcess


@pytest.fixture
async def stack(tmp_path: Path, fake: Fake, http: aiohttp.ClientSession) -> AsyncIterator[Stack]:
    alertmanager = need("prometheus-alertmanager")
    need("amtool")
    rx_port, am_port = free_port(), free_port()
    am_url = f"http://127.0.0.1:{am_port}"
    rx_config = receiver_config(
        tmp_path, fake.url, {"retry_initial": "100ms", "retry_max": "500ms", "poll_interval": "100ms"},
        clickatell={"api_key": "e2e-key", "base_url": fake.url, "timeout": "2s", "from": "27999000001"},
        groups=[
            {"id": "db", "members": [f"+{n}" for n in DB], "two_way": True, "ack_duration": "1h"},
            {"id": "ops", "members": [f"+{n}" for n in OPS], "two_way": True,
             "escalate": {"after": "2s", "to": ["web"], "repeat": 1}},
            {"id": "web", "members": [f"+{n}" for n in WEB]},
        ],
        routes=[{"matchers": ['team="db"'], "groups": ["db"]}, {"matchers": ['team="ops"'], "groups": ["ops"]}],
        default_groups=[],
        alertmanager={"urls": [am_url]},
        callbacks={"secret": SECRET},
        dedup_window="1s",  # Alertmanager's repeats (3s apart) page again rather than count as replays
    )
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(yaml.safe_dump({
        # repeat_interval 3s: a silenced alert's next repeats are seen (not) to page within seconds
        "route": {"receiver": "sms", "group_by": ["alertname"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "3s"},
        "receivers": [{"name": "sms", "webhook_configs": [{
            "url": f"http://127.0.0.1:{rx_port}/webhook/alertmanager", "send_resolved": True}]}],
    }))
    receiver = ReceiverProcess(rx_config, rx_port, tmp_path / "receiver.log")
    am_log = (tmp_path / "alertmanager.log").open("wb")
    am = subprocess.Popen(
        [alertmanager, f"--config.file={am_config}", f"--storage.path={tmp_path / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{am_port}", f"--web.external-url={am_url}",
         "--cluster.listen-address="],
        stdout=am_log, stderr=subprocess.STDOUT,
    )
    fake.state.reply_callback_url = f"http://127.0.0.1:{rx_port}/callbacks/clickatell/reply/{SECRET}"
    try:
        await receiver.start(http)
        await until_ready(http, am_url)
        yield Stack(am_url, receiver)
    finally:
        terminate(am)
        am_log.close()
        receiver.stop()


async def post_alert(http, am_url: str, name: str, team: str) -> dict[str, str]:
    labels = {"alertname": name, "team": team, "severity": "critical", "instance": "db-9:9100"}
    start = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    async with http.post(f"{am_url}/api/v2/alerts", json=[{"labels": labels, "startsAt": start}]) as r:
        assert r.status == 200, await r.text()
    return labels


async def amtool_silences(am_url: str) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        need("amtool"), f"--alertmanager.url={am_url}", "silence", "query", "-o", "json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    return json.loads(out or b"[]")


async def firing(http, fake: Fake, name: str, to: str) -> list[str]:
    return [m["content"] for m in await fake.messages(http)
            if m["to"] == to and "FIRING" in m["content"] and name in m["content"]]


async def test_ack_by_sms_silences_in_alertmanager_and_unack_expires(stack: Stack, fake: Fake, http):
    labels = await post_alert(http, stack.am_url, "E2EAcked", "db")
    await post_alert(http, stack.am_url, "E2EControl", "db")  # never acked: shows repeats happen

    async def paged() -> bool:
        return bool(await firing(http, fake, "E2EAcked", DB[0]))

    await eventually(paged, timeout=20)
    (text,) = await firing(http, fake, "E2EAcked", DB[0])
    ref = int(text.rsplit("#", 1)[1])
    async with http.post(f"{fake.url}/_fake/reply", json={"from": DB[1], "text": f"ACK {ref}"}) as r:
        answer = await r.json()
    assert answer["status"] == 200 and json.loads(answer["answer"])["replies"] == ["ack"]

    (silence,) = await amtool_silences(stack.am_url)
    assert sorted((m["name"], m["value"], m["isRegex"]) for m in silence["matchers"]) == \
        sorted((k, v, False) for k, v in labels.items())
    ends = datetime.fromisoformat(silence["endsAt"].replace("Z", "+00:00"))
    assert timedelta(minutes=55) < ends - datetime.now(timezone.utc) <= timedelta(hours=1)
    assert silence["createdBy"] == "sms-receiver ack by *0998"

    async def repeated() -> bool:  # the control alert was paged again: a repeat interval passed
        return len(await firing(http, fake, "E2EControl", DB[0])) >= 3

    await eventually(repeated, timeout=30)
    assert len(await firing(http, fake, "E2EAcked", DB[0])) == 1  # its repeats were silenced

    async def confirmed() -> bool:
        return any(m["content"].startswith(f"ACKED #{ref} until") for m in await fake.messages(http))

    await eventually(confirmed, timeout=10)
    async with http.post(f"{fake.url}/_fake/reply", json={"from": DB[0], "text": f"UNACK {ref}"}) as r:
        assert json.loads((await r.json())["answer"])["replies"] == ["unack"]
    assert await amtool_silences(stack.am_url) == []  # expired silences are not listed

    async def paged_again() -> bool:
        return len(await firing(http, fake, "E2EAcked", DB[0])) >= 2

    await eventually(paged_again, timeout=20)


async def test_unacknowledged_page_escalates_in_real_time(stack: Stack, fake: Fake, http):
    await post_alert(http, stack.am_url, "E2EEscalated", "ops")

    async def escalated() -> bool:
        return any(m["to"] == WEB[0] and m["content"].startswith("ESC1 ") for m in await fake.messages(http))

    await eventually(escalated, timeout=20)  # after: 2s
    (page,) = [m["content"] for m in await fake.messages(http) if m["to"] == OPS[0]][:1]
    ref = page.rsplit("#", 1)[1]
    esc = next(m["content"] for m in await fake.messages(http) if m["to"] == WEB[0])
    assert esc.endswith(f"#{ref}")
