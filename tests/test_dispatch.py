"""Retries, per-recipient failures, key problems and dead letters, against the fake's error modes."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import pytest

from receiver.clickatell import ClickatellClient, Kind
from receiver.clock import FakeClock
from tests.conftest import eventually, planned
from tests.helpers import fixture

JSON = {"Content-Type": "application/json"}
DB_PAYLOAD = fixture("alertmanager-0.25-grouped-firing.json")  # → group "db", two members


async def accept(http, rx, body: bytes = DB_PAYLOAD) -> str:
    async with http.post(f"{rx.url}/webhook/alertmanager", data=body, headers=JSON) as r:
        assert r.status == 200
        answer = await r.json()
    return (await planned(http, rx.url, answer))[0]


async def message(http, rx, mid: str) -> dict:
    async with http.get(f"{rx.url}/api/v1/messages/{mid}") as r:
        return await r.json()


async def wait_state(http, rx, mid: str, state: str, timeout: float = 5.0) -> dict:
    async def reached():
        return (await message(http, rx, mid))["state"] == state

    await eventually(reached, timeout)
    return await message(http, rx, mid)


async def metric(http, rx, line_start: str) -> float:
    async with http.get(f"{rx.url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {line_start}")


async def counted(http, rx, series: str, value: float) -> None:
    """Wait for ``series`` to reach ``value``: the dispatcher counts a result after the store
    has it, so the API can show the message's state before its counters move."""
    async def reached() -> bool:
        return await metric(http, rx, series) >= value

    await eventually(reached)
    assert await metric(http, rx, series) == value


async def test_transient_503_is_retried_until_sent(start_receiver, fake, http):
    await fake.mode(http, fail_next={"count": 2, "status": 503})
    rx = await start_receiver()
    mid = await accept(http, rx)
    msg = await wait_state(http, rx, mid, "sent")
    assert msg["attempts"] == 3
    assert len(await fake.messages(http)) == 2
    assert await metric(http, rx, 'sms_receiver_clickatell_requests_total{api="rest",outcome="transient",status_code="503"}') == 2


async def test_429_retry_after_is_respected(start_receiver, fake, http):
    """The dispatcher is driven pass by pass under a clock the test moves: when the retry is
    scheduled, and that no request goes out before it, are read from the receiver and the fake."""
    await fake.mode(http, fail_next={"count": 1, "status": 429, "retry_after": 1})
    clock = FakeClock()
    rx = await start_receiver(receiver_kwargs={"clock": clock}, run_dispatcher=False)
    mid = await accept(http, rx)

    async def dispatch() -> None:  # one pass, its sends finished
        await rx.receiver.dispatcher.run_once()
        await rx.receiver.dispatcher.drain()

    async def requests() -> dict:
        async with http.get(f"{fake.url}/_fake/requests") as r:
            return {k: v for k, v in (await r.json()).items() if k != "in_flight"}

    await dispatch()
    failed_at = clock.now()
    pending = await message(http, rx, mid)
    assert pending["state"] == "pending" and "HTTP 429" in pending["lastError"]
    assert pending["attempts"] == 1 and await requests() == {"rest 429": 1}
    retry_at = datetime.fromisoformat(pending["nextAttemptAt"]).timestamp()
    assert retry_at - failed_at == pytest.approx(1.0, abs=0.001)  # Retry-After: 1 wins over the 20 ms backoff

    clock.advance(0.9)  # before Retry-After: not sent again
    await dispatch()
    assert (await message(http, rx, mid))["attempts"] == 1
    assert await requests() == {"rest 429": 1} and await fake.messages(http) == []

    clock.advance(0.1)
    await dispatch()
    msg = await message(http, rx, mid)
    assert (msg["state"], msg["attempts"]) == ("sent", 2)
    assert len(await fake.messages(http)) == 2  # both members, in the one retry


async def test_per_recipient_rejection_fails_only_that_recipient(start_receiver, fake, http):
    await fake.mode(http, reject_numbers={"886911960998": 105})
    rx = await start_receiver()
    mid = await accept(http, rx)
    msg = await wait_state(http, rx, mid, "partial")
    by_number = {r["number"]: r for r in msg["recipients"]}
    assert by_number["+886911960999"]["state"] == "accepted"
    assert by_number["+886911960998"]["state"] == "failed"
    assert by_number["+886911960998"]["errorCode"] == "105"
    assert msg["attempts"] == 1  # no retry for a permanent per-recipient error
    await counted(http, rx, 'sms_receiver_sms_failed_total{group="db",reason="rejected"}', 1)
    assert await metric(http, rx, 'sms_receiver_clickatell_errors_total{code="105"}') == 1


async def test_wrong_key_holds_pages_until_reload(start_receiver, fake, http, caplog, tmp_path):
    caplog.set_level(logging.ERROR)
    await fake.mode(http, global_error={"code": 108, "status": 200})  # a global error with HTTP 200
    rx = await start_receiver(dispatch={"retry_initial": "10s", "retry_max": "10s"})
    mid = await accept(http, rx)

    async def failed_once():
        return (await message(http, rx, mid))["attempts"] >= 1 and (await message(http, rx, mid))["state"] == "pending"

    await eventually(failed_once)
    msg = await message(http, rx, mid)
    assert "108" in msg["lastError"]
    assert any("REJECTED THE ACCOUNT OR API KEY" in r.getMessage() for r in caplog.records)
    assert not any(rx.receiver.config.clickatell.api_key.get_secret_value() in r.getMessage()
                   for r in caplog.records)
    assert await fake.messages(http) == []

    # the operator fixes the key and reloads: held pages go out at once, not after the backoff
    await fake.mode(http, global_error=None)
    import yaml

    from tests.helpers import BASE
    path = tmp_path / "reload.yaml"
    cfg = rx.receiver.config
    path.write_text(yaml.safe_dump({**BASE, "storage": cfg.storage.url, "clickatell": {
        "api_key": "fixed-key", "base_url": cfg.clickatell.base_url}}))
    rx.receiver.config_path = path
    async with http.post(f"{rx.url}/-/reload") as r:
        assert r.status == 200
    await wait_state(http, rx, mid, "sent", timeout=3)


async def test_persistent_failure_becomes_dead_letter(start_receiver, fake, http):
    await fake.mode(http, fail_next={"count": 1000, "status": 503})
    rx = await start_receiver(dispatch={"max_age": "300ms"})
    mid = await accept(http, rx)
    msg = await wait_state(http, rx, mid, "dead", timeout=5)
    assert "not accepted within" in msg["lastError"]
    assert all(r["state"] == "failed" for r in msg["recipients"])
    await counted(http, rx, 'sms_receiver_dead_letters_total{group="db"}', 1)
    async with http.get(f"{rx.url}/api/v1/messages?status=dead") as r:
        assert [m["id"] for m in (await r.json())["messages"]] == [mid]


async def test_permanent_request_error_fails_without_retry(start_receiver, fake, http):
    await fake.mode(http, global_error={"code": 101, "status": 400})
    rx = await start_receiver()
    mid = await accept(http, rx)
    msg = await wait_state(http, rx, mid, "failed")
    assert msg["attempts"] == 1 and "101" in msg["lastError"]


async def test_slow_clickatell_times_out_and_retries(start_receiver, fake, http):
    await fake.mode(http, delay=1.5)
    rx = await start_receiver(clickatell={"timeout": "300ms"})
    mid = await accept(http, rx)

    async def retried():
        return (await message(http, rx, mid))["attempts"] >= 2

    await eventually(retried, timeout=5)
    await fake.mode(http, delay=0)
    await wait_state(http, rx, mid, "sent", timeout=5)


async def test_recipients_batched_200_per_request(start_receiver, fake, http):
    members = [f"+8869119{i:05d}" for i in range(450)]
    rx = await start_receiver(groups=[{"id": "db", "members": members, "level": "info"}],
                              routes=[], default_groups=["db"])
    mid = await accept(http, rx)
    msg = await wait_state(http, rx, mid, "sent", timeout=10)
    assert len(msg["recipients"]) == 450
    async with http.get(f"{fake.url}/_fake/requests") as r:
        requests = await r.json()
    assert json.dumps(requests).count("202") >= 1
    assert len(await fake.messages(http)) == 450
    assert msg["attempts"] == 1


async def test_http_and_one_api_types(start_receiver, fake, http):
    for api in ("http", "one_api"):
        rx = await start_receiver(clickatell={"api": api})
        mid = await accept(http, rx)  # each receiver has its own outbox: not a replay
        await wait_state(http, rx, mid, "sent")
    apis = {m["api"] for m in await fake.messages(http)}
    assert apis == {"http", "one_api"}


async def test_the_proxy_comes_from_the_environment_and_no_proxy_is_honoured(fake, monkeypatch):
    """httpx reads HTTP(S)_PROXY and NO_PROXY when the client is made: the fake, acting as the
    proxy, gets the request for a host that does not resolve; NO_PROXY sends it direct (and it
    fails to connect)."""
    monkeypatch.setenv("HTTP_PROXY", fake.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    via_proxy = ClickatellClient(base_url="http://clickatell.invalid", api="rest", timeout=5)
    monkeypatch.setenv("NO_PROXY", "clickatell.invalid")
    direct = ClickatellClient(base_url="http://clickatell.invalid", api="rest", timeout=5)
    try:
        outcome = await via_proxy.send(api_key="k", to=["886911960999"], content="via proxy",
                                       client_message_id="m1")
        assert outcome.kind is Kind.OK and outcome.recipients[0].accepted
        assert [m["content"] for m in fake.state.messages] == ["via proxy"]
        outcome = await direct.send(api_key="k", to=["886911960999"], content="direct",
                                    client_message_id="m2")
        assert outcome.kind is Kind.TRANSIENT and outcome.http_status is None
        assert len(fake.state.messages) == 1
    finally:
        await via_proxy.aclose()
        await direct.aclose()
