"""HTTP endpoints (PRODUCT.md): webhooks, ``/send``, callbacks, admin API, health, metrics.

Webhook answers follow what Alertmanager does with them: 2xx only once the messages are durably
stored (a replay is 2xx too and stores nothing), 5xx when they could not be stored so the sender
retries, 4xx with a short JSON reason for input that can never be valid, and never 429.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from receiver import __version__
from receiver.app import Receiver
from receiver.auth import (
    PROXY_HEADERS,
    Denied,
    admin_denied,
    callback_denied,
    challenge,
    check_grafana_signature,
    webhook_denied,
)
from receiver.callbacks import parse_form, parse_status_callback
from receiver.config import AdminAuth, parse_duration
from receiver.ingest import (
    InvalidPayload,
    SendItem,
    dedup_key,
    endpoint_problem,
    notification_of,
    parse_send,
    validate_webhook,
)
from receiver.models import MESSAGE_STATES
from receiver.pipeline import new_message_id
from receiver.routing import route
from receiver.send import plan_item
from receiver.store import MessageQuery, MessageRecord, PageRecord, Received, StoreError
from receiver.twoway import parse_reply_callback

log = logging.getLogger("sms_receiver.web")

RECEIVER: web.AppKey[Receiver] = web.AppKey("receiver", Receiver)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_JSON = {"Content-Type": "application/json"}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def _error(status: int, reason: str, **extra: Any) -> web.Response:
    return _json({"status": "error", "error": reason, **extra}, status)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


class _Refused(Exception):
    """A body that is not read: its answer, and the outcome counted."""

    def __init__(self, status: int, reason: str, outcome: str) -> None:
        super().__init__(reason)
        self.response = _error(status, reason)
        self.outcome = outcome


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body; raise :class:`_Refused` when it is larger than ``limit`` bytes or compressed
    (a few kilobytes of gzip inflate to gigabytes, past any limit on what was sent; no sender
    of ours compresses). Every Content-Encoding header and each of its codings is checked
    ("identity, gzip" and a second header are compressed too); the server does not inflate
    bodies itself (``auto_decompress`` is off in :func:`create_app`), so nothing was inflated."""
    codings = [c.strip().lower() for h in request.headers.getall("Content-Encoding", ()) for c in h.split(",")]
    if any(c not in ("", "identity") for c in codings):
        shown = ", ".join(c for c in codings if c)[:40]
        raise _Refused(415, f"Content-Encoding {shown!r} is not accepted: send the body "
                            "uncompressed", "invalid")
    length = request.content_length
    if length is not None:
        if length > limit:
            raise _too_large(limit)
        return await request.read()
    chunks, size = [], 0  # chunked: counted as it comes
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> _Refused:
    return _Refused(413, f"body larger than max_body_bytes ({limit})", "too_large")


def _unauthorized(auth: AdminAuth, realm: str, denied: Denied | str) -> web.Response:
    """A 401 (with its challenge) or 403 answer carrying the reason."""
    if isinstance(denied, str):
        denied = Denied(401, denied)
    headers = {"WWW-Authenticate": challenge(auth, realm)} if denied.status == 401 else None
    return _json({"status": "error", "error": denied.reason}, denied.status, headers=headers)


def admin(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        auth = request.app[RECEIVER].config.admin_auth
        proxied = any(h in request.headers for h in PROXY_HEADERS)
        denied = admin_denied(auth, request.headers.get("Authorization"), request.remote, proxied)
        if denied is not None:
            # the route's pattern, not the path: one line per refusal, nothing the client chose
            route = request.match_info.route.resource.canonical
            request.app[RECEIVER].refusals.warning(log, "admin refused route=%s status=%d reason=%r", route,
                                                   denied.status, denied.reason)
            if route == "/send":
                request.app[RECEIVER].metrics.webhooks.labels("send", "unauthorized").inc()
            return _unauthorized(auth, "sms-receiver admin", denied)
        return await handler(request)

    return wrapped


# ---------------------------------------------------------------------------------------------
# Webhooks


async def _webhook(request: web.Request, source: Literal["alertmanager", "grafana"]) -> web.Response:
    r = request.app[RECEIVER]
    cfg = r.config
    m = r.metrics
    start = r.clock.monotonic()

    def done(outcome: str, response: web.Response,
             about: Callable[[], dict[str, Any]] | None = None, **fields: Any) -> web.Response:
        m.child(m.webhooks, source, outcome).inc()
        # accepted webhooks are logged by the planner (with their messages) once planned
        level = logging.DEBUG if outcome in ("accepted", "duplicate") else logging.WARNING
        if not log.isEnabledFor(level):
            return response
        details = " ".join(f"{k}={v}" for k, v in {**(about() if about else {}), **fields}.items())
        line = ("webhook source=%s outcome=%s status=%d %s duration_ms=%.1f",
                source, outcome, response.status, details, (r.clock.monotonic() - start) * 1000)
        if level == logging.DEBUG:
            log.debug(*line)
        else:  # refused: rate-limited (it is counted either way)
            r.refusals.warning(log, *line)
        return response

    denied = webhook_denied(cfg.webhook_auth, source, request.headers.get("Authorization"))
    if denied is not None:
        return done("unauthorized", _unauthorized(cfg.webhook_auth, "sms-receiver webhooks", denied),
                    reason=repr(denied.reason))
    try:
        body = await _read_body(request, cfg.max_body_bytes)
    except _Refused as exc:
        return done(exc.outcome, exc.response)
    r.answering += 1  # its body is in: the planner yields until it is answered
    try:
        return await _answer(request, source, body, done)
    finally:
        r.answering -= 1


async def _answer(request: web.Request, source: Literal["alertmanager", "grafana"], body: bytes,
                  done: Callable[..., web.Response]) -> web.Response:
    r = request.app[RECEIVER]
    cfg, m = r.config, r.metrics
    if source == "grafana":
        problem = check_grafana_signature(cfg.webhook_auth, request.headers, body, r.clock.now())
        if problem:
            return done("unauthorized", _unauthorized(cfg.webhook_auth, "sms-receiver webhooks", problem),
                        reason=repr(problem))
    try:
        wire = validate_webhook(body, source)  # routing and rendering wait for the planner
        wrong = endpoint_problem(wire, source)  # a Grafana body never skips Grafana's checks
        if wrong is not None:
            raise wrong
    except InvalidPayload as exc:
        return done("invalid", _error(exc.status, exc.reason), reason=repr(exc.reason))
    firing = sum(a.status == "firing" for a in wire.alerts)  # two increments, not one per alert
    if firing:
        m.child(m.alerts, source, "firing").inc(firing)
    if firing < len(wire.alerts):
        m.child(m.alerts, source, "resolved").inc(len(wire.alerts) - firing)

    now = r.clock.now()
    nid = new_message_id(now)
    label, rank = cfg.severity_label, cfg.severity_rank
    # planned in this order; ranked once per severity (a storm's alerts mostly share one)
    priority = min(map(rank, {a.labels.get(label, "") for a in wire.alerts}))
    try:
        fresh = await r.store.receive(Received(nid, now, source, body, priority),
                                      dedup_key(wire, source), cfg.dedup_window)
    except StoreError as exc:
        return done("store_error", _error(503, "could not store the notification; retry"),
                    error=repr(str(exc)))

    def about() -> dict[str, Any]:  # built only when the line is logged (debug)
        return {"alerts": len(wire.alerts), "group_key": repr(wire.groupKey),
                "notification": nid if fresh else "-"}

    if not fresh:  # routed here only to count what the replay would have sent
        m.count_replay(route(notification_of(wire, source), cfg))
        return done("duplicate", web.Response(body=b'{"status":"duplicate"}', headers=_JSON), about)
    r.planner.wake()
    # written out rather than json.dumps'd (the id is hex)
    answer = f'{{"status":"accepted","notification":"{nid}"}}'
    return done("accepted", web.Response(body=answer.encode(), headers=_JSON), about)


async def alertmanager_webhook(request: web.Request) -> web.Response:
    return await _webhook(request, "alertmanager")


async def grafana_webhook(request: web.Request) -> web.Response:
    return await _webhook(request, "grafana")


SEND_MAX_ITEMS = 1000  # items of one /send request
SEND_CPU_BUDGET = 2.0  # seconds of CPU one /send request's renders may take in all


@admin
async def send(request: web.Request) -> web.Response:
    r = request.app[RECEIVER]
    snap = r.snapshot
    cfg = snap.config
    try:
        body = await _read_body(request, cfg.max_body_bytes)
    except _Refused as exc:
        return _refused_send(r, exc.outcome, exc.response, str(exc))
    try:
        items = parse_send(body)
    except InvalidPayload as exc:
        return _refused_send(r, "invalid", _error(exc.status, exc.reason), exc.reason)

    if len(items) > SEND_MAX_ITEMS:
        return _refused_send(r, "invalid", _error(422, f"{len(items)} items: at most {SEND_MAX_ITEMS} "
                                                       "per request"), "too many items")
    now = r.clock.now()
    answers: list[dict[str, Any]] = []
    messages = []
    spent = time.thread_time() + SEND_CPU_BUDGET
    for i, item in enumerate(items):
        if i and time.thread_time() > spent:  # each render is bounded; so is the whole request
            answers.append({"index": i, "groupId": getattr(item, "groupId", None), "status": "rejected",
                            "error": f"this request's rendering took over {SEND_CPU_BUDGET:g}s of CPU: "
                                     "send the remaining items in another request"})
            continue
        if i:
            await asyncio.sleep(0)  # webhooks and sends go on between two items
        msg = plan_item(item, snap, now, new_message_id(now))
        if isinstance(msg, str):
            gid = item.groupId if isinstance(item, SendItem) else None
            answers.append({"index": i, "groupId": gid, "status": "rejected", "error": msg})
            continue
        assert isinstance(item, SendItem)
        messages.append(msg)
        answers.append({
            "index": i, "groupId": item.groupId, "status": "accepted", "messageId": msg.id,
            "encoding": msg.sms.encoding, "parts": msg.sms.parts,
            **({"templateError": msg.template_error} if msg.template_error else {}),
        })
    if not messages:
        return _refused_send(r, "invalid", _json({"status": "error", "results": answers}, 422),
                             answers[0]["error"])
    try:
        await r.store.accept(messages, now)
    except StoreError:
        r.metrics.webhooks.labels("send", "store_error").inc()
        return _error(503, "could not store the messages; retry")
    r.dispatcher.wake()
    r.metrics.webhooks.labels("send", "accepted").inc()
    r.metrics.count_planned(messages)
    partial = len(messages) < len(items)
    log.info("send items=%d accepted=%d", len(items), len(messages))
    return _json({"status": "partial" if partial else "accepted", "results": answers},
                 207 if partial else 202)


def _refused_send(r: Receiver, outcome: str, response: web.Response, reason: str) -> web.Response:
    """A refused ``/send``: counted (source "send") and logged in one line, as webhooks are."""
    r.metrics.webhooks.labels("send", outcome).inc()
    r.refusals.warning(log, "send outcome=%s status=%d reason=%r", outcome, response.status, reason[:200])
    return response


# ---------------------------------------------------------------------------------------------
# Clickatell callbacks


def _callback_denied(request: web.Request) -> Denied | None:
    # the path segment is what Clickatell's callback URL field should carry: a query string
    # ends up in more logs
    given = (request.match_info.get("secret"), request.headers.get("X-Callback-Secret"),
             request.query.get("secret"))
    return callback_denied(request.app[RECEIVER].config.callbacks, given)


def _refused_callback(r: Receiver, outcome: str, response: web.Response, reason: str) -> web.Response:
    """A refused delivery report: counted under its outcome (``invalid``, ``too_large``) in
    ``delivery_reports_total`` and logged in one line (the secret is never part of it)."""
    r.metrics.delivery_reports.labels(outcome).inc()
    r.refusals.warning(log, "callback outcome=%s status=%d reason=%r", outcome, response.status, reason[:200])
    return response


def _query_fields(request: web.Request) -> dict[str, str]:
    """The query as fields, decoded strictly: invalid UTF-8 in a percent-escape is refused
    rather than replaced (yarl would keep it as U+FFFD or as the escape)."""
    try:  # aiohttp keeps undecodable bytes of the request line as surrogate escapes
        raw = request.rel_url.raw_query_string.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError("query is not valid UTF-8") from None
    return parse_form(raw, "query")


async def status_callback(request: web.Request) -> web.Response:
    r = request.app[RECEIVER]
    denied = _callback_denied(request)
    if denied is not None:  # counted and logged without the path or query: they may hold a secret
        return _refused_callback(r, "unauthorized", _error(denied.status, denied.reason), denied.reason)
    if request.method == "POST":
        try:
            body = await _read_body(request, r.config.max_body_bytes)
        except _Refused as exc:
            return _refused_callback(r, exc.outcome, exc.response, str(exc))
    try:
        if request.method != "POST":
            fields: Any = _query_fields(request)
        elif request.content_type.endswith("form-urlencoded"):
            # parsed from the bytes read under the limit: request.post() would read the stream
            # again (empty when it was chunked) and fail on invalid UTF-8
            fields = parse_form(body)
        else:
            fields = body
        reports = parse_status_callback(fields)
    except ValueError as exc:
        return _refused_callback(r, "invalid", _error(400, str(exc)), str(exc))
    now = r.clock.now()
    for report in reports:
        try:
            found = await r.store.delivery_report(
                report.api_message_id, report.status, report.final_state, now,
                report.client_message_id,
            )
        except StoreError:
            return _error(503, "could not store the delivery report; retry")
        r.metrics.delivery_reports.labels(report.label if found else "unknown").inc()
    return _json({"status": "ok", "reports": len(reports)})


async def reply_callback(request: web.Request) -> web.Response:
    """Clickatell's reply (two-way) callback: each reply acted on by :mod:`receiver.acks`.
    Refused (and counted in ``replies_total``) without the callback secret, or malformed; a
    reply from a number in no group is counted ``refused`` and answers 200 (Clickatell would
    only retry it)."""
    r = request.app[RECEIVER]
    m = r.metrics

    def refused(action: str, response: web.Response, reason: str) -> web.Response:
        m.replies.labels(action).inc()
        r.refusals.warning(log, "reply callback outcome=%s status=%d reason=%r", action, response.status,
                           reason[:200])
        return response

    denied = _callback_denied(request)
    if denied is not None:  # logged without the path or query: they may hold a secret
        return refused("refused", _error(denied.status, denied.reason), denied.reason)
    try:
        if request.method == "POST":
            body = await _read_body(request, r.config.max_body_bytes)
            fields: Any = parse_form(body) if request.content_type.endswith("form-urlencoded") else body
        else:
            fields = _query_fields(request)
        replies = parse_reply_callback(fields)
    except _Refused as exc:
        return refused("malformed", exc.response, str(exc))
    except ValueError as exc:  # BadReply, or form fields that are not UTF-8
        return refused("malformed", _error(400, str(exc)), str(exc))
    actions = []
    for reply in replies:
        try:
            action = await r.replies.handle(reply)
        except StoreError:
            return _error(503, "could not record the reply; retry")
        m.replies.labels(action).inc()
        actions.append(action)
    return _json({"status": "ok", "replies": actions})


# ---------------------------------------------------------------------------------------------
# Admin API


def _page_json(page: PageRecord | None) -> dict[str, Any]:
    """Two-way paging: the page's reference, its acknowledgements and escalation rounds."""
    if page is None:
        return {"ref": None, "acks": [], "escalations": []}
    return {
        "ref": page.ref,
        "acks": [{"by": a.by, "at": _iso(a.at), "until": _iso(a.until), "unackedAt": _iso(a.unacked_at),
                  "silenceId": a.silence_ids[0] if a.silence_ids else None, "silenceIds": list(a.silence_ids),
                  "silence": a.outcome} for a in page.acks],
        "escalations": [{"round": e.round, "to": e.group_id, "at": _iso(e.at), "messageId": e.message_id}
                        for e in page.escalations],
    }


def _message_json(msg: MessageRecord, page: PageRecord | None = None) -> dict[str, Any]:
    return {
        **_page_json(page),
        "id": msg.id,
        "createdAt": _iso(msg.created_at),
        "source": msg.source,
        "group": msg.group_id,
        "level": msg.level,
        "status": msg.status,
        "text": msg.text,
        "encoding": msg.encoding,
        "parts": msg.parts,
        "alertCount": msg.alert_count,
        "state": msg.state,
        "attempts": msg.attempts,
        "nextAttemptAt": _iso(msg.next_attempt_at) if msg.state in ("pending", "held") else None,
        "lastError": msg.last_error,
        "acceptedAt": _iso(msg.accepted_at),
        "templateError": msg.template_error,
        "heldFor": msg.hold_reason,  # digest …, quiet hours, throttle, delivery none
        "bundleId": msg.bundle_id,  # the summary SMS it went out in
        "alerts": [{"name": i.name, "level": i.level, "status": i.status} for i in msg.items],
        "recipients": [
            {
                "number": rc.number,
                "state": rc.state,
                "clickatellMessageId": rc.api_message_id,
                "errorCode": rc.error_code,
                "error": rc.error,
                "deliveryStatus": rc.delivery_status,
                "heldUntil": _iso(rc.hold_until) if rc.state == "held" else None,
                "bundleId": rc.bundle_id,
            }
            for rc in msg.recipients
        ],
    }


_SINCE = re.compile(r"^\d+(\.\d+)?$")


def _parse_since(value: str, now: float) -> float:
    if _SINCE.match(value):
        return float(value)
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        pass
    return now - parse_duration(value)  # "1h": the last hour


@admin
async def list_messages(request: web.Request) -> web.Response:
    r = request.app[RECEIVER]
    q = request.query
    state = q.get("status") or q.get("state")
    if state and state not in MESSAGE_STATES:
        return _error(400, f"unknown status {state!r} (one of {', '.join(MESSAGE_STATES)})")
    try:
        since = _parse_since(q["since"], r.clock.now()) if q.get("since") else None
    except ValueError:
        return _error(400, "since: expected RFC 3339 time, Unix seconds or a duration such as 1h")
    try:
        limit = int(q.get("limit", "100"))
        if not 1 <= limit <= 1000:
            raise ValueError
    except ValueError:
        return _error(400, "limit: expected a whole number from 1 to 1000")
    try:
        messages = await r.store.list_messages(
            MessageQuery(group=q.get("group") or None, state=state, since=since,
                         notification=q.get("notification") or None, limit=limit)
        )
    except StoreError as exc:
        return _error(503, f"store unavailable: {exc}")
    try:
        pages = await r.store.pages_of([msg.id for msg in messages])
    except StoreError as exc:
        return _error(503, f"store unavailable: {exc}")
    return _json({"messages": [_message_json(msg, pages.get(msg.id)) for msg in messages]})


@admin
async def get_message(request: web.Request) -> web.Response:
    r = request.app[RECEIVER]
    mid = request.match_info["id"]
    try:
        msg = await r.store.get_message(mid)
        received = None if msg is not None else await r.store.received(mid)
        page = (await r.store.pages_of([mid])).get(mid) if msg is not None else None
    except StoreError as exc:
        return _error(503, f"store unavailable: {exc}")
    if msg is not None:
        return _json(_message_json(msg, page))
    if received is not None:  # answered, not planned yet: the planner is behind (or failed on it)
        return _json({"id": mid, "state": "received", "source": received.source,
                      "createdAt": _iso(received.received_at), "recipients": [],
                      **({"planningError": received.error} if received.error else {})})
    return _error(404, f"no message {mid!r}")


@admin
async def list_groups(request: web.Request) -> web.Response:
    cfg = request.app[RECEIVER].config
    return _json({
        "groups": [
            {
                "id": g.id,
                "name": g.name,
                "level": cfg.group_level(g),
                "members": list(g.members),
                "template": g.template,
                "sendTemplate": g.send_template,
                "sendResolved": g.send_resolved,
                "ownApiKey": bool(g.api_key.get_secret_value()),
            }
            for g in cfg.groups
        ]
    })


@admin
async def status(request: web.Request) -> web.Response:
    r = request.app[RECEIVER]
    cfg = r.config
    try:
        stats = await r.store.stats()
        outbox: dict[str, Any] = {
            "pending": stats.pending,
            "oldestPendingAgeSeconds": (
                None if stats.oldest_pending_created_at is None
                else round(stats.oldest_pending_age(r.clock.now()), 3)
            ),
            "byState": stats.by_state,
        }
    except StoreError as exc:
        outbox = {"error": str(exc)}
    health = r.health()
    return _json({
        "version": __version__,
        "dryRun": cfg.dry_run,
        "clickatell": {"api": cfg.clickatell.api, "baseUrl": cfg.clickatell.base_url,
                       "from": cfg.clickatell.from_, "maxParts": cfg.clickatell.max_parts},
        "groups": len(cfg.groups),
        "routes": len(cfg.routes),
        "outbox": outbox,
        "dispatcher": {
            "lastRunAgeSeconds": None if health.last_run_age is None else round(health.last_run_age, 3),
            "lastError": health.error,
        },
        "config": {
            "lastReloadSuccessful": r.last_reload_ok,
            "lastReloadSuccessTimestamp": _iso(r.last_reload_success),
        },
    })


@admin
async def reload(request: web.Request) -> web.Response:
    errors = await request.app[RECEIVER].reload()
    if errors:
        return _json({"status": "error", "errors": errors}, 400)
    return _json({"status": "success"})


# ---------------------------------------------------------------------------------------------
# Health and metrics


async def healthy(request: web.Request) -> web.Response:
    r = request.app[RECEIVER]
    trouble = r.fatal or r.store.trouble()
    if trouble is not None:  # the process is stopping, or must be restarted
        return web.Response(status=503, text=f"not healthy: {trouble}\n")
    return web.Response(text="sms-receiver is Healthy.\n")


async def ready(request: web.Request) -> web.Response:
    r = request.app[RECEIVER]
    try:
        await r.store.ping()
    except StoreError as exc:
        return web.Response(status=503, text=f"not ready: store: {exc}\n")
    health = r.health()
    if not health.running:
        return web.Response(status=503, text="not ready: the dispatcher loop is not running\n")
    if health.error:
        return web.Response(status=503, text=f"not ready: {health.error}\n")
    return web.Response(text="sms-receiver is Ready.\n")


def openapi_document() -> bytes:
    """The OpenAPI 3.1 document of these endpoints, kept in the package (receiver/openapi.json);
    tests check it lists exactly the routes :func:`create_app` registers."""
    from importlib.resources import files

    return files("receiver").joinpath("openapi.json").read_bytes()


def _openapi(document: bytes) -> Handler:
    # open, like /metrics: it describes the published software and holds no secrets
    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, headers=_JSON)

    return openapi


async def metrics(request: web.Request) -> web.Response:
    r = request.app[RECEIVER]
    try:
        stats = await r.store.stats()
    except StoreError:
        pass  # the gauges keep their last values; readiness reports the store
    else:
        r.metrics.outbox_pending.set(stats.pending)
        r.metrics.outbox_oldest_age.set(stats.oldest_pending_age(r.clock.now()))
        for state in MESSAGE_STATES:
            r.metrics.outbox_messages.labels(state).set(stats.by_state.get(state, 0))
        r.metrics.held_recipients.set(stats.held_recipients)
        r.metrics.unplanned.set(stats.unplanned)
        r.metrics.planning_failed.set(stats.unplanned_failed)
    body = generate_latest(r.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def _unexpected(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A bug signal, never a client fault: an exception no handler expected becomes a 500 with
    a JSON reason and one error line with its traceback, naming the route, not the URL (a
    query or path segment may hold a secret). aiohttp's answers and disconnects pass through."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ConnectionResetError:  # the client went away mid-request (or the listener closed it)
        resource = request.match_info.route.resource
        log.info("client disconnected before it was answered: %s %s", request.method[:20],
                 resource.canonical if resource is not None else "-")
        return web.Response(status=400)  # never reaches it; aiohttp then closes quietly
    except Exception:
        resource = request.match_info.route.resource
        log.exception("unexpected error answering %s %s", request.method[:20],
                      resource.canonical if resource is not None else "-")
        return _error(500, "internal error")


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """The ``Expect`` header: ``100-continue`` is answered as aiohttp does; anything else is a
    417 that does not echo the value (aiohttp's own handler answers 500 when it is not UTF-8)."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the body is yet to come
        return None
    return _error(417, "unsupported Expect header (only 100-continue)")


async def _no_route(request: web.Request) -> web.Response:
    """Unknown paths and methods, answered here (so they too get :func:`_expect`): 405 with
    ``Allow`` when another method has that path, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        response = _error(405, f"method {request.method[:20]!r} not allowed here")
        response.headers["Allow"] = ",".join(sorted(allowed))
        return response
    return _error(404, "no such endpoint")


def _guard_routes(app: web.Application) -> None:
    """Last in :func:`create_app`: a catch-all route and our ``Expect`` handler on every route.
    aiohttp runs the Expect handler before any middleware, and has no public setter for it."""
    app.router.add_route("*", "/{path:.*}", _no_route)
    for each in app.router.routes():
        each._expect_handler = _expect  # type: ignore[attr-defined]


def create_app(receiver: Receiver) -> web.Application:
    """The aiohttp application; body limits are enforced per request from the live config.
    The server never inflates a compressed body itself (``auto_decompress`` off): a few
    kilobytes of gzip would become gigabytes before any handler could refuse them."""
    app = web.Application(client_max_size=1 << 30, middlewares=[_unexpected],
                          handler_args={"auto_decompress": False})
    app[RECEIVER] = receiver
    app.router.add_post("/webhook/alertmanager", alertmanager_webhook)
    app.router.add_post("/webhook/grafana", grafana_webhook)
    app.router.add_post("/send", send)
    app.router.add_route("GET", "/callbacks/clickatell/status", status_callback)
    app.router.add_route("POST", "/callbacks/clickatell/status", status_callback)
    app.router.add_route("GET", "/callbacks/clickatell/status/{secret}", status_callback)
    app.router.add_route("POST", "/callbacks/clickatell/status/{secret}", status_callback)
    app.router.add_route("GET", "/callbacks/clickatell/reply", reply_callback)
    app.router.add_route("POST", "/callbacks/clickatell/reply", reply_callback)
    app.router.add_route("GET", "/callbacks/clickatell/reply/{secret}", reply_callback)
    app.router.add_route("POST", "/callbacks/clickatell/reply/{secret}", reply_callback)
    app.router.add_get("/api/v1/messages", list_messages)
    app.router.add_get("/api/v1/messages/{id}", get_message)
    app.router.add_get("/api/v1/groups", list_groups)
    app.router.add_get("/api/v1/status", status)
    app.router.add_post("/-/reload", reload)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/metrics", metrics)
    # The history pages (receiver.ui): GET /ui, /ui/, /ui/messages/{id}, /ui/groups, /ui/export.csv
    from receiver import ui

    ui.add_routes(app, receiver)
    app.router.add_get("/api/v1/openapi.json", _openapi(openapi_document()))
    _guard_routes(app)
    return app
