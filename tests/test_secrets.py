"""The secrets audit: every route the app registers, with wrong, missing and right credentials
and good and bad bodies, through the production listener; a failing Clickatell key; a reload
that fails. None of the configured secrets may appear in any log line (text and JSON), any
answer (body or header) or /metrics."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import re
import time
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from receiver.web import create_app
from tests.conftest import eventually
from tests.helpers import fixture
from tests.test_listener import captured, serve  # noqa: F401  (fixtures)

WH_TOKEN = "whtok-Q7zLk2PfXv9"
WH_PASS = "whpass-Hq3mNvB8x"
HMAC_SECRET = "hmac-w8Rt5Yu2Kk"
ADMIN_TOKEN = "admtok-Jc4Vb7Nm1"
CB_SECRET = "cbsec-Pq9Ws3Ed6"
API_KEY = "apikey-Zx5Cv8Bn2Mq"
SECRETS = (WH_TOKEN, WH_PASS, HMAC_SECRET, ADMIN_TOKEN, CB_SECRET, API_KEY,
           base64.b64encode(f"hook:{WH_PASS}".encode()).decode())
TS_HEADER = "X-Grafana-Alerting-Signature-Timestamp"


def _overrides(fake_url: str) -> dict[str, Any]:
    return {
        "clickatell": {"api_key": API_KEY, "base_url": fake_url, "timeout": "2s"},
        "webhook_auth": {"bearer_tokens": [WH_TOKEN], "basic_auth": {"username": "hook", "password": WH_PASS},
                         "grafana_hmac_secret": HMAC_SECRET, "grafana_hmac_timestamp_header": TS_HEADER},
        "admin_auth": {"bearer_tokens": [ADMIN_TOKEN]},
        "callbacks": {"secret": CB_SECRET},
        "dispatch": {"retry_initial": "20ms", "retry_max": "100ms", "poll_interval": "50ms"},
    }


def _paths(pattern: str) -> list[str]:
    """A route's pattern made concrete: the secret, a wrong one, ids that do not exist."""
    if "{secret}" in pattern:
        return [pattern.replace("{secret}", CB_SECRET), pattern.replace("{secret}", CB_SECRET[:-1] + "X")]
    return [re.sub(r"\{[^}]+\}", "nope", pattern)]


def _credentials(path: str) -> list[dict[str, str]]:
    basic = base64.b64encode(f"hook:{WH_PASS}".encode()).decode()
    wrong_basic = base64.b64encode(f"hook:{WH_PASS}x".encode()).decode()
    return [
        {},
        {"Authorization": f"Bearer {WH_TOKEN}"},
        {"Authorization": f"Basic {basic}"},
        {"Authorization": f"Basic {wrong_basic}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"X-Callback-Secret": CB_SECRET},
        {"X-Callback-Secret": CB_SECRET + "x"},
    ]


def _signed(body: bytes, ts: int) -> dict[str, str]:
    sig = hmac.new(HMAC_SECRET.encode(), str(ts).encode() + b":" + body, hashlib.sha256).hexdigest()
    return {"X-Grafana-Alerting-Signature": sig, TS_HEADER: str(ts)}


BODIES = [
    b"",
    fixture("alertmanager-0.25-firing.json"),
    fixture("grafana-webhook-firing.json"),
    b'[{"groupId": "db", "message": "hello"}]',
    b"{" * 3000,
    b'{"a": "\\ud800"}',
    b"messageId=1&statusCode=Infinity&to=" + CB_SECRET.encode(),
    gzip.compress(b'{"a": 1}'),
]


async def test_no_secret_in_any_log_answer_or_metric(serve, captured, fake, tmp_path):  # noqa: F811
    srv = await serve(**_overrides(fake.url))
    base = f"http://127.0.0.1:{srv.port}"
    routes = sorted({(r.method, r.resource.canonical) for r in create_app(srv.receiver).router.routes()
                     if r.resource is not None})
    seen: list[str] = []

    async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> None:
        async with http.request(method, url, **kw) as resp:
            seen.append(f"{resp.status} {dict(resp.headers)} {await resp.text(errors='replace')}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for method, pattern in routes:
            for path in _paths(pattern):
                for query in ("", f"?secret={CB_SECRET}", "?secret=wrong&x=%ZZ"):
                    for headers in _credentials(path):
                        methods = ("GET", "POST") if method == "*" else (method,)
                        for m in methods:
                            bodies = BODIES if m == "POST" else [None]
                            for body in bodies:
                                h = dict(headers)
                                if body is not None and body.startswith(b"\x1f\x8b"):
                                    h["Content-Encoding"] = "gzip"
                                await call(http, m, base + path + query, data=body, headers=h)
        # Grafana: signed, then replayed with an old timestamp; a wrong signature
        g = fixture("grafana-webhook-firing.json")
        now = int(time.time())
        for ts in (now, now - 3600):
            await call(http, "POST", f"{base}/webhook/grafana", data=g,
                       headers={"Authorization": f"Bearer {WH_TOKEN}", **_signed(g, ts)})
        await call(http, "POST", f"{base}/webhook/grafana", data=g,
                   headers={"Authorization": f"Bearer {WH_TOKEN}", "X-Grafana-Alerting-Signature": "00",
                            TS_HEADER: str(now)})

        # Clickatell refuses the key: the dispatcher's error paths log and count
        await fake.mode(http, global_error={"code": 1, "status": 401})
        failed = srv.receiver.metrics.registry

        async def refused() -> bool:
            return (failed.get_sample_value("sms_receiver_clickatell_requests_total",
                                            {"api": "rest", "outcome": "config", "status_code": "401"}) or 0) > 0

        body = fixture("alertmanager-0.25-grouped-firing.json").replace(b"DiskFull", b"DiskFullAudit")
        await call(http, "POST", f"{base}/webhook/alertmanager", data=body,
                   headers={"Authorization": f"Bearer {WH_TOKEN}"})
        await eventually(refused, timeout=10)

        # a reload that fails, with secrets in the broken file
        doc = yaml.safe_load(srv.config.read_text())
        doc["groups"][0]["members"] = ["not-a-number"]
        doc["webhook_auth"]["basic_auth"]["password"] = ""
        srv.config.write_text(yaml.safe_dump(doc))
        await call(http, "POST", f"{base}/-/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert seen[-1].startswith("400"), seen[-1]

        async with http.get(f"{base}/metrics") as resp:
            metrics = await resp.text()
    await asyncio.sleep(0)  # nothing to wait for: every answer above was read in full

    assert len(seen) > 500, len(seen)
    assert not any(s.startswith("5") for s in seen), [s for s in seen if s.startswith("5")][:3]
    places = {"answers": "\n".join(seen), "metrics": metrics,
              **{f"log ({fmt})": stream.getvalue() for fmt, stream in captured.items()}}
    for where, text in places.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} appears in {where}"
    assert "Traceback" not in places["log (text)"]


def _unused(_: web.Application) -> None:  # keeps the import for type checkers
    return None
