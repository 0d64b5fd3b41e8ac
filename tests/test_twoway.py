"""Two-way paging (issue #22 section 1): reply parsing, and ACK/UNACK/HELP by SMS through the
real receiver, the fake Clickatell's reply injection and a stand-in Alertmanager silences API
on 127.0.0.1 (the real Alertmanager: tests/test_e2e_twoway.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from receiver.models import SmsText
from receiver.twoway import BadReply, parse_command, parse_reply_callback, with_ref
from tests.conftest import Fake, eventually
from tests.tools import alert_body, free_port


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    """Both outboxes: pages, acks, escalations and the history queries are SQL of each."""
    return request.param


DB = ["+886911960999", "+886911960998"]
GROUPS = [
    {"id": "db", "level": "warning", "members": DB, "two_way": True, "ack_duration": "2h",
     "escalate": {"after": "5m", "to": ["web"], "repeat": 1}},
    {"id": "web", "level": "critical", "members": ["+14155550123"]},
    {"id": "info", "level": "info", "members": ["+4915112345678"]},
]
SECRET = "reply-secret-6f1c"


# -- pure parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "action", "ref", "duration", "problem"), [
    ("ACK", "ack", None, None, False),
    ("ack 42", "ack", 42, None, False),
    (" Ack #42 2h ", "ack", 42, 7200.0, False),
    ("UNACK 42", "unack", 42, None, False),
    ("esc 7", "esc", 7, None, False),
    ("HELP", "help", None, None, False),
    ("ACK 42 forever", "ack", 42, None, True),
    ("ACK 42 30d", "ack", 42, None, True),  # longer than a week: a typo, refused
    ("UNACK", "unack", None, None, True),
    ("thanks!", "unknown", None, None, False),
    ("", "unknown", None, None, False),
])
def test_commands(text: str, action: str, ref: int | None, duration: float | None, problem: bool):
    cmd = parse_command(text)
    assert (cmd.action, cmd.ref, cmd.duration, cmd.problem is not None) == (action, ref, duration, problem)


def test_rest_and_one_api_callbacks_and_charsets():
    rest = parse_reply_callback({"messageId": "orig", "replyMessageId": "r1", "fromNumber": "886911960999",
                                 "timestamp": 1516217711000, "text": "ACK", "charset": "UTF-8"})
    assert [(r.id, r.number, r.text, r.related) for r in rest] == [("r1", "+886911960999", "ACK", "orig")]
    one = parse_reply_callback(json.dumps({"integrationId": "i", "event": {"moText": [
        {"channel": "sms", "messageId": "m9", "relatedMessageId": "orig", "relatedClientMessageId": "ours",
         "from": "2799900001", "to": "2799900002", "timestamp": 1506607698000, "content": "ESC 4",
         "charset": "UTF-8"}]}}).encode())
    assert [(r.id, r.number, r.text, r.related_client) for r in one] == [("m9", "+2799900001", "ESC 4", "ours")]
    latin = parse_reply_callback({"fromNumber": "886911960999", "text": "ACK%2042%20d%E9j%E0", "charset": "ISO-8859-1"})
    assert latin[0].text == "ACK 42 déjà"
    utf16 = parse_reply_callback({"fromNumber": "886911960999", "text": "%00A%00C%00K", "charset": "UTF-16BE"})
    assert utf16[0].text == "ACK"
    # no reply id: the same reply twice gets the same id (a repeated callback is one reply)
    a, b = (parse_reply_callback({"fromNumber": "886911960999", "text": "ACK", "timestamp": 5}) for _ in range(2))
    assert a[0].id == b[0].id


@pytest.mark.parametrize(("body", "problem"), [
    (b"not json", "not JSON"),
    (b"[1]", "JSON object"),
    ({"text": "ACK"}, "fromNumber is missing"),
    ({"fromNumber": "abc", "text": "ACK"}, "not a phone number"),
    ({"fromNumber": "886911960999"}, "text is missing"),
    ({"fromNumber": "886911960999", "text": "%FF", "charset": "UTF-16BE"}, "cannot be decoded"),
    ({"fromNumber": "886911960999", "text": "x", "charset": "klingon"}, "cannot be decoded"),
    ({"event": {"moText": []}}, "non-empty list"),
    ({"event": {"moText": ["x"]}}, "moText.0 must be an object"),
])
def test_malformed_callbacks_name_the_problem(body: Any, problem: str):
    with pytest.raises(BadReply, match=problem):
        parse_reply_callback(body)


def test_ref_is_said_once_at_the_end_even_when_the_text_is_cut():
    assert with_ref(SmsText("[WARNING] FIRING 1: X", "GSM-7", 1), 42, 1).text == "[WARNING] FIRING 1: X #42"
    full = with_ref(SmsText("y" * 160, "GSM-7", 1), 123, 1)
    assert full.parts == 1 and full.text.endswith("... #123") and full.text.count("#123") == 1


# -- through the receiver ------------------------------------------------------------------------


@dataclass
class StubAlertmanager:
    """Records silence requests; answers as Alertmanager 0.25 does (the recorded exchange)."""

    url: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)


@pytest.fixture
async def am(aiohttp_server) -> StubAlertmanager:
    stub = StubAlertmanager()

    async def create(request: web.Request) -> web.Response:
        stub.headers.append(request.headers.get("Authorization", ""))
        stub.posts.append(await request.json())
        return web.json_response({"silenceID": f"sil-{len(stub.posts)}"})

    async def delete(request: web.Request) -> web.Response:
        stub.deletes.append(request.match_info["id"])
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/api/v2/silences", create)
    app.router.add_delete("/api/v2/silence/{id}", delete)
    server = await aiohttp_server(app, host="127.0.0.1")
    stub.url = str(server.make_url("")).rstrip("/")
    return stub


async def _reply(http, fake: Fake, number: str, text: str, shape: str = "rest") -> dict[str, Any]:
    async with http.post(f"{fake.url}/_fake/reply", json={"from": number, "text": text, "shape": shape}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _texts(http, fake: Fake, to: str) -> list[str]:
    return [m["content"] for m in await fake.messages(http) if m["to"] == to.lstrip("+")]


async def _page(http, url: str, name: str) -> dict[str, Any]:
    async with http.post(f"{url}/webhook/alertmanager", data=alert_body(name)) as r:
        answer = await r.json()
        assert r.status == 200, answer
    async with http.get(f"{url}/api/v1/messages", params={"notification": answer["notification"]}) as r:
        (message,) = (await r.json())["messages"]
    return message


async def _metric(http, url: str, series: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        m = re.search(rf"^{re.escape(series)} (\S+)$", await r.text(), re.M)
    return float(m.group(1)) if m else 0.0


async def test_ack_creates_silence_confirms_and_unack_expires(start_receiver, fake: Fake, am: StubAlertmanager, http):
    dead = f"http://127.0.0.1:{free_port()}"  # the first of an HA pair is down: the second takes it
    rx = await start_receiver(groups=GROUPS, clickatell={"from": "27999000001"},
                              alertmanager={"urls": [dead, am.url], "bearer_token": "am-token-1"})
    fake.state.reply_callback_url = f"{rx.url}/callbacks/clickatell/reply"
    page = await _page(http, rx.url, "TwoWayDisk")
    ref = page["ref"]
    assert page["text"].endswith(f" #{ref}") and page["text"].count(f"#{ref}") == 1

    async def delivered() -> bool:
        return any(t.endswith(f"#{ref}") for t in await _texts(http, fake, DB[0]))

    await eventually(delivered)
    answer = await _reply(http, fake, DB[0], "ACK")  # no ref: the last page this phone got
    assert answer["status"] == 200 and json.loads(answer["answer"])["replies"] == ["ack"]

    (silence,) = am.posts
    labels = {"alertname": "TwoWayDisk", "team": "db", "severity": "warning", "instance": "db-1:9100"}
    assert silence["matchers"] == [{"name": k, "value": v, "isRegex": False, "isEqual": True}
                                   for k, v in sorted(labels.items())]
    from datetime import datetime
    length = (datetime.fromisoformat(silence["endsAt"].replace("Z", "+00:00"))
              - datetime.fromisoformat(silence["startsAt"].replace("Z", "+00:00"))).total_seconds()
    assert length == 7200  # the group's ack_duration
    assert silence["createdBy"] == "sms-receiver ack by *0999" and f"#{ref}" in silence["comment"]
    assert am.headers == ["Bearer am-token-1"]

    async def confirmed() -> bool:
        texts = [await _texts(http, fake, n) for n in DB]
        return all(any(t.startswith(f"ACKED #{ref} until ") and "TwoWayDisk" in t for t in each) for each in texts)

    await eventually(confirmed)
    async with http.get(f"{rx.url}/api/v1/messages/{page['id']}") as r:
        shown = await r.json()
    assert shown["ref"] == ref and shown["escalations"] == []
    (ack,) = shown["acks"]
    assert (ack["by"], ack["silenceId"], ack["unackedAt"]) == ("*0999", "sil-1", None)
    assert await _metric(http, rx.url, 'sms_receiver_acks_total{group="db"}') == 1
    assert await _metric(http, rx.url, 'sms_receiver_silences_total{outcome="created"}') == 1
    assert await _metric(http, rx.url, "sms_receiver_ack_seconds_count") == 1

    answer = await _reply(http, fake, DB[1], f"UNACK {ref}", shape="one_api")
    assert json.loads(answer["answer"])["replies"] == ["unack"]
    assert am.deletes == ["sil-1"]
    async with http.get(f"{rx.url}/api/v1/messages/{page['id']}") as r:
        assert (await r.json())["acks"][0]["unackedAt"] is not None


async def test_duplicate_callback_acks_once(start_receiver, fake: Fake, am: StubAlertmanager, http):
    rx = await start_receiver(groups=GROUPS, alertmanager={"urls": [am.url]})
    ref = (await _page(http, rx.url, "TwoWayDup"))["ref"]
    body = {"messageId": "x", "replyMessageId": "same-reply", "fromNumber": DB[0].lstrip("+"),
            "text": f"ACK {ref} 30m", "charset": "UTF-8"}
    answers = []
    for _ in range(2):
        async with http.post(f"{rx.url}/callbacks/clickatell/reply", json=body) as r:
            assert r.status == 200
            answers.append((await r.json())["replies"])
    assert answers == [["ack"], ["duplicate"]]
    assert len(am.posts) == 1


async def test_refused_replies_make_no_silence(start_receiver, fake: Fake, am: StubAlertmanager, http):
    rx = await start_receiver(groups=GROUPS, alertmanager={"urls": [am.url]},
                              callbacks={"secret": SECRET})
    ref = (await _page(http, rx.url, "TwoWayRefused"))["ref"]
    url = f"{rx.url}/callbacks/clickatell/reply"
    ack = {"fromNumber": DB[0].lstrip("+"), "text": f"ACK {ref}", "replyMessageId": "f1"}
    async with http.post(url, json=ack) as r:  # forged: no secret
        assert r.status == 401
    async with http.post(f"{url}/wrong-secret", json=ack) as r:
        assert r.status == 401
    async with http.post(f"{url}/{SECRET}", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and "JSON" in (await r.json())["error"]
    stranger = {"fromNumber": "886911000111", "text": f"ACK {ref}", "replyMessageId": "f2"}
    async with http.post(f"{url}/{SECRET}", json=stranger) as r:
        assert r.status == 200 and (await r.json())["replies"] == ["refused"]
    # a member of another group cannot act on db's page
    other = {"fromNumber": "14155550123", "text": f"ACK {ref}", "replyMessageId": "f3"}
    async with http.post(url, json=other, headers={"X-Callback-Secret": SECRET}) as r:
        assert (await r.json())["replies"] == ["refused"]
    async with http.get(f"{url}/{SECRET}", params={"fromNumber": DB[0].lstrip("+"), "text": "ACK 999999",
                                                  "replyMessageId": "f4"}) as r:
        assert (await r.json())["replies"] == ["unknown_page"]
    assert am.posts == []
    assert await _metric(http, rx.url, 'sms_receiver_replies_total{action="refused"}') == 4
    assert await _metric(http, rx.url, 'sms_receiver_replies_total{action="malformed"}') == 1


async def test_help_and_unknown_answer_once(start_receiver, fake: Fake, http):
    rx = await start_receiver(groups=GROUPS)
    fake.state.reply_callback_url = f"{rx.url}/callbacks/clickatell/reply"
    await _reply(http, fake, DB[0], "help")
    for _ in range(3):  # rate limited: one "not understood" per number in UNKNOWN_WINDOW
        await _reply(http, fake, DB[0], "what is going on?")

    async def answered() -> bool:
        texts = await _texts(http, fake, DB[0])
        return any(t.startswith("Reply ACK") for t in texts) and any(t.startswith("Not understood") for t in texts)

    await eventually(answered)
    assert sum(t.startswith("Not understood") for t in await _texts(http, fake, DB[0])) == 1
    assert await _texts(http, fake, DB[1]) == []


async def test_ack_without_alertmanager_is_recorded_and_says_so(start_receiver, fake: Fake, http):
    dead = f"http://127.0.0.1:{free_port()}"
    rx = await start_receiver(groups=GROUPS, alertmanager={"urls": [dead], "timeout": "2s"})
    fake.state.reply_callback_url = f"{rx.url}/callbacks/clickatell/reply"
    page = await _page(http, rx.url, "TwoWayNoAm")
    await _reply(http, fake, DB[1], f"ack {page['ref']}")

    async def confirmed() -> bool:
        return any("SILENCE FAILED" in t for t in await _texts(http, fake, DB[0]))

    await eventually(confirmed)
    async with http.get(f"{rx.url}/api/v1/messages/{page['id']}") as r:
        (ack,) = (await r.json())["acks"]
    assert ack["silenceId"] is None and ack["by"] == "*0998"
    assert await _metric(http, rx.url, 'sms_receiver_silences_total{outcome="failed"}') == 1


async def test_an_ack_whose_reply_was_recorded_before_a_crash_is_not_lost(start_receiver, fake: Fake,
                                                                         am: StubAlertmanager, http):
    """The process died after recording the reply and before the ack: Clickatell's retry acks."""
    rx = await start_receiver(groups=GROUPS, alertmanager={"urls": [am.url]})
    ref = (await _page(http, rx.url, "TwoWayCrash"))["ref"]
    await rx.receiver.store.reply_seen("retried", DB[0], rx.receiver.clock.now(), "ack")
    body = {"replyMessageId": "retried", "fromNumber": DB[0].lstrip("+"), "text": f"ACK {ref}"}
    async with http.post(f"{rx.url}/callbacks/clickatell/reply", json=body) as r:
        assert (await r.json())["replies"] == ["ack"]
    assert len(am.posts) == 1
    assert (await rx.receiver.store.page(ref)).acked_at is not None


async def test_an_ack_stored_before_a_crash_gets_its_silence_when_clickatell_retries(
        start_receiver, fake: Fake, am: StubAlertmanager, http):
    """The process died after storing the ack and before its silence: the retried callback
    (same reply id) makes the silence and the confirmation; a third copy does nothing."""
    from receiver.store import NewAck

    rx = await start_receiver(groups=GROUPS, alertmanager={"urls": [am.url]})
    ref = (await _page(http, rx.url, "TwoWayHalfDone"))["ref"]
    now = rx.receiver.clock.now()
    assert await rx.receiver.store.ack(NewAck("half", ref, DB[0], "*0999", now, now + 600))
    body = {"replyMessageId": "half", "fromNumber": DB[0].lstrip("+"), "text": f"ACK {ref}"}
    for expected in (["ack"], ["duplicate"]):
        async with http.post(f"{rx.url}/callbacks/clickatell/reply", json=body) as r:
            assert (await r.json())["replies"] == expected
    (silence,) = am.posts
    assert silence["matchers"] and "#%d" % ref in silence["comment"]
    (ack,) = (await rx.receiver.store.page(ref)).acks
    assert ack.silence_ids == ("sil-1",) and ack.outcome == "created"


async def test_one_api_ack_without_ref_takes_the_page_replied_to(start_receiver, fake: Fake, am: StubAlertmanager, http):
    rx = await start_receiver(groups=GROUPS, alertmanager={"urls": [am.url]})
    first = await _page(http, rx.url, "TwoWayFirst")
    await _page(http, rx.url, "TwoWaySecond")  # the newest page: a bare ACK would take it
    body = {"event": {"moText": [{"messageId": "mo-1", "relatedClientMessageId": first["id"],
                                  "from": DB[0].lstrip("+"), "content": "ACK", "charset": "UTF-8"}]}}
    async with http.post(f"{rx.url}/callbacks/clickatell/reply", json=body) as r:
        assert (await r.json())["replies"] == ["ack"]
    (silence,) = am.posts
    assert {"name": "alertname", "value": "TwoWayFirst", "isRegex": False, "isEqual": True} in silence["matchers"]


async def test_grafana_page_ack_makes_no_silence_without_grafana_urls(start_receiver, fake: Fake,
                                                                     am: StubAlertmanager, http):
    from tests.helpers import fixture

    rx = await start_receiver(groups=GROUPS, alertmanager={"urls": [am.url]},
                              routes=[{"matchers": ['team="blue"'], "groups": ["db"]}])
    fake.state.reply_callback_url = f"{rx.url}/callbacks/clickatell/reply"
    async with http.post(f"{rx.url}/webhook/grafana", data=fixture("grafana-webhook-firing.json")) as r:
        answer = await r.json()
        assert r.status == 200, answer
    async with http.get(f"{rx.url}/api/v1/messages", params={"notification": answer["notification"]}) as r:
        (page,) = (await r.json())["messages"]
    assert (await _reply(http, fake, DB[0], f"ACK {page['ref']}"))["status"] == 200

    async def confirmed() -> bool:
        return any(t.startswith(f"ACKED #{page['ref']}") and "no silence made" in t
                   for t in await _texts(http, fake, DB[1]))

    await eventually(confirmed)
    assert am.posts == []  # Alertmanager's API is not Grafana's: nothing silenced there
    assert await _metric(http, rx.url, 'sms_receiver_silences_total{outcome="none"}') == 1


@pytest.mark.parametrize("body, problem", [
    (b'{"a":' * 50_000, "nests too deep"),
    (b'{"fromNumber": "886911960999", "text": "ACK", "replyMessageId": "s1\\ud800"}', "not JSON"),
    (b'{"fromNumber": "886911960999", "text": "ACK", "replyMessageId": "s1\\u0001"}', "control character"),
])
def test_hostile_reply_bodies_are_bad_replies_not_errors(body: bytes, problem: str):
    from receiver.twoway import BadReply, parse_reply_callback

    with pytest.raises(BadReply, match=problem):
        parse_reply_callback(body)


def test_a_ucs2_reply_in_hex_is_decoded():
    from receiver.twoway import parse_reply_callback

    (reply,) = parse_reply_callback({"fromNumber": "886911960001", "text": "00410043004B", "charset": "UCS-2"})
    assert reply.text == "ACK"


async def test_answers_to_one_phone_are_limited_whatever_it_sends(start_receiver, fake: Fake, http):
    """HELP, unknown pages, commands on pages of other groups: at most ANSWER_LIMIT SMS to one
    phone in UNKNOWN_WINDOW, so that a phone or a script cannot spend the SMS credit."""
    from receiver.acks import ANSWER_LIMIT

    rx = await start_receiver(groups=GROUPS)
    fake.state.reply_callback_url = f"{rx.url}/callbacks/clickatell/reply"
    for i in range(ANSWER_LIMIT + 4):
        await _reply(http, fake, DB[0], "HELP" if i % 3 == 0 else f"ACK {99990 + i}")

    async def drained() -> bool:
        return len(await _texts(http, fake, DB[0])) >= ANSWER_LIMIT and (await rx.receiver.store.stats()).pending == 0

    await eventually(drained)
    assert len(await _texts(http, fake, DB[0])) == ANSWER_LIMIT
