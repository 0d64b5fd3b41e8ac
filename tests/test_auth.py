"""Authentication (#20 items 4, 6, 7 and non-ASCII credentials): closed by default, the loopback
rule for admin endpoints, Grafana's HMAC timestamp window, each body on its own endpoint, the
callback secret as a path segment, and bytes no credential can be (a 401, never a 5xx).

Everything goes through a real receiver on 127.0.0.1; header bytes aiohttp's client will not
send are written on a raw connection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
from pathlib import Path

import pytest
from aiohttp import web

from receiver.app import Receiver
from receiver.auth import admin_denied, is_loopback
from receiver.clock import FakeClock
from receiver.config import AdminAuth, ConfigError, config_warnings, load_config
from receiver.web import create_app
from tests.helpers import fixture, make_config

ROOT = Path(__file__).parent.parent
JSON = {"Content-Type": "application/json"}
AM = fixture("alertmanager-0.25-firing.json")
GRAFANA = fixture("grafana-webhook-firing.json")


async def post(http, url, body: bytes, headers=None):
    async with http.post(url, data=body, headers={**JSON, **(headers or {})}) as r:
        text = await r.text()
        return r.status, (json.loads(text) if r.content_type == "application/json" else text)


async def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """One HTTP/1.1 request written as bytes (``head``: request line and headers, without the
    blank line), on its own connection to 127.0.0.1; its status and JSON answer."""
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(head + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
                     + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = await asyncio.wait_for(reader.read(), 5)  # Connection: close: read to the end
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    payload = answer.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(payload) if payload.startswith(b"{") else {"raw": payload.decode("latin-1")}


# ---------------------------------------------------------------------------------------------
# The loopback rule, as a pure function (network tests only ever come from 127.0.0.1)


@pytest.mark.parametrize("remote, local", [
    ("127.0.0.1", True), ("127.45.6.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("192.168.1.20", False), ("172.17.0.1", False), ("203.0.113.9", False),
    ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("2001:db8::1", False), ("0.0.0.0", False),
    ("", False), (None, False), ("not-an-address", False),
])
def test_is_loopback(remote, local):
    assert is_loopback(remote) is local


def test_admin_without_credentials_serves_direct_loopback_clients_only():
    none = AdminAuth()
    assert admin_denied(none, None, "127.0.0.1", proxied=False) is None
    assert admin_denied(none, None, "::1", proxied=False) is None
    for remote, proxied in (("10.1.2.3", False), ("2001:db8::1", False), ("127.0.0.1", True), (None, False)):
        denied = admin_denied(none, None, remote, proxied)
        assert denied is not None and denied.status == 403 and "admin_auth" in denied.reason
    opened = AdminAuth(allow_unauthenticated=True)
    assert admin_denied(opened, None, "203.0.113.9", proxied=True) is None
    tokens = AdminAuth(bearer_tokens=["t"], allow_unauthenticated=True)  # ignored: credentials rule
    assert admin_denied(tokens, None, "127.0.0.1", proxied=False).status == 401
    assert admin_denied(tokens, "Bearer t", "203.0.113.9", proxied=False) is None


# ---------------------------------------------------------------------------------------------
# Closed by default


async def test_webhooks_and_callbacks_without_credentials_are_refused(start_receiver, http):
    rx = await start_receiver(webhook_auth={}, callbacks={})
    for path, body in (("/webhook/alertmanager", AM), ("/webhook/grafana", GRAFANA)):
        status, answer = await post(http, f"{rx.url}{path}", body)
        assert status == 401, path
        assert "webhook_auth" in answer["error"] and "allow_unauthenticated" in answer["error"]
    async with http.get(f"{rx.url}/callbacks/clickatell/status", params={"messageId": "x", "statusCode": "4"}) as r:
        assert r.status == 401 and "callbacks.secret" in (await r.json())["error"]
    async with http.get(f"{rx.url}/metrics") as r:  # health and metrics stay open
        assert 'webhooks_received_total{outcome="unauthorized",source="alertmanager"} 1.0' in await r.text()
    async with http.get(f"{rx.url}/-/healthy") as r:
        assert r.status == 200


async def test_allow_unauthenticated_is_ignored_when_credentials_are_configured(start_receiver, http):
    rx = await start_receiver(webhook_auth={"bearer_tokens": ["tok"], "allow_unauthenticated": True},
                              callbacks={"secret": "cb", "allow_unauthenticated": True})
    assert (await post(http, f"{rx.url}/webhook/alertmanager", AM))[0] == 401
    assert (await post(http, f"{rx.url}/webhook/alertmanager", AM, {"Authorization": "Bearer tok"}))[0] == 200
    async with http.get(f"{rx.url}/callbacks/clickatell/status", params={"messageId": "x", "statusCode": "4"}) as r:
        assert r.status == 401
    warnings = "\n".join(config_warnings(rx.receiver.config))
    assert "webhook_auth.allow_unauthenticated is ignored" in warnings
    assert "callbacks.allow_unauthenticated is ignored" in warnings


async def _shipped(aiohttp_server, tmp_path: Path, fake, env: dict[str, str]) -> tuple[str, Receiver]:
    """The repository's config.yaml, as its quickstart runs it (plus an outbox in tmp_path)."""
    cfg = load_config(ROOT / "config.yaml", env={
        "SMS_RECEIVER_STORAGE": f"sqlite://{tmp_path}/outbox.db", "CLICKATELL_BASE_URL": fake.url, **env})
    receiver = Receiver(cfg)
    await receiver.start(dispatch=False)
    server = await aiohttp_server(create_app(receiver), host="127.0.0.1")
    return str(server.make_url("")).rstrip("/"), receiver


async def test_unset_admin_token_does_not_open_send(aiohttp_server, tmp_path, fake, http):
    url, receiver = await _shipped(aiohttp_server, tmp_path, fake, {})
    try:
        items = json.dumps([{"groupId": "web-oncall", "message": "anyone can page?"}]).encode()
        # what any client not on this host looks like to the receiver behind a proxy
        away = {"X-Forwarded-For": "203.0.113.9"}
        status, answer = await post(http, f"{url}/send", items, away)
        assert status == 403 and "admin_auth" in answer["error"]
        async with http.get(f"{url}/api/v1/messages", headers={"Forwarded": "for=203.0.113.9"}) as r:
            assert r.status == 403
        async with http.post(f"{url}/-/reload", headers={"X-Real-IP": "203.0.113.9"}) as r:
            assert r.status == 403
        # the quickstart still works in two commands: webhooks and the API from this host
        assert (await post(http, f"{url}/webhook/alertmanager", AM))[0] == 200
        async with http.get(f"{url}/api/v1/messages") as r:
            assert r.status == 200
    finally:
        await receiver.stop()


async def test_set_admin_token_is_required_even_from_loopback(aiohttp_server, tmp_path, fake, http):
    url, receiver = await _shipped(aiohttp_server, tmp_path, fake, {"ADMIN_TOKEN": "adm-1"})
    try:
        async with http.get(f"{url}/api/v1/groups") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(f"{url}/api/v1/groups", headers={"Authorization": "Bearer adm-1"}) as r:
            assert r.status == 200
    finally:
        await receiver.stop()


def test_shipped_config_listens_on_loopback_and_every_variable_has_a_default():
    lines = (ROOT / "config.yaml").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert re.findall(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", text) == []  # each ${VAR} has a :- default
    cfg = load_config(ROOT / "config.yaml", env={})
    assert cfg.listen == "127.0.0.1:9097"
    assert cfg.webhook_auth.allow_unauthenticated and not cfg.webhook_auth.configured
    assert not cfg.admin_auth.configured and not cfg.admin_auth.allow_unauthenticated
    assert not cfg.callbacks.allow_unauthenticated


# ---------------------------------------------------------------------------------------------
# Grafana: HMAC timestamp window, and each body on its own endpoint


def _signed(body: bytes, secret: bytes, timestamp: str | None) -> dict[str, str]:
    payload = body if timestamp is None else timestamp.encode() + b":" + body
    headers = {"X-Grafana-Alerting-Signature": hmac.new(secret, payload, hashlib.sha256).hexdigest()}
    return headers if timestamp is None else {**headers, "X-Grafana-Alerting-Timestamp": timestamp}


async def test_replayed_grafana_request_with_an_old_timestamp_is_refused(start_receiver, http):
    clock = FakeClock(1_800_000_000.0)
    rx = await start_receiver(
        receiver_kwargs={"clock": clock}, run_dispatcher=False, dedup_window="1m",
        webhook_auth={"grafana_hmac_secret": "hmac-s",
                      "grafana_hmac_timestamp_header": "X-Grafana-Alerting-Timestamp"})
    url = f"{rx.url}/webhook/grafana"
    captured = _signed(GRAFANA, b"hmac-s", str(int(clock.now())))
    assert (await post(http, url, GRAFANA, captured))[0] == 200
    clock.advance(6 * 60)  # past the dedup window and past grafana_hmac_max_age (5m)
    status, answer = await post(http, url, GRAFANA, captured)
    assert status == 401 and "too old" in answer["error"] and "grafana_hmac_max_age (5m)" in answer["error"]
    future = _signed(GRAFANA, b"hmac-s", str(int(clock.now()) + 600))
    status, answer = await post(http, url, GRAFANA, future)
    assert status == 401 and "future" in answer["error"]
    fresh = _signed(GRAFANA, b"hmac-s", str(int(clock.now()) - 100))  # within the window
    assert (await post(http, url, GRAFANA, fresh))[0] == 200
    # the timestamp is part of what is signed: changing it breaks the signature
    forged = {**captured, "X-Grafana-Alerting-Timestamp": str(int(clock.now()))}
    status, answer = await post(http, url, GRAFANA, forged)
    assert status == 401 and "does not match" in answer["error"]
    no_ts = _signed(GRAFANA, b"hmac-s", None)
    status, answer = await post(http, url, GRAFANA, no_ts)
    assert status == 401 and "missing X-Grafana-Alerting-Timestamp" in answer["error"]
    status, answer = await post(http, url, GRAFANA, {**fresh, "X-Grafana-Alerting-Timestamp": "yesterday"})
    assert status == 401 and "not a Unix time" in answer["error"]


async def test_a_body_is_accepted_only_on_its_own_endpoint(start_receiver, http):
    rx = await start_receiver(webhook_auth={"bearer_tokens": ["am-token"], "grafana_hmac_secret": "hmac-s"})
    token = {"Authorization": "Bearer am-token"}
    # the Alertmanager token cannot post a Grafana body unsigned through the Alertmanager endpoint
    status, answer = await post(http, f"{rx.url}/webhook/alertmanager", GRAFANA, token)
    assert status == 422 and "/webhook/grafana" in answer["error"]
    status, answer = await post(http, f"{rx.url}/webhook/grafana", AM, {**token, **_signed(AM, b"hmac-s", None)})
    assert status == 422 and "/webhook/alertmanager" in answer["error"]
    assert (await post(http, f"{rx.url}/webhook/alertmanager", AM, token))[0] == 200
    assert (await post(http, f"{rx.url}/webhook/grafana", GRAFANA, {**token, **_signed(GRAFANA, b"hmac-s", None)}))[0] == 200


async def test_grafana_hmac_secret_alone_guards_only_the_grafana_endpoint(start_receiver, http):
    rx = await start_receiver(webhook_auth={"grafana_hmac_secret": "hmac-s"})
    assert (await post(http, f"{rx.url}/webhook/grafana", GRAFANA, _signed(GRAFANA, b"hmac-s", None)))[0] == 200
    status, answer = await post(http, f"{rx.url}/webhook/alertmanager", AM)
    assert status == 401 and "bearer_tokens" in answer["error"]


def test_grafana_hmac_max_age_must_be_a_positive_duration():
    for bad in ("0s", "soon"):
        with pytest.raises(ConfigError) as info:
            make_config(webhook_auth={"grafana_hmac_max_age": bad})
        assert any(e.startswith("webhook_auth.grafana_hmac_max_age") for e in info.value.errors)
    assert make_config(webhook_auth={"grafana_hmac_max_age": "30s"}).webhook_auth.grafana_hmac_max_age == 30


# ---------------------------------------------------------------------------------------------
# The callback secret: path segment (recommended), header, query


async def test_callback_secret_as_path_segment_header_or_query(start_receiver, http, caplog):
    caplog.set_level(logging.DEBUG)
    rx = await start_receiver(callbacks={"secret": "cb-S3cret_x"})
    base = f"{rx.url}/callbacks/clickatell/status"
    report = {"messageId": "0" * 32, "statusCode": "4"}
    async with http.get(f"{base}/cb-S3cret_x", params=report) as r:
        assert r.status == 200 and (await r.json())["reports"] == 1
    async with http.post(f"{base}/cb-S3cret_x", json=report) as r:
        assert r.status == 200
    async with http.get(f"{base}/wrong", params=report) as r:
        assert r.status == 401 and "callback secret" in (await r.json())["error"]
    async with http.get(base, params=report, headers={"X-Callback-Secret": "cb-S3cret_x"}) as r:
        assert r.status == 200
    async with http.get(base, params={**report, "secret": "cb-S3cret_x"}) as r:
        assert r.status == 200
    async with http.get(base, params=report) as r:
        assert r.status == 401
    async with http.get(f"{base}/almost-cb-S3cret", params=report) as r:
        assert r.status == 401
    # ours (the test server's access log is on; `run` has none)
    logged = "\n".join(rec.getMessage() for rec in caplog.records if rec.name.startswith("sms_receiver"))
    assert "callback" in logged and "cb-S3cret" not in logged  # neither the secret nor a guess
    async with http.get(f"{rx.url}/metrics") as r:
        assert 'sms_receiver_delivery_reports_total{status="unauthorized"} 3.0' in await r.text()


# ---------------------------------------------------------------------------------------------
# Bytes that no credential can be: a 401 with a reason, never a 5xx


async def test_non_ascii_and_invalid_bytes_in_credentials_are_401(start_receiver):
    rx = await start_receiver(
        webhook_auth={"bearer_tokens": ["tok"], "basic_auth": {"username": "am", "password": "pw"},
                      "grafana_hmac_secret": "hmac-s",
                      "grafana_hmac_timestamp_header": "X-Grafana-Alerting-Timestamp"},
        admin_auth={"bearer_tokens": ["adm"]}, callbacks={"secret": "cb"})
    basic_bytes = base64.b64encode(b"\xff\xfe:\xc3\xa9").decode().encode()
    token = b"Authorization: Bearer tok\r\n"
    cases = [
        (b"POST /webhook/alertmanager HTTP/1.1\r\nAuthorization: Bearer t\xc3\xa9k", AM),
        (b"POST /webhook/alertmanager HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\x80", AM),
        (b"POST /webhook/alertmanager HTTP/1.1\r\nAuthorization: B\xe9arer tok", AM),
        (b"POST /webhook/alertmanager HTTP/1.1\r\nAuthorization: Basic " + basic_bytes, AM),
        (b"POST /webhook/alertmanager HTTP/1.1\r\nAuthorization: Basic \xff\xff\xff\xff", AM),
        (b"GET /api/v1/messages HTTP/1.1\r\nAuthorization: Bearer \xffadm", b""),
        (b"GET /callbacks/clickatell/status?messageId=x&statusCode=4 HTTP/1.1\r\nX-Callback-Secret: \xffcb", b""),
        (b"GET /callbacks/clickatell/status?messageId=x&statusCode=4&secret=%ff%fe HTTP/1.1\r\nX-A: b", b""),
        (b"GET /callbacks/clickatell/status/%ff%c3%28?messageId=x&statusCode=4 HTTP/1.1\r\nX-A: b", b""),
        (b"POST /webhook/grafana HTTP/1.1\r\n" + token + b"X-Grafana-Alerting-Signature: \xff\xfe"
         + b"\r\nX-Grafana-Alerting-Timestamp: 1800000000", GRAFANA),
        (b"POST /webhook/grafana HTTP/1.1\r\n" + token + b"X-Grafana-Alerting-Signature: abc"
         + b"\r\nX-Grafana-Alerting-Timestamp: \xd9\xa1\xd9\xa2\xff", GRAFANA),
    ]
    for head, body in cases:
        status, answer = await raw_request(rx.url, head, body)
        assert status == 401, (head, status, answer)
        assert answer.get("status") == "error" and answer.get("error"), (head, answer)


async def test_a_non_ascii_token_matches_the_bytes_sent(start_receiver):
    rx = await start_receiver(webhook_auth={"bearer_tokens": ["tökén"]})
    head = b"POST /webhook/alertmanager HTTP/1.1\r\nAuthorization: Bearer " + "tökén".encode()
    assert (await raw_request(rx.url, head, AM))[0] == 200


async def test_unix_socket_clients_are_not_loopback(tmp_path_factory, start_receiver):
    """A peer without an address (a Unix socket, as a local proxy might use) gets no loopback trust."""
    import aiohttp

    rx = await start_receiver()
    sock = Path(tmp_path_factory.getbasetemp()) / "rx.sock"
    runner = web.AppRunner(create_app(rx.receiver))
    await runner.setup()
    site = web.UnixSite(runner, str(sock))
    await site.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)),
                                         timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get("http://localhost/api/v1/groups") as r:
                assert r.status == 403 and "admin_auth" in (await r.json())["error"]
    finally:
        await runner.cleanup()
