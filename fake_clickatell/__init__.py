"""A faithful local stand-in for Clickatell (``sms-receiver fake-clickatell``), per
``reference/clickatell-api.md``: REST ``POST /messages``, HTTP ``GET /messages/http/send``, One API
``POST /v1/message``, balances and message status, with switchable error modes.

A tool for trying the receiver without an account and for its tests, kept outside the runtime
package ``receiver`` (which never imports it).

Control endpoints (the fake's own, under ``/_fake/``):

- ``GET /_fake/messages``: every accepted SMS (api, to, content, from, clientMessageId,
  apiMessageId, received_at);
- ``GET /_fake/requests``: send requests counted by API and HTTP status, and ``in_flight``:
  send requests received and not answered yet;
- ``POST /_fake/mode``: JSON with any of ``global_error`` (``{"code": 108, "status": 401}`` or
  null), ``reject_numbers`` (``{"886911960998": 105}``), ``fail_next`` (``{"count": 2,
  "status": 503, "retry_after": 1}``), ``delay`` (seconds before each send is processed),
  ``answer_delay`` (seconds between accepting a send's messages and answering it: the window
  in which a sender that dies has had its SMS sent without learning so), ``balance``,
  ``currency``;
- ``POST /_fake/reset``: forget messages, counters and modes;
- ``POST /_fake/reply``: JSON ``{"from": "886911960999", "text": "ACK 42", "to": "27999000001",
  "shape": "rest" | "one_api", "charset": "UTF-8"}``: a phone's reply, delivered as Clickatell
  would to the reply callback URL (``--reply-callback``, or ``"url"`` in the body), in the REST/HTTP
  shape or the One API ``moText`` envelope, naming the last message sent to that number as the
  one replied to. Answers the callback's status and body.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("fake_clickatell")

_MSISDN = re.compile(r"^\d{8,15}$")

# Texts as Clickatell words them.
_REST_ERRORS = {
    "001": "Authentication failed",
    "007": "IP Lockdown violation",
    "100": "Data malformed",
    "101": "Invalid or missing parameters",
    "105": "Invalid destination address.",
    "106": "Invalid source address",
    "108": "Invalid or missing integration API Key.",
    "113": "Maximum message parts exceeded",
    "114": "Cannot route message",
    "121": "Destination mobile number blocked",
    "122": "Destination mobile opted out",
    "123": "Invalid Sender ID",
    "130": "Maximum MT limit exceeded",
    "301": "No credit left",
    "901": "Internal error",
}
# REST code → the One API code and HTTP status it becomes there.
_ONE_API_EQUIVALENT = {
    "001": (1, 401), "108": (1, 401), "007": (7, 401), "101": (23, 400), "100": (21, 400),
    "105": (25, 400), "121": (26, 400), "122": (26, 400), "113": (100, 400), "301": (20, 402),
    "901": (19, 503), "130": (43, 429), "106": (45, 400), "114": (25, 400), "123": (45, 400),
}
_STATUS_TEXT = {3: "DELIVERED_TO_GATEWAY", 4: "RECEIVED_BY_RECIPIENT"}


@dataclass
class FakeState:
    """Everything the fake remembers; lives in the app, one per server."""

    api_keys: dict[str, str] | None = None  # key → "rest" | "http" | "one_api"; None: any key
    global_error: dict[str, Any] | None = None  # {"code": 108, "status": 401}
    reject_numbers: dict[str, int] = field(default_factory=dict)  # msisdn → per-recipient code
    fail_next: dict[str, Any] = field(default_factory=dict)  # {"count", "status", "retry_after"}
    delay: float = 0.0
    answer_delay: float = 0.0
    in_flight: int = 0
    balance: float = 1267.92865
    currency: str = "ZAR"
    status_callback_url: str | None = None
    reply_callback_url: str | None = None  # where POST /_fake/reply delivers replies
    messages: list[dict[str, Any]] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    by_api_id: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reset(self) -> None:
        self.global_error, self.reject_numbers, self.fail_next = None, {}, {}
        self.delay = self.answer_delay = 0.0
        self.messages.clear()
        self.requests.clear()
        self.by_api_id.clear()


STATE_KEY: web.AppKey[FakeState] = web.AppKey("fake_state", FakeState)
SESSION_KEY: web.AppKey[aiohttp.ClientSession] = web.AppKey("fake_session", aiohttp.ClientSession)
CALLBACKS_KEY: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("fake_callbacks", set)


def _rest_error(code: str, status: int) -> web.Response:
    text = _REST_ERRORS.get(code, "Error")
    return web.json_response(
        {"messages": [], "errorCode": int(code), "error": text, "errorDescription": text},
        status=status,
    )


def _one_api_error(code: int, description: str, status: int) -> web.Response:
    return web.json_response({"error": {"code": code, "description": description}}, status=status)


def _key_ok(state: FakeState, key: str | None, api: str) -> bool:
    if not key:
        return False
    return state.api_keys is None or state.api_keys.get(key) == api


async def _before_send(request: web.Request, api: str) -> web.Response | None:
    """Delay, injected failures and the global error mode: None lets the request through."""
    state = request.app[STATE_KEY]
    if state.delay:
        await asyncio.sleep(state.delay)
    fail = state.fail_next
    if fail.get("count", 0) > 0:
        fail["count"] -= 1
        status = int(fail.get("status", 503))
        headers = {"Retry-After": str(fail["retry_after"])} if fail.get("retry_after") is not None else {}
        state.requests[f"{api} {status}"] += 1
        return web.json_response(
            {"messages": [], "errorCode": None, "error": "Service temporarily unavailable"},
            status=status, headers=headers,
        )
    if state.global_error:
        code = f"{int(state.global_error['code']):03d}"
        status = int(state.global_error.get("status", 400))
        state.requests[f"{api} {status}"] += 1
        if api == "one_api":
            one, one_status = _ONE_API_EQUIVALENT.get(code, (18, 500))
            return _one_api_error(one, _REST_ERRORS.get(code, "Error"), status or one_status)
        return _rest_error(code, status)
    return None


def _accept(request: web.Request, api: str, to: str, content: str, sender: str, client_id: str) -> dict[str, Any]:
    """One recipient: accepted, or rejected with its own code (the others are unaffected)."""
    state = request.app[STATE_KEY]
    number = to.lstrip("+")
    code = f"{state.reject_numbers[number]:03d}" if number in state.reject_numbers else None
    if code is None and not _MSISDN.match(number):
        code = "105"
    if code is not None:
        return {"apiMessageId": None, "accepted": False, "to": number, "errorCode": int(code),
                "error": _REST_ERRORS.get(code, "Error"), "errorDescription": _REST_ERRORS.get(code)}
    api_id = uuid.uuid4().hex
    record = {"api": api, "to": number, "content": content, "from": sender,
              "clientMessageId": client_id, "apiMessageId": api_id, "received_at": time.time()}
    state.messages.append(record)
    state.by_api_id[api_id] = record
    log.info("fake-clickatell: to=%s api=%s content=%s", number, api, content)
    _schedule_reports(request.app, record)
    return {"apiMessageId": api_id, "accepted": True, "to": number,
            "errorCode": None, "error": None, "errorDescription": None}


def _schedule_reports(app: web.Application, record: dict[str, Any]) -> None:
    state = app[STATE_KEY]
    if not state.status_callback_url:
        return

    async def report() -> None:
        for code in (3, 4):
            await asyncio.sleep(0.05)
            payload = {
                "integrationName": "fake", "messageId": record["apiMessageId"],
                "requestId": record["apiMessageId"], "clientMessageId": record["clientMessageId"],
                "to": record["to"], "from": record["from"], "statusCode": code,
                "status": _STATUS_TEXT[code], "statusDescription": _STATUS_TEXT[code],
                "timestamp": int(time.time() * 1000),
            }
            try:
                async with app[SESSION_KEY].post(state.status_callback_url, json=payload) as r:
                    await r.read()
            except Exception as exc:  # noqa: BLE001 - callbacks are best effort, like Clickatell's
                log.warning("fake-clickatell: status callback failed: %s", type(exc).__name__)
                return

    task = asyncio.ensure_future(report())
    app[CALLBACKS_KEY].add(task)
    task.add_done_callback(app[CALLBACKS_KEY].discard)


# -- handlers ----------------------------------------------------------------------------------


async def rest_send(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if not _key_ok(state, request.headers.get("Authorization"), "rest"):
        state.requests["rest 401"] += 1
        return _rest_error("108", 401)
    early = await _before_send(request, "rest")
    if early is not None:
        return early
    try:
        body = await request.json()
    except ValueError:
        state.requests["rest 400"] += 1
        return _rest_error("100", 400)
    to, content = body.get("to") if isinstance(body, dict) else None, (body or {}).get("content")
    if not isinstance(to, list) or not to or not isinstance(content, str) or not content or len(to) > 200:
        state.requests["rest 400"] += 1
        return _rest_error("101", 400)
    items = [_accept(request, "rest", str(n), content, body.get("from", ""), body.get("clientMessageId", ""))
             for n in to]
    state.requests["rest 202"] += 1
    return web.json_response({"messages": items, "errorCode": None, "error": None,
                              "errorDescription": None}, status=202)


async def http_send(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    q = request.query
    if not _key_ok(state, q.get("apiKey"), "http"):
        state.requests["http 401"] += 1
        return _rest_error("108", 401)
    early = await _before_send(request, "http")
    if early is not None:
        return early
    to, content = q.get("to", ""), q.get("content", "")
    if not to or not content:
        state.requests["http 400"] += 1
        return _rest_error("101", 400)
    items = [_accept(request, "http", n.strip(), content, q.get("from", ""), "") for n in to.split(",")]
    state.requests["http 202"] += 1
    return web.json_response({"messages": items, "errorCode": None, "error": None,
                              "errorDescription": None}, status=202)


async def one_api_send(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if not _key_ok(state, request.headers.get("Authorization"), "one_api"):
        state.requests["one_api 401"] += 1
        return _one_api_error(1, "Invalid or missing integration API Key", 401)
    early = await _before_send(request, "one_api")
    if early is not None:
        return early
    try:
        body = await request.json()
    except ValueError:
        state.requests["one_api 400"] += 1
        return _one_api_error(21, "Malformed request", 400)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        state.requests["one_api 400"] += 1
        return _one_api_error(23, "Invalid or missing parameter: messages", 400)
    if len(messages) > 200:
        state.requests["one_api 400"] += 1
        return _one_api_error(22, "Too many messages in one request", 400)
    out, rejected = [], 0
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("to"), str) or not m.get("content"):
            return _one_api_error(23, "Invalid or missing parameter: to/content", 400)
        item = _accept(request, "one_api", m["to"], m["content"], m.get("from", ""), m.get("clientMessageId", ""))
        if item["accepted"]:
            out.append({"apiMessageId": item["apiMessageId"], "accepted": True, "to": item["to"]})
        else:
            rejected += 1
            code, _ = _ONE_API_EQUIVALENT.get(f"{item['errorCode']:03d}", (25, 400))
            out.append({"accepted": False, "to": item["to"],
                        "error": {"code": code, "description": f"Invalid recipient address: {item['to']}"}})
    status = 207 if rejected else 202
    state.requests[f"one_api {status}"] += 1
    return web.json_response({"messages": out}, status=status)


async def balance(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    api = "one_api" if request.path.startswith("/v1/") else None
    key = request.headers.get("Authorization")
    valid = bool(key) and (state.api_keys is None or key in state.api_keys)
    if not valid:
        return (_one_api_error(1, "Invalid or missing integration API Key", 401) if api
                else _rest_error("108", 401))
    return web.json_response({"balance": state.balance, "currency": state.currency})


async def message_status(request: web.Request) -> web.Response:
    record = request.app[STATE_KEY].by_api_id.get(request.query.get("messageId", ""))
    if record is None:
        return web.json_response({"error": "Message not found"}, status=404)
    return web.json_response({"status": "RECEIVED_BY_RECIPIENT"})


async def fake_messages(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].messages)


async def fake_requests(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({**state.requests, "in_flight": state.in_flight})


_MODE_FIELDS = ("global_error", "reject_numbers", "fail_next", "delay", "answer_delay", "balance",
                "currency")


async def fake_mode(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    unknown = set(body) - set(_MODE_FIELDS)
    if unknown:
        return web.json_response({"error": f"unknown mode fields: {sorted(unknown)}"}, status=400)
    for name in _MODE_FIELDS:
        if name in body:
            value = body[name]
            if name == "reject_numbers":
                value = {str(k).lstrip("+"): int(v) for k, v in (value or {}).items()}
            elif name == "fail_next":
                value = dict(value or {})
            setattr(state, name, value)
    return web.json_response({"status": "ok"})


async def fake_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"status": "ok"})


async def fake_reply(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    if not isinstance(body, dict) or not isinstance(body.get("from"), str) or not isinstance(body.get("text"), str):
        return web.json_response({"error": "from and text (strings) are required"}, status=400)
    url = body.get("url") or state.reply_callback_url
    if not url:
        return web.json_response({"error": "no reply callback URL: start with --reply-callback or give url"},
                                 status=400)
    number = body["from"].lstrip("+")
    last = next((m for m in reversed(state.messages) if m["to"] == number), None)
    reply_id, stamp = uuid.uuid4().hex, int(time.time() * 1000)
    charset = body.get("charset", "UTF-8")
    if body.get("shape", "rest") == "one_api":
        payload: dict[str, Any] = {"integrationId": "fake", "integrationName": "fake", "event": {"moText": [{
            "channel": "sms", "messageId": reply_id, "relatedMessageId": last and last["apiMessageId"],
            "relatedClientMessageId": last and last["clientMessageId"], "from": number,
            "to": body.get("to", ""), "timestamp": stamp, "content": body["text"], "charset": charset,
            "sms": {"network": "fake"}}]}}
    else:
        payload = {"integrationName": "fake", "messageId": last and last["apiMessageId"],
                   "replyMessageId": reply_id, "fromNumber": number, "toNumber": body.get("to", ""),
                   "timestamp": stamp, "text": body["text"], "charset": charset}
    try:
        async with request.app[SESSION_KEY].post(url, json=payload) as r:
            answer = await r.text()
            status = r.status
    except aiohttp.ClientError as exc:
        return web.json_response({"error": f"reply callback failed: {type(exc).__name__}"}, status=502)
    return web.json_response({"status": status, "answer": answer, "replyMessageId": reply_id})


async def _session(app: web.Application):  # cleanup context
    app[SESSION_KEY] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    app[CALLBACKS_KEY] = set()
    yield
    for task in list(app[CALLBACKS_KEY]):
        task.cancel()
    await app[SESSION_KEY].close()


_SENDS = frozenset({"/messages", "/messages/http/send", "/v1/message"})


@web.middleware
async def _in_flight(request: web.Request, handler: Any) -> web.StreamResponse:
    """Counts send requests being handled, and holds their answer for ``answer_delay``."""
    if request.path not in _SENDS:
        return await handler(request)
    state = request.app[STATE_KEY]
    state.in_flight += 1
    try:
        response = await handler(request)
        if state.answer_delay:
            await asyncio.sleep(state.answer_delay)
        return response
    finally:
        state.in_flight -= 1


def create_app(state: FakeState | None = None) -> web.Application:
    app = web.Application(middlewares=[_in_flight])
    app[STATE_KEY] = state or FakeState()
    app.cleanup_ctx.append(_session)
    app.router.add_post("/messages", rest_send)
    app.router.add_get("/messages/http/send", http_send)
    app.router.add_post("/v1/message", one_api_send)
    app.router.add_get("/public-client/balance", balance)
    app.router.add_get("/v1/balance", balance)
    app.router.add_get("/public-client/message/status", message_status)
    app.router.add_get("/_fake/messages", fake_messages)
    app.router.add_get("/_fake/requests", fake_requests)
    app.router.add_post("/_fake/mode", fake_mode)
    app.router.add_post("/_fake/reset", fake_reset)
    app.router.add_post("/_fake/reply", fake_reply)
    return app


async def serve(host: str, port: int, state: FakeState) -> None:
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"fake-clickatell listening on http://{host}:{port} "
          f"(REST /messages, HTTP /messages/http/send, One API /v1/message)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT (e.g. 127.0.0.1:9098)")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sms-receiver fake-clickatell",
        description="A local stand-in for Clickatell that prints what it receives.")
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:9098", help="HOST:PORT (default 127.0.0.1:9098)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY[:TYPE]",
                        help="accept only these keys (TYPE rest|http|one_api, default rest); default: any key")
    parser.add_argument("--reject", action="append", default=[], metavar="NUMBER[:CODE]",
                        help="reject this recipient with CODE (default 105)")
    parser.add_argument("--global-error", metavar="CODE[:HTTP]", help="answer every send with this error")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each send answer")
    parser.add_argument("--balance", type=float, default=1267.92865)
    parser.add_argument("--currency", default="ZAR")
    parser.add_argument("--status-callback", metavar="URL", help="POST delivery reports here")
    parser.add_argument("--reply-callback", metavar="URL", help="POST /_fake/reply delivers replies here")


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    keys = None
    if args.api_key:
        keys = {}
        for item in args.api_key:
            key, _, api = item.rpartition(":")
            # keys are base64 and may hold ":"-free "=="; only a known type after ":" is a type
            keys.update({key: api} if api in ("rest", "http", "one_api") else {item: "rest"})
    rejects = {}
    for item in args.reject:
        number, _, code = item.partition(":")
        rejects[number.lstrip("+")] = int(code or 105)
    global_error = None
    if args.global_error:
        code, _, status = args.global_error.partition(":")
        global_error = {"code": int(code), "status": int(status or 400)}
    state = FakeState(api_keys=keys, reject_numbers=rejects, global_error=global_error,
                      delay=args.delay, balance=args.balance, currency=args.currency,
                      status_callback_url=args.status_callback, reply_callback_url=args.reply_callback)
    try:
        host, port = _split_listen(args.listen)
    except ValueError as exc:
        print(f"--listen: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(host, port, state))
    except KeyboardInterrupt:
        pass
    return 0
