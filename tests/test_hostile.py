"""Hostile input over real HTTP (issue 20, items 1 and 3): input that is the client's fault gets a
4xx with a short JSON reason, is counted and logged in one line; compressed bodies are refused
with 415 on every endpoint before anything inflates them; and a generated-input test (hypothesis)
sends headers, encodings, nesting, numbers, surrogates and odd bodies to every endpoint and fails
on any 5xx."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers import fixture

WEBHOOK_TOKEN = "hook-token-7Qx"
ADMIN_TOKEN = "admin-token-9Kd"
CB_SECRET = "cb-secret-3Zp"
HOOK = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FIRING = fixture("alertmanager-0.25-firing.json")
CB = f"/callbacks/clickatell/status?secret={CB_SECRET}"

# (path, credentials) of every endpoint that takes a body
BODY_ENDPOINTS = [
    ("/webhook/alertmanager", HOOK),
    ("/webhook/grafana", HOOK),
    ("/send", ADMIN),
    (CB, {}),
]


async def start(start_receiver) -> Any:
    return await start_receiver(
        webhook_auth={"bearer_tokens": [WEBHOOK_TOKEN]},
        admin_auth={"bearer_tokens": [ADMIN_TOKEN]},
        callbacks={"secret": CB_SECRET},
    )


async def raw(url: str, path: str, head: bytes, body: bytes = b"", method: bytes = b"POST") -> tuple[int, bytes]:
    """One request written byte for byte (headers may hold any bytes; nothing is added but Host,
    Connection and, unless given, Content-Length); its status and body. Bounded by a timeout."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    try:
        if b"content-length:" not in head.lower() and b"transfer-encoding:" not in head.lower():
            head += b"Content-Length: %d\r\n" % len(body)
        writer.write(b"%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s\r\n" % (
            method, path.encode("latin-1"), host.encode(), head) + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    while data.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue): the final one follows
        data = data.partition(b"\r\n\r\n")[2]
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def bearer(headers: dict[str, str]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())


def gzip_bomb(size: int) -> bytes:
    return gzip.compress(b"{" + b" " * size + b"}", 9)


def counted(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as the client writes them
    m = re.search(rf"^sms_receiver_{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def metrics_text(rx, http) -> str:
    async with http.get(f"{rx.url}/metrics", headers=ADMIN) as r:
        return await r.text()


# ---------------------------------------------------------------------------------------------
# 1. Compressed bodies: 415 on every endpoint, never inflated


@pytest.mark.parametrize("path,creds", BODY_ENDPOINTS)
@pytest.mark.parametrize("encoding,body", [
    ("gzip", gzip_bomb(4 << 20)),  # 4 MB of spaces, past max_body_bytes (1 MiB) once inflated
    ("gzip", b"\x1f\x8b garbage, not gzip"),
    ("deflate", zlib.compress(FIRING)),
    ("br", b"\x0b\x02\x80not brotli"),
    ("gzip, gzip", gzip.compress(gzip.compress(FIRING))),
    ("x-gzip", gzip.compress(FIRING)),
    ("identity, gzip", gzip.compress(FIRING)),
])
async def test_compressed_bodies_are_refused(start_receiver, path, creds, encoding, body):
    rx = await start(start_receiver)
    ctype = b"application/x-www-form-urlencoded" if path == CB else b"application/json"
    status, answer = await raw(rx.url, path, bearer(creds) + b"Content-Type: %s\r\nContent-Encoding: %s\r\n"
                               % (ctype, encoding.encode()), body)
    assert status == 415, answer
    assert "Content-Encoding" in json.loads(answer)["error"]


async def test_compressed_chunked_form_callback_is_refused(start_receiver):
    """Chunked, so no Content-Length to check first: refused from the header, nothing read."""
    rx = await start(start_receiver)
    body = gzip_bomb(4 << 20)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    status, answer = await raw(rx.url, CB, b"Content-Type: application/x-www-form-urlencoded\r\n"
                               b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", chunked)
    assert status == 415, answer


# ---------------------------------------------------------------------------------------------
# 2. Client-fault input: a 4xx with a short JSON reason, counted, one warning line


DEEP = b"[" * 5000 + b"]" * 5000
DEEP_OBJECT = b'{"a":' * 3000 + b"1" + b"}" * 3000
WEBHOOK_CASES = [
    ("deep list", DEEP, 400, "recursion"),
    ("deep object", DEEP_OBJECT, 400, "recursion"),
    ("duplicate key, first invalid", b'{"alerts": 5, "alerts": [{"status": "firing", "labels": {"a": 1}}]}',
     422, "alerts.0.labels.a"),
    ("lone surrogate", b'{"alerts": [{"status": "firing", "labels": {"a": "\\ud800"}}]}', 400, "surrogate pair"),
    ("lone low surrogate in a key", b'{"alerts": [{"status": "firing", "labels": {"\\udc00": "x"}}]}',
     400, "surrogate"),
    ("invalid UTF-8", b'{"alerts": [{"status": "firing", "labels": {"a": "\xff\xfe"}}]}', 400, "JSON"),
    ("1e400", FIRING[:-2] + b', "truncatedAlerts": 1e400}', 422, "truncatedAlerts"),
    ("NaN", FIRING[:-2] + b', "truncatedAlerts": NaN}', 422, "truncatedAlerts"),
    ("huge integer", FIRING[:-2] + b', "truncatedAlerts": ' + b"9" * 5000 + b"}", 400, "number"),
    ("empty", b"", 400, "JSON"),
    ("array", b"[]", 422, "JSON object"),
    ("string", b'"alerts"', 422, "JSON object"),
    ("NUL", b"\x00", 400, "JSON"),
]


@pytest.mark.parametrize("source", ["alertmanager", "grafana"])
@pytest.mark.parametrize("name,body,status,needle", WEBHOOK_CASES, ids=[c[0] for c in WEBHOOK_CASES])
async def test_webhook_client_faults(start_receiver, http, caplog, source, name, body, status, needle):
    rx = await start(start_receiver)
    caplog.set_level(logging.WARNING, logger="sms_receiver")
    caplog.clear()  # start-up warnings
    async with http.post(f"{rx.url}/webhook/{source}", data=body,
                         headers={**HOOK, "Content-Type": "application/json"}) as r:
        assert r.status == status, await r.text()
        assert needle in (await r.json())["error"]
    assert counted(await metrics_text(rx, http), "webhooks_received_total", source=source, outcome="invalid") == 1
    lines = [rec for rec in caplog.records if rec.name.startswith("sms_receiver")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and not lines[0].exc_info


SEND_CASES = [
    ("deep", DEEP, 400, "recursion"),
    ("lone surrogate", b'{"groupId": "db", "message": "x\\ud800"}', 400, "surrogate pair"),
    ("lone surrogate in a variable", b'{"groupId": "db", "useTemplate": true, "variables": {"a": "\\udfff"}}',
     400, "surrogate"),
    ("duplicate key, first invalid", b'{"groupId": 5, "groupId": "ghost", "message": "x"}', 422, "ghost"),
    ("1e400 variable", b'{"groupId": "db", "useTemplate": true, "variables": {"a": 1e400}}', 422, "finite"),
    ("NaN variable", b'{"groupId": "db", "useTemplate": true, "variables": {"a": NaN}}', 400, "JSON"),
    ("NUL in message", b'{"groupId": "db", "message": "a\\u0000b"}', 422, "control"),
    ("huge integer", b'{"groupId": "db", "useTemplate": true, "variables": {"a": ' + b"9" * 5000 + b"}}",
     400, "number"),
    ("invalid UTF-8", b'{"groupId": "db", "message": "\xc3\x28"}', 400, "JSON"),
    ("empty", b"", 400, "JSON"),
    ("empty list", b"[]", 422, "non-empty"),
    ("number", b"5", 422, "non-empty"),
]


@pytest.mark.parametrize("name,body,status,needle", SEND_CASES, ids=[c[0] for c in SEND_CASES])
async def test_send_client_faults(start_receiver, http, caplog, name, body, status, needle):
    rx = await start(start_receiver)
    caplog.set_level(logging.WARNING, logger="sms_receiver")
    caplog.clear()  # start-up warnings
    async with http.post(f"{rx.url}/send", data=body, headers={**ADMIN, "Content-Type": "application/json"}) as r:
        text = await r.text()
        assert r.status == status, text
        assert needle in text
    assert counted(await metrics_text(rx, http), "webhooks_received_total", source="send", outcome="invalid") == 1
    lines = [rec for rec in caplog.records if rec.name.startswith("sms_receiver")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and not lines[0].exc_info


FORM = "application/x-www-form-urlencoded"
CALLBACK_CASES = [
    ("JSON Infinity", "application/json", b'{"messageId": "a1", "statusCode": Infinity}', "statusCode"),
    ("JSON NaN", "application/json", b'{"messageId": "a1", "statusCode": NaN}', "statusCode"),
    ("JSON 1e400", "application/json", b'{"messageId": "a1", "statusCode": 1e400}', "statusCode"),
    ("JSON huge integer", "application/json", b'{"messageId": "a1", "statusCode": ' + b"9" * 5000 + b"}",
     "number"),
    ("JSON big integer", "application/json", b'{"messageId": "a1", "statusCode": 99999999999999999999}',
     "statusCode"),
    ("JSON true", "application/json", b'{"messageId": "a1", "statusCode": true}', "statusCode"),
    ("JSON fraction", "application/json", b'{"messageId": "a1", "statusCode": 4.5}', "statusCode"),
    ("JSON object id", "application/json", b'{"messageId": {"a": 1}, "statusCode": 4}', "messageId"),
    ("JSON deep", "application/json", DEEP_OBJECT, "recursion"),
    ("JSON lone surrogate", "application/json", b'{"messageId": "a\\ud800", "statusCode": 4}', "surrogate pair"),
    ("JSON surrogate status", "application/json", b'{"messageId": "a1", "statusCode": 4, "status": "\\udc80"}',
     "surrogate"),
    ("JSON invalid UTF-8", "application/json", b'{"messageId": "a\xff", "statusCode": 4}', "JSON"),
    ("JSON array", "application/json", b"[]", "JSON object"),
    ("JSON empty", "application/json", b"", "JSON"),
    ("JSON NUL id", "application/json", b'{"messageId": "a\\u0000", "statusCode": 4}', "control"),
    ("One API not a list", "application/json", b'{"event": {"messageStatusUpdate": 5}}', "list"),
    ("One API Infinity", "application/json",
     b'{"event": {"messageStatusUpdate": [{"messageId": "a1", "statusCode": Infinity}]}}', "statusCode"),
    ("form invalid UTF-8", FORM, b"messageId=a%ff&statusCode=4", "UTF-8"),
    ("form raw invalid UTF-8", FORM, b"messageId=a\xff\xfe&statusCode=4", "UTF-8"),
    ("form surrogate", FORM, b"messageId=%ED%A0%80&statusCode=4", "UTF-8"),
    ("form Infinity", FORM, b"messageId=a1&statusCode=Infinity", "statusCode"),
    ("form huge integer", FORM, b"messageId=a1&statusCode=" + b"9" * 5000, "statusCode"),
    ("form empty", FORM, b"", "messageId"),
    ("form NUL", FORM, b"messageId=a%00&statusCode=4", "control"),
    ("form long id", FORM, b"messageId=" + b"a" * 5000 + b"&statusCode=4", "messageId"),
    ("wrong content type", "text/plain", b"messageId=a1&statusCode=4", "JSON"),
]


@pytest.mark.parametrize("name,ctype,body,needle", CALLBACK_CASES, ids=[c[0] for c in CALLBACK_CASES])
async def test_callback_client_faults(start_receiver, http, caplog, name, ctype, body, needle):
    rx = await start(start_receiver)
    caplog.set_level(logging.WARNING, logger="sms_receiver")
    caplog.clear()  # start-up warnings
    async with http.post(f"{rx.url}{CB}", data=body, headers={"Content-Type": ctype}) as r:
        text = await r.text()
        assert r.status == 400, text
        assert needle in json.loads(text)["error"]
        assert CB_SECRET not in text
    assert counted(await metrics_text(rx, http), "delivery_reports_total", status="invalid") == 1
    lines = [rec for rec in caplog.records if rec.name.startswith("sms_receiver")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and not lines[0].exc_info
    assert CB_SECRET not in lines[0].getMessage()


@pytest.mark.parametrize("query", [
    "messageId=%ED%A0%80&statusCode=4",  # a UTF-8-encoded surrogate
    "messageId=a%ff&statusCode=4",
    "messageId=a%zz&statusCode=4%",  # invalid percent-encoding
    "messageId=a%00&statusCode=4",
    "messageId=a1&statusCode=1e400",
    "messageId=a1&statusCode=-0x10",
])
async def test_callback_query_faults(start_receiver, query):
    rx = await start(start_receiver)
    status, answer = await raw(rx.url, f"{CB}&{query}", b"", method=b"GET")
    assert status == 400, answer
    assert "error" in json.loads(answer)


async def test_chunked_form_callback_is_read(start_receiver, http):
    """A chunked form body is parsed from the bytes read under the limit (request.post() would
    read the already-consumed stream and see an empty form)."""
    rx = await start(start_receiver)
    body = b"messageId=abc123&statusCode=4"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    status, answer = await raw(rx.url, CB, b"Content-Type: application/x-www-form-urlencoded\r\n"
                               b"Transfer-Encoding: chunked\r\n", chunked)
    assert (status, json.loads(answer)) == (200, {"status": "ok", "reports": 1})
    assert counted(await metrics_text(rx, http), "delivery_reports_total", status="unknown") == 1


async def test_callback_too_large_is_counted(start_receiver, http):
    rx = await start(start_receiver)
    async with http.post(f"{rx.url}{CB}", data=b"a" * (2 << 20), headers={"Content-Type": FORM}) as r:
        assert r.status == 413
    assert counted(await metrics_text(rx, http), "delivery_reports_total", status="too_large") == 1


async def test_admin_path_with_surrogate_and_bad_query(start_receiver):
    rx = await start(start_receiver)
    for path in ("/api/v1/messages/%ED%A0%80", "/api/v1/messages/a%00b", "/api/v1/messages?since=%ff",
                 "/api/v1/messages?limit=" + "9" * 5000, "/api/v1/messages?since=" + "9" * 400,
                 "/api/v1/messages?since=1e400", "/api/v1/messages?group=%ED%A0%80"):
        status, answer = await raw(rx.url, path, bearer(ADMIN), method=b"GET")
        assert status < 500, (path, answer)


@pytest.mark.parametrize("path", ["/webhook/alertmanager", "/nowhere", "/-/healthy"])
async def test_expect_header_never_500(start_receiver, path):
    """aiohttp's own Expect handler echoes the value in a text answer it cannot encode when the
    value is not UTF-8: a 500 before any middleware. Ours answers 417, and 100-continue works."""
    rx = await start(start_receiver)
    status, answer = await raw(rx.url, path, bearer(HOOK) + b"Expect: \x80\xff\r\n", FIRING)
    assert (status, json.loads(answer)["error"]) == (417, "unsupported Expect header (only 100-continue)")
    status, _ = await raw(rx.url, path, bearer(HOOK) + b"Expect: 100-continue\r\n", FIRING)
    assert status == {"/webhook/alertmanager": 200, "/nowhere": 404, "/-/healthy": 405}[path]


async def test_unknown_paths_and_methods_answer_json(start_receiver, http):
    rx = await start(start_receiver)
    async with http.get(f"{rx.url}/nowhere") as r:
        assert (r.status, (await r.json())["error"]) == (404, "no such endpoint")
    async with http.put(f"{rx.url}/send", headers=ADMIN) as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
    async with http.get(f"{rx.url}/webhook/grafana") as r:
        assert r.status == 405


async def test_unexpected_error_is_a_logged_500(start_receiver, http, caplog):
    """The catch-all: a bug (here, a store that raises something it should not) is a 500 with a
    JSON reason and one error line with its traceback, not aiohttp's text page."""
    rx = await start(start_receiver)

    async def broken(*_: Any) -> Any:
        raise RuntimeError("bug")

    rx.receiver.store.stats = broken  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR)
    async with http.get(f"{rx.url}/api/v1/status", headers=ADMIN) as r:
        assert r.status == 500
        assert (await r.json())["error"] == "internal error"
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info
    assert errors[0].getMessage() == "unexpected error answering GET /api/v1/status"

    rx.receiver.store.delivery_report = broken  # type: ignore[method-assign]
    caplog.clear()
    async with http.get(f"{rx.url}{CB}&messageId=a1&statusCode=4") as r:
        assert r.status == 500 and CB_SECRET not in await r.text()
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == [
        "unexpected error answering GET /callbacks/clickatell/status"]  # the route, not the URL


# ---------------------------------------------------------------------------------------------
# 3. Generated input: every endpoint, any headers, encodings, nesting, numbers; never a 5xx

# (method, path); the callback's secret is in the query, a header or the path (drawn below)
ENDPOINTS = [
    ("POST", "/webhook/alertmanager"), ("POST", "/webhook/grafana"), ("POST", "/send"),
    ("GET", "/callbacks/clickatell/status"), ("POST", "/callbacks/clickatell/status"),
    ("GET", "/api/v1/messages"), ("GET", "/api/v1/messages/{id}"), ("GET", "/api/v1/groups"),
    ("GET", "/api/v1/status"), ("POST", "/-/reload"), ("GET", "/-/healthy"), ("GET", "/-/ready"),
    ("GET", "/metrics"), ("PUT", "/send"), ("GET", "/nowhere"),
]
RIGHT = {"/webhook": HOOK, "/send": ADMIN, "/api": ADMIN, "/-/reload": ADMIN, "/metrics": ADMIN}

header_value = st.one_of(  # raw bytes mostly make aiohttp's parser answer 400 before any handler
    st.binary(max_size=40).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7f)),  # obs-text too
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")
                             .replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"Bearer \xff\xfe", b"Basic \xc3\xa9:\xff", b"Basic " + b"=" * 9, b"Bearer",
                     b"Basic YWRtaW46", "Bearer h\u00e9".encode(), b"sha256=zz", b"-1", b"1e400",
                     ADMIN_TOKEN.encode() + b"\x80", b"100-continue", b"100-Continue"]),
)
header_name = st.one_of(
    st.sampled_from(["Authorization", "Content-Type", "Content-Encoding", "X-Callback-Secret",
                     "X-Grafana-Alerting-Signature", "X-Grafana-Alerting-Timestamp", "Accept",
                     "Accept-Encoding", "X-Forwarded-For", "Forwarded", "Expect", "Cookie"]),
    st.from_regex(r"\AX-[A-Za-z0-9-]{1,12}\Z"),
).map(str.encode)
content_type = st.sampled_from([
    b"application/json", b"application/json; charset=utf-8", b"application/json; charset=latin-1",
    b"application/x-www-form-urlencoded", b"application/x-www-form-urlencoded; charset=utf-16",
    b"text/plain", b"multipart/form-data; boundary=x", b"multipart/form-data", b"", b";;;",
    b"application/\xff\xfe", b"*/*",
])
content_encoding = st.sampled_from([b"gzip", b"deflate", b"br", b"identity", b"gzip, gzip", b"zstd",
                                    b"\xff", b"identity, gzip", b"IDENTITY"])

odd_number = st.sampled_from(["Infinity", "-Infinity", "NaN", "1e400", "-1e400", "1e-400", "-0",
                              "9" * 5000, "9" * 30, "0.1e1", "1E+2", "00", "01", "0x10", "1.", ".5"])
json_string = st.one_of(
    st.text(max_size=20).map(json.dumps),
    st.sampled_from(['"\\ud800"', '"a\\udfff"', '"\\udc00\\ud800"', '"\\u0000"', '"\\uZZZZ"', '"\\x41"',
                     '"\xff"', '"\\u00e9"', '"firing"', '"resolved"', '"db"', '"4"', '""']),
)


def json_text(leaf: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """JSON-ish text: objects may repeat keys, numbers may be out of range, strings may hold
    lone surrogates; sometimes not JSON at all."""
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
            st.lists(st.tuples(st.one_of(json_string, st.sampled_from(
                ['"alerts"', '"status"', '"labels"', '"groupId"', '"message"', '"messageId"',
                 '"statusCode"', '"event"', '"messageStatusUpdate"', '"variables"', '"useTemplate"']
            )), inner), max_size=5).map(lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"),
        ),
        max_leaves=12,
    )


def deep(n: int, kind: str) -> bytes:
    return (b"[" * n + b"]" * n) if kind == "list" else (b'{"a":' * n + b"1" + b"}" * n)


def mutate_fixture(name: str, key: str, value: str) -> bytes:
    doc = fixture(name).decode()
    return doc.replace(f'"{key}":', f'"{key}":{value}, "{key}":', 1).encode()  # a duplicate key


label_set = st.lists(st.tuples(json_string, json_string), min_size=1, max_size=4).map(
    lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}")
webhook_shaped = st.builds(lambda labels, status, n: f'{{"groupKey": "g", "truncatedAlerts": {n}, "alerts": [{{"status": {status},'
              f' "labels": {labels}, "annotations": {labels}, "startsAt": "2026-01-01T00:00:00Z"}}]}}',
              label_set, st.sampled_from(['"firing"', '"resolved"', '"x"']),
              st.one_of(st.just("0"), odd_number))
send_shaped = st.builds(lambda group, msg, var: f'{{"groupId": {group}, "message": {msg}, "variables": {{"a": {var}}}}}',
              st.sampled_from(['"db"', '"web"', '"ghost"', '5']), json_string,
              st.one_of(odd_number, json_string))
callback_shaped = st.one_of(
    st.builds(lambda mid, code, name: f'{{"messageId": {mid}, "clientMessageId": {mid}, "statusCode": {code},'
              f' "status": {name}}}', json_string, st.one_of(st.sampled_from(["4", "true", '"4"']), odd_number),
              json_string),
    st.builds(lambda mid, code: f'{{"event": {{"messageStatusUpdate": [{{"messageId": {mid}, "statusCode": {code}}}]}}}}',
              json_string, st.one_of(odd_number, st.sampled_from(["5", "null", "[]"]))),
)
SHAPED = {"/webhook": webhook_shaped, "/send": send_shaped, "/callbacks": callback_shaped}

body_strategy = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    json_text(st.one_of(json_string, odd_number, st.sampled_from(["true", "null", "1", "4"]))).map(
        lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(deep, st.integers(0, 4000), st.sampled_from(["list", "object"])),
    st.builds(mutate_fixture, st.sampled_from(["alertmanager-0.25-firing.json", "grafana-webhook-firing.json"]),
              st.sampled_from(["alerts", "labels", "status", "truncatedAlerts", "startsAt"]),
              st.one_of(odd_number, json_string, st.just("{}"))),
    st.sampled_from([FIRING, fixture("grafana-webhook-firing.json"),
                     b'{"groupId": "db", "message": "hello"}', b'[{"groupId": "db", "useTemplate": true}]',
                     b"messageId=abc&statusCode=4", b'{"messageId": "abc", "statusCode": 4}',
                     b"a" * 20000]),  # past max_body_bytes
    st.lists(st.tuples(st.sampled_from(["messageId", "statusCode", "clientMessageId", "status", "secret",
                                        "apiMessageId", "x"]),
                       st.one_of(odd_number, st.sampled_from(["%ED%A0%80", "%ff", "%zz", "%", "%00", "4", "+",
                                                              "\xe9", "a" * 300])))
             , max_size=5).map(lambda kv: "&".join(f"{k}={v}" for k, v in kv).encode()),
)
query_strategy = st.one_of(
    st.just(""),
    st.lists(st.tuples(st.sampled_from(["since", "limit", "status", "state", "group", "notification",
                                        "messageId", "statusCode", "secret"]),
                       st.one_of(odd_number, st.sampled_from(["%ED%A0%80", "%ff", "%zz", "%", "%00", "1h", "-1h",
                                                              "9999999999h", "2026-13-45T99:00:00Z", "sent", "\xed\xa0\x80", "\xff",
                                                              "4", "abc", "1e400s", "0", "1001"]))),
             max_size=4).map(lambda kv: "&".join(f"{k}={v}" for k, v in kv)),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, bytes, bytes]:
    """(method, target, header block, body): a request as bytes on the wire."""
    method, path = draw(st.sampled_from(ENDPOINTS))
    if "{id}" in path:
        path = path.replace("{id}", draw(st.sampled_from(["abc", "%ED%A0%80", "a%00b", "%ff", "..%2F..", "x" * 3000,
                                                          "0190c0ffee0000000000", "\xed\xa0\x80", "\xff\xfe"])))
    head = b""
    creds = next((v for k, v in RIGHT.items() if path.startswith(k)), {})
    if draw(st.integers(0, 9)) > 0:  # mostly past authentication, to reach the handlers
        head += bearer(creds)
    query = draw(query_strategy)
    if path.startswith("/callbacks"):
        where = draw(st.sampled_from(["query", "header", "path", "none"]))
        if where == "query":
            query = f"secret={CB_SECRET}&{query}"
        elif where == "header":
            head += f"X-Callback-Secret: {CB_SECRET}\r\n".encode()
        elif where == "path":
            path += f"/{CB_SECRET}"
    target = path + (f"?{query}" if query else "")
    for name, value in draw(st.lists(st.tuples(header_name, header_value), max_size=2)):
        head += name + b": " + value + b"\r\n"
    body = b""
    if method != "GET" or draw(st.booleans()):
        shaped = next((v for k, v in SHAPED.items() if path.startswith(k)), None)
        if shaped is not None and draw(st.booleans()):  # the shape it expects, with odd values
            body = draw(shaped).encode("utf-8", "surrogatepass")
        else:
            body = draw(body_strategy)
        head += b"Content-Type: " + draw(content_type) + b"\r\n"
        if draw(st.integers(0, 5)) == 0:
            head += b"Content-Encoding: " + draw(content_encoding) + b"\r\n"
        if draw(st.integers(0, 5)) == 0:  # chunked, in two chunks
            half = len(body) // 2
            body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]) if part)
            body += b"0\r\n\r\n"
            head += b"Transfer-Encoding: chunked\r\n"
    return method, target, head, body


@pytest.fixture
async def hostile_receiver(start_receiver):
    return await start_receiver(
        webhook_auth={"bearer_tokens": [WEBHOOK_TOKEN]},
        admin_auth={"bearer_tokens": [ADMIN_TOKEN]},
        callbacks={"secret": CB_SECRET},
        max_body_bytes=16384,  # "huge" bodies stay cheap to generate
    )


@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(request=requests())
async def test_generated_requests_never_get_a_5xx(hostile_receiver, caplog, request):
    """A 5xx means the receiver blamed itself for the client's input (a sender would retry it
    forever); any status below 500 (or aiohttp's own 400 for a malformed request) is fine. Our
    own log lines about it are warnings at most, without a traceback."""
    method, target, head, body = request
    caplog.clear()
    status, answer = await raw(hostile_receiver.url, target, head, body, method=method.encode())
    event(f"{method} {target.split('?')[0][:30]} -> {status}")
    assert status < 500, (status, answer[:300])
    if answer.startswith(b"{"):  # ours; aiohttp's own 400 for a malformed request line echoes it
        assert CB_SECRET.encode() not in answer and ADMIN_TOKEN.encode() not in answer
    ours = [r for r in caplog.records if r.name.startswith("sms_receiver")]
    assert not [r for r in ours if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in ours]


# ---------------------------------------------------------------------------------------------
# NUL: valid JSON, but no PostgreSQL text holds it


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_nul_in_alert_data_is_paged_on_both_backends(start_receiver, fake, http, backend):
    from tests.conftest import eventually, planned

    rx = await start_receiver()
    body = json.loads(fixture("alertmanager-0.25-firing.json"))
    alert = body["alerts"][0]
    alert["labels"]["alertname"] = "Disk\u0000Full"
    alert["labels"]["x\u0000y"] = "1"
    alert["annotations"]["summary"] = "a\u0000b"
    body["commonLabels"]["alertname"] = "Disk\u0000Full"
    async with http.post(f"{rx.url}/webhook/alertmanager", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    (mid, *_) = await planned(http, rx.url, answer)

    async def sent() -> bool:
        async with http.get(f"{rx.url}/api/v1/messages/{mid}") as r:
            return (await r.json())["state"] == "sent"

    await eventually(sent)
    texts = [m["content"] for m in await fake.messages(http)]
    assert texts and "\x00" not in texts[0] and "Disk\ufffdFull" in texts[0]
    # ids and filters with a NUL: a client's mistake, not the store's failure
    async with http.get(f"{rx.url}/api/v1/messages/a%00b") as r:
        assert r.status in (400, 404), await r.text()
    async with http.get(f"{rx.url}/api/v1/messages", params={"group": "\x00"}) as r:
        assert r.status in (200, 400), await r.text()


async def test_refused_requests_are_all_counted_but_their_log_lines_are_limited(start_receiver, http, caplog):
    """An unauthenticated client cannot fill the disk with our warnings: 20 lines per 10 s, then
    a count in the next line that goes out; the metric counts every refusal."""
    from receiver.clock import FakeClock

    clock = FakeClock()
    rx = await start_receiver(webhook_auth={"bearer_tokens": ["t0k"]}, receiver_kwargs={"clock": clock})
    caplog.set_level(logging.WARNING, logger="sms_receiver")
    for _ in range(50):
        async with http.post(f"{rx.url}/webhook/alertmanager", data=b"{}") as r:
            assert r.status == 401
    lines = [r for r in caplog.records if "outcome=unauthorized" in r.getMessage()]
    assert len(lines) == 20
    clock.advance(10)
    async with http.post(f"{rx.url}/webhook/alertmanager", data=b"{}") as r:
        assert r.status == 401
    last = [r.getMessage() for r in caplog.records if "outcome=unauthorized" in r.getMessage()][-1]
    assert "(and 30 more refused requests not logged)" in last
    assert rx.receiver.metrics.registry.get_sample_value(
        "sms_receiver_webhooks_received_total", {"source": "alertmanager", "outcome": "unauthorized"}) == 51
