"""The HTTP listener (receiver/listener.py) over real connections on 127.0.0.1: phase timeouts,
the connection cap, TLS with a certificate renewed by a reload, and the HTTP server's own
errors kept free of secrets; plus the log formats' one-record-one-line rule."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from receiver.app import Receiver
from receiver.config import ConfigError, load_config
from receiver.listener import Listener
from receiver.tls import TlsError, load_tls
from receiver.logs import JsonFormatter, RedactKeys, ScrubQueries, TextFormatter
from receiver.web import create_app
from tests.conftest import API_KEY, Fake, eventually
from tests.helpers import BASE, fixture

TOKEN = "hook-token-5e1f"
ADMIN = "admin-token-77aa"
SECRET = "cb-secret-TOPSECRET-91"
HOOK = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@dataclass
class Served:
    receiver: Receiver
    listener: Listener
    config: Path
    port: int

    def closed(self, reason: str) -> float:
        return self.receiver.metrics.registry.get_sample_value(
            "sms_receiver_http_connections_closed_total", {"reason": reason}) or 0.0

    def open(self) -> float:
        return self.receiver.metrics.registry.get_sample_value("sms_receiver_http_connections") or 0.0


def write_config(path: Path, fake: Fake, **overrides: Any) -> None:
    doc = {**BASE, "storage": f"sqlite://{path.parent}/outbox.db",
           "clickatell": {"api_key": API_KEY, "base_url": fake.url, "timeout": "2s"},
           "webhook_auth": {"bearer_tokens": [TOKEN]}, "admin_auth": {"bearer_tokens": [ADMIN]},
           "callbacks": {"secret": SECRET}, **overrides}
    path.write_text(yaml.safe_dump(doc))


@pytest.fixture
async def serve(tmp_path: Path, fake: Fake) -> AsyncIterator[Any]:
    """``await serve(server={...})``: the receiver behind the real listener, as ``run`` starts it."""
    running: list[tuple[Listener, web.AppRunner, Receiver]] = []

    async def start(*, routes: web.RouteTableDef | None = None, **overrides: Any) -> Served:
        path = tmp_path / "config.yaml"
        write_config(path, fake, **overrides)
        cfg = load_config(path)
        receiver = Receiver(cfg, config_path=path)
        listener = Listener(settings=lambda: receiver.config.server, metrics=receiver.metrics,
                            clock=receiver.clock)
        listener.load_tls(cfg)
        receiver.reload_hooks.append(listener.reload_tls)
        await listener.bind("127.0.0.1", 0)
        await receiver.start()
        app = create_app(receiver)
        if routes is not None:
            app.router.add_routes(routes)
        listener.install(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await listener.serve(runner)
        running.append((listener, runner, receiver))
        return Served(receiver, listener, path, listener.port)

    yield start
    for listener, runner, receiver in running:
        await listener.close()
        await runner.cleanup()
        await receiver.stop()


def _stalled(port: int, n: int, data: bytes) -> list[socket.socket]:
    """``n`` connections that each send ``data`` and then nothing (blocking sockets: a thread)."""
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(data)
        out.append(s)
    return out


def _is_closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1024) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


async def test_header_only_flood_leaves_room_for_a_webhook_and_is_timed_out(serve):
    n, cap = 3000, 1000
    srv = await serve(server={"max_connections": cap, "header_timeout": "2s"})
    headers_only = b"POST /webhook/alertmanager HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
    socks = await asyncio.to_thread(_stalled, srv.port, n, headers_only)
    try:
        async def all_seen() -> bool:  # every stalled connection was accepted (or evicted)
            return srv.open() + srv.closed("limit") + srv.closed("header_timeout") >= n
        await eventually(all_seen, timeout=30)
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as http:  # a new connection, while the cap is reached
            started = loop.time()
            async with http.post(f"http://127.0.0.1:{srv.port}/webhook/alertmanager", headers=HOOK,
                                 data=fixture("alertmanager-0.25-firing.json")) as resp:
                assert resp.status == 200, await resp.text()
            took = loop.time() - started
        assert took < 1.0, f"the webhook took {took:.3f}s under {n} stalled connections"
        assert srv.closed("limit") >= n - cap  # the oldest stalled ones made room

        async def all_closed() -> bool:
            return srv.closed("limit") + srv.closed("header_timeout") >= n and srv.open() == 0
        await eventually(all_closed, timeout=30)
        assert srv.closed("header_timeout") >= 1

        async def sockets_closed() -> bool:
            return all(_is_closed(s) for s in socks)
        await eventually(sockets_closed, timeout=10)
    finally:
        for s in socks:
            s.close()


async def test_a_stalled_body_and_an_idle_keep_alive_connection_are_closed(serve):
    srv = await serve(server={"body_timeout": "300ms", "idle_timeout": "600ms", "header_timeout": "5s"})
    stalled_body = (b"POST /webhook/alertmanager HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"a\"")
    idle = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"
    (body,) = await asyncio.to_thread(_stalled, srv.port, 1, stalled_body)
    (kept,) = await asyncio.to_thread(_stalled, srv.port, 1, idle)
    try:
        async def both() -> bool:
            return srv.closed("body_timeout") == 1 and srv.closed("idle_timeout") == 1
        await eventually(both, timeout=10)
        kept.settimeout(5)
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")  # answered, then closed once idle
        await eventually(lambda: _async(_is_closed(body) and _is_closed(kept)), timeout=5)
        assert srv.closed("header_timeout") == 0 and srv.closed("limit") == 0
    finally:
        body.close()
        kept.close()


async def _async(value: bool) -> bool:
    return value


async def test_at_the_cap_the_oldest_waiting_connection_is_closed_first(serve):
    srv = await serve(server={"max_connections": 3})
    first = await asyncio.to_thread(_stalled, srv.port, 1, b"GET /-/heal")
    await eventually(lambda: _async(srv.open() == 1))
    later = await asyncio.to_thread(_stalled, srv.port, 2, b"GET /-/heal")
    try:
        await eventually(lambda: _async(srv.open() == 3))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{srv.port}/-/healthy") as resp:
                assert resp.status == 200
        assert srv.closed("limit") == 1
        await eventually(lambda: _async(_is_closed(first[0])))
        assert not any(_is_closed(s) for s in later)
    finally:
        for s in first + later:
            s.close()


# ---------------------------------------------------------------------------------------------
# TLS


def _self_signed(directory: Path, name: str) -> None:
    import os
    import shutil

    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is required in CI (.ci/run installs it)")
        pytest.skip("the openssl command is not installed (apt-get install openssl)")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt")],
                   check=True, capture_output=True, timeout=30)


def _client(directory: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(directory / "tls.crt"))


async def _served_name(port: int, directory: Path) -> str:
    """The common name of the certificate a new connection is served (verified against the file)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client(directory))
    cert = writer.get_extra_info("peercert")
    writer.close()
    return dict(x[0] for x in cert["subject"])["commonName"]


async def test_https_webhook_and_a_reload_serves_the_renewed_certificate(serve, tmp_path: Path):
    _self_signed(tmp_path, "first")
    srv = await serve(server={"tls": {"cert_file": "tls.crt", "key_file": "tls.key"}})
    url = f"https://127.0.0.1:{srv.port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client(tmp_path))) as http:
        async with http.post(f"{url}/webhook/alertmanager", headers=HOOK,
                             data=fixture("alertmanager-0.25-firing.json")) as resp:
            assert resp.status == 200, await resp.text()
    assert await _served_name(srv.port, tmp_path) == "first"

    (tmp_path / "tls.key").write_text("not a key\n")  # a broken renewal: refused, the old cert stays
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client(tmp_path))) as http:
        async with http.post(f"{url}/-/reload", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            text = await resp.text()
            assert resp.status >= 400 and "server.tls.key_file" in text and "tls.key" in text, text
            assert "not a key" not in text

    _self_signed(tmp_path, "renewed")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
        async with http.post(f"{url}/-/reload", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 200, await resp.text()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client(tmp_path))) as http:
        async with http.get(f"{url}/-/healthy") as resp:
            assert resp.status == 200
    assert await _served_name(srv.port, tmp_path) == "renewed"


async def test_tls_handshakes_in_progress_are_capped(serve, tmp_path: Path):
    """Bare ClientHello starts hold buffers until they end: at most MAX_HANDSHAKES are kept (the
    oldest closed first), and a real client still gets in."""
    from receiver.listener import MAX_HANDSHAKES

    _self_signed(tmp_path, "first")
    srv = await serve(server={"tls": {"cert_file": "tls.crt", "key_file": "tls.key"}})
    stalled = []
    for _ in range(MAX_HANDSHAKES + 40):
        _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"\x16\x03\x01")  # the start of a record, never finished
        stalled.append(writer)
    limit = srv.receiver.metrics.http_closed.labels("limit")

    async def capped() -> bool:
        return limit._value.get() >= 40

    await eventually(capped)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client(tmp_path))) as http:
        async with http.get(f"https://127.0.0.1:{srv.port}/-/healthy") as resp:
            assert resp.status == 200
    for writer in stalled:
        writer.close()


def test_a_bad_certificate_or_key_is_an_error_naming_the_file(tmp_path: Path):
    from receiver.config.model import TlsConfig

    def tls(cert: str, key: str) -> TlsConfig:  # relative to the config file's directory
        return TlsConfig.model_validate({"cert_file": cert, "key_file": key},
                                        context={"base_dir": str(tmp_path)})

    with pytest.raises(TlsError, match=r"server.tls.cert_file: cannot read '.*missing.crt': No such file"):
        load_tls(tls("missing.crt", "k"))
    _self_signed(tmp_path, "a")
    (tmp_path / "other").mkdir()
    _self_signed(tmp_path / "other", "b")
    with pytest.raises(TlsError, match=r"server.tls.key_file: '.*other/tls.key' is not the key of the certificate"):
        load_tls(tls("tls.crt", "other/tls.key"))
    (tmp_path / "bad.crt").write_text("hello\n")
    with pytest.raises(TlsError, match=r"server.tls.cert_file: '.*bad.crt' holds no PEM certificate"):
        load_tls(tls("bad.crt", "tls.key"))
    assert load_tls(tls(str(tmp_path / "tls.crt"), "tls.key")) is not None


def test_check_config_reports_a_bad_certificate_with_the_other_errors(tmp_path: Path):
    (tmp_path / "bad.crt").write_text("hello\n")
    (tmp_path / "c.yaml").write_text(
        "grups: []\nserver: {tls: {cert_file: bad.crt, key_file: bad.key}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "c.yaml")
    errors = caught.value.errors
    assert any(e.startswith("grups: unknown key") for e in errors), errors
    assert any(e.startswith("server.tls.key_file: cannot read") and "bad.key" in e for e in errors), errors


# ---------------------------------------------------------------------------------------------
# secrets and log lines


@pytest.fixture
def captured():
    """The process's log output in both formats, through the CLI's filters."""
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    handlers = []
    for fmt, stream in streams.items():
        h = logging.StreamHandler(stream)
        h.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
        h.addFilter(RedactKeys())
        h.addFilter(ScrubQueries())
        handlers.append(h)
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    for h in handlers:
        root.addHandler(h)
    yield streams
    for h in handlers:
        root.removeHandler(h)
    root.setLevel(old)


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("request_bytes", [
    b"GET /callbacks/clickatell/status?secret=" + SECRET.encode() + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /callbacks/clickatell/status?secret=" + SECRET.encode() + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    b"GET /callbacks/clickatell/status HTTP/1.1\r\nX-Callback-Secret: " + SECRET.encode() + b"a" * 9000 + b"\r\n\r\n",
    b"GET /callbacks/clickatell/status?secret=" + SECRET.encode() + b" HTTP/1.1\r\nBad\x00Header: 1\r\n\r\n",
    # the secret as a path segment: aiohttp's Python parser quotes the bare path in its error
    b"GET /callbacks/clickatell/status/" + SECRET.encode() + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /callbacks/clickatell/status/" + SECRET.encode() + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
], ids=["control-char", "long-line", "long-header", "bad-header", "path-control-char", "path-long-line"])
async def test_the_http_servers_own_errors_never_show_the_request(serve, captured, request_bytes: bytes):
    srv = await serve()
    answer = await asyncio.to_thread(_raw, srv.port, request_bytes)
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    assert SECRET.encode() not in answer and b"?secret" not in answer
    for fmt, stream in captured.items():
        text = stream.getvalue()
        assert "bad HTTP request from 127.0.0.1" in text, fmt
        assert SECRET not in text and "secret=" not in text, (fmt, text)


async def test_a_handler_bug_is_logged_with_its_traceback_but_without_query_strings(serve, captured):
    routes = web.RouteTableDef()

    @routes.get("/boom")
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError(f"bug while handling {request.path_qs}")  # as a careless message would

    srv = await serve(routes=routes)
    answer = await asyncio.to_thread(
        _raw, srv.port, b"GET /boom?secret=" + SECRET.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b" 500 " in answer.split(b"\r\n")[0] and SECRET.encode() not in answer
    for fmt, stream in captured.items():
        text = stream.getvalue()
        assert "RuntimeError: bug while handling /boom?" in text.replace('\\n', '\n'), (fmt, text)
        assert "Traceback" in text and SECRET not in text, (fmt, text)


async def test_a_forged_line_in_an_alertname_stays_inside_its_record(serve, captured):
    srv = await serve()
    forged = "2026-12-05 06:00:00,000 CRITICAL sms_receiver: forged"
    payload = json.loads(fixture("alertmanager-0.25-resolved.json"))
    for alert in payload["alerts"]:  # to the info group (default, send_resolved off): dropped, logged
        alert["labels"] = {"alertname": f"Evil\n{forged}\r\x1b[2K", "severity": "info"}
    payload["commonLabels"] = payload["groupLabels"] = {}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{srv.port}/webhook/alertmanager", headers=HOOK,
                             json=payload) as resp:
            assert resp.status == 200, await resp.text()

    async def logged() -> bool:
        return "dropped Evil" in captured["text"].getvalue()
    await eventually(logged)
    text = captured["text"].getvalue()
    assert not any(line.startswith(forged) for line in text.splitlines())
    assert "Evil\\n2026-12-05" in text and "\\r\\x1b[2K" in text and "\x1b" not in text
    for line in captured["json"].getvalue().splitlines():  # JSON: one object per line already
        json.loads(line)
    assert "dropped Evil" in captured["json"].getvalue()


def test_text_format_escapes_values_and_indents_continuation_lines():
    fmt = TextFormatter()
    record = logging.makeLogRecord({"msg": "reload failed:\n  %s", "args": ("a\u2028b\x85c",),
                                    "levelname": "ERROR", "name": "sms_receiver"})
    first, second = fmt.format(record).split("\n")
    assert first.endswith("reload failed:") and second == "      a\\u2028b\\x85c"
    json_line = JsonFormatter().format(logging.makeLogRecord({"msg": "%s", "args": ("x\u2028y\n",)}))
    assert len(json_line.splitlines()) == 1 and json.loads(json_line)["msg"] == "x\u2028y\n"


@pytest.mark.parametrize("path", ["/webhook/alertmanager", "/send", f"/callbacks/clickatell/status/{SECRET}"])
async def test_a_client_gone_mid_body_is_one_line_not_a_traceback(serve, captured, path: str):
    srv = await serve()
    auth = f"Bearer {ADMIN if path == '/send' else TOKEN}"
    _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n[1,2".encode())
    await writer.drain()
    writer.close()

    async def told() -> bool:
        return "client disconnected before it was answered" in captured["text"].getvalue()

    await eventually(told)
    for fmt, stream in captured.items():
        text = stream.getvalue()
        assert "Traceback" not in text and "Error handling request" not in text, (fmt, text)
        assert SECRET not in text, fmt
