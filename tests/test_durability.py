"""kill -9 the receiver process and restart it: every accepted page is delivered, and none that
Clickatell already accepted is sent again."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path


from tests.conftest import Fake, eventually
from tests.helpers import fixture
from tests.tools import ReceiverProcess, free_port, receiver_config


def unique_payloads(n: int) -> list[bytes]:
    base = json.loads(fixture("alertmanager-0.25-firing.json"))
    out = []
    for i in range(n):
        body = json.loads(json.dumps(base))
        body["groupKey"] = f'{{}}:{{alertname="Durable{i}"}}'
        body["alerts"][0]["labels"].update(alertname=f"Durable{i}", team="db")
        body["alerts"][0]["fingerprint"] = f"{i:016x}"
        out.append(json.dumps(body).encode())
    return out


async def test_kill9_restart_delivers_everything_exactly_once(tmp_path: Path, fake: Fake, http):
    config = receiver_config(tmp_path, fake.url, {
        "retry_initial": "100ms", "retry_max": "200ms", "poll_interval": "100ms", "lease": "2s",
    })
    proc = ReceiverProcess(config, free_port(), tmp_path / "receiver.log")
    n = 40
    try:
        # Clickatell is down: every webhook is accepted (durably) and then held.
        await fake.mode(http, fail_next={"count": 1_000_000, "status": 503})
        await proc.start(http)
        for body in unique_payloads(n):
            async with http.post(f"{proc.url}/webhook/alertmanager", data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
        proc.kill9()

        # Clickatell is back; the restarted receiver delivers what the dead one had accepted.
        await fake.mode(http, fail_next={"count": 0, "status": 503})
        await proc.start(http)

        async def all_delivered() -> bool:
            return len(await fake.messages(http)) == 2 * n  # group "db" has two members

        await eventually(all_delivered, timeout=30)
        sent = await fake.messages(http)
        keys = [(m["clientMessageId"], m["to"]) for m in sent]
        assert len(set(keys)) == len(keys) == 2 * n  # nothing sent twice

        # kill -9 again after everything was accepted: nothing is resent on restart.
        await asyncio.sleep(0.5)  # let the last results commit
        proc.kill9()
        await proc.start(http)
        await asyncio.sleep(2.5)  # longer than the lease and several poll intervals
        assert len(await fake.messages(http)) == 2 * n
        async with http.get(f"{proc.url}/api/v1/status") as r:
            status = await r.json()
        assert status["outbox"]["pending"] == 0
        assert status["outbox"]["byState"] == {"sent": n}
    finally:
        proc.stop()
