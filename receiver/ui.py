"""The history web page under ``/ui/`` (issue 19): what was sent, to whom, when, and what became
of it, for people with a browser rather than ``curl``.

Server-rendered with Jinja2 from ``receiver/ui_templates`` (our own templates, autoescaped; what
the store holds is only ever a value in them, never template source). No JavaScript, no assets
from anywhere (inline CSS and SVG), and a Content-Security-Policy that would refuse them anyway.
Admin auth as the ``/api/v1`` endpoints have it; a 401 asks for basic auth whenever
``admin_auth.basic_auth`` is set, so that a browser prompts for it. Phone numbers are shown
masked but for their last four digits, here and in the CSV export. Times are UTC.

Routes: ``GET /ui`` (redirect), ``/ui/`` (the list), ``/ui/messages/{id}``, ``/ui/groups``,
``/ui/export.csv``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from receiver.app import Receiver
from receiver.auth import PROXY_HEADERS, admin_denied, challenge
from receiver.config import AdminAuth, Config, parse_duration
from receiver.config.model import Group, QuietHours, format_duration
from receiver.models import MESSAGE_STATES
from receiver.phone import mask
from receiver.store import GroupCounts, HistoryQuery, MessageRecord, RecipientRecord, StoreError

log = logging.getLogger("sms_receiver.ui")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UI_TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("ui_templates", jinja2.Environment)
UI_RECEIVER: web.AppKey[Receiver] = web.AppKey("ui_receiver", Receiver)
REALM = "sms-receiver admin"
PAGE_SIZE = 50
EXPORT_CHUNK = 500  # messages read per query while the CSV streams
MAX_TEXT = 200  # characters of a text filter
DAY = 86400.0
# Our pages carry no script and load nothing: a stored text that slipped past escaping could not
# run, and nothing leaks a URL (with its filter) to another site.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

# Clickatell's error codes and what they mean (reference/clickatell-api.md). receiver.clickatell
# keeps what to *do* about each; this is what to *tell* a person. The REST/HTTP family's codes
# are three digits; One API's are plain numbers, and its 100 is not REST's 100.
REST_MEANINGS: Mapping[str, str] = {
    "001": "Authentication failed", "007": "IP lockdown violation", "100": "Data malformed",
    "101": "Invalid or missing parameters", "105": "Invalid destination address",
    "106": "Invalid source (FROM) address", "108": "Invalid or missing integration API key",
    "113": "Maximum message parts exceeded", "114": "Cannot route message",
    "121": "Destination mobile number blocked", "122": "Destination mobile opted out",
    "123": "Invalid sender ID", "130": "Maximum MT limit exceeded", "301": "No credit left",
    "901": "Internal error",
}
ONE_API_MEANINGS: Mapping[str, str] = {
    "1": "Invalid or missing API key", "2": "Account not active", "3": "Integration not active",
    "7": "IP address not approved", "18": "Internal error", "19": "Internal error (retry)",
    "20": "Insufficient balance", "21": "Malformed request", "22": "Too many messages in one request",
    "23": "Invalid or missing parameter", "24": "Content too large", "25": "Invalid recipient",
    "26": "Recipient opted out", "43": "Rate limit exceeded",
    "45": "FROM number not related to the integration", "100": "Maximum message parts exceeded",
}
# Recipient states, as counted on the groups page.
COUNTED = {
    "sent": ("accepted", "delivered", "undelivered"),  # Clickatell took it
    "delivered": ("delivered",),
    "failed": ("failed", "undelivered"),  # not taken, or reported undelivered
    "held": ("held", "bundled", "collapsed"),  # held by the paging policy (and what became of it)
}
_CURSOR = re.compile(r"^(\d{1,12}(?:\.\d{1,9})?)~([0-9a-f]{1,64})$")
_NUMBER = re.compile(r"^\d{1,12}(\.\d+)?$")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def meaning(code: str | None, api: str = "rest") -> str | None:
    """What a Clickatell error code of ``api`` (clickatell.api) means; None when unknown."""
    if not code:
        return None
    return (ONE_API_MEANINGS if api == "one_api" else REST_MEANINGS).get(code)


def csv_cell(value: Any) -> Any:
    """A value safe to open in a spreadsheet: text starting with ``= + - @`` (or a tab or CR,
    which some spreadsheets skip before such a character) gets a leading ``'``, so a stored
    text or label is never read as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# ---------------------------------------------------------------------------------------------
# Filters: the query string, read strictly


@dataclass(frozen=True, slots=True)
class Filters:
    query: HistoryQuery
    form: dict[str, str]  # the fields as given, to fill the form and build links

    def link(self, path: str, **extra: str) -> str:
        fields = {k: v for k, v in {**self.form, **extra}.items() if v}
        return path + ("?" + urlencode(fields) if fields else "")


def _time(value: str, now: float, name: str) -> float:
    """RFC 3339 (a time without an offset, as a browser's datetime-local field sends, is UTC),
    Unix seconds, or a duration back from now ("24h")."""
    if _NUMBER.match(value):
        return float(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        pass
    else:
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    try:
        return now - parse_duration(value)
    except ValueError:
        raise ValueError(f"{name}: {value[:40]!r} is not a time: write 2026-12-05T06:00 (UTC), "
                         "Unix seconds, or a duration back from now such as 24h") from None


def parse_filters(q: Mapping[str, str], cfg: Config, now: float) -> tuple[Filters, list[str]]:
    """The list's filters from the query string, and what is wrong with it (every problem,
    each naming its field and what it accepts)."""
    form = {k: q.get(k, "").strip() for k in ("group", "level", "state", "since", "until", "q", "before")}
    problems: list[str] = []
    if len(form["group"]) > 200:
        problems.append("group: longer than 200 characters")
    if form["level"] and form["level"] not in cfg.level_names:
        problems.append(f"level: {form['level'][:40]!r} is not a level (one of {', '.join(cfg.level_names)})")
    if form["state"] and form["state"] not in MESSAGE_STATES:
        problems.append(f"state: {form['state'][:40]!r} is not a state (one of {', '.join(MESSAGE_STATES)})")
    if len(form["q"]) > MAX_TEXT:
        problems.append(f"q: the text to search for is longer than {MAX_TEXT} characters")
    times: dict[str, float | None] = {"since": None, "until": None}
    for name in times:
        if form[name]:
            try:
                times[name] = _time(form[name], now, name)
            except ValueError as exc:
                problems.append(str(exc))
    since, until = times["since"], times["until"]
    if since is not None and until is not None and since >= until:
        problems.append("since: must be before until")
    before = None
    if form["before"]:
        m = _CURSOR.match(form["before"])
        if m is None:
            problems.append("before: not a page cursor (follow the Older link rather than writing one)")
        else:
            before = (float(m[1]), m[2])
    query = HistoryQuery(group=form["group"] or None, level=form["level"] or None,
                         state=form["state"] or None, since=since, until=until,
                         text=form["q"] or None, before=before, limit=PAGE_SIZE)
    return Filters(query, form), problems


def cursor(key: tuple[float, str]) -> str:
    return f"{key[0]!r}~{key[1]}"


# ---------------------------------------------------------------------------------------------
# What the templates are given


def _utc(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(max(0.0, round(seconds)))


def _recipient_summary(recipients: Iterable[RecipientRecord]) -> str:
    counts: dict[str, int] = {}
    for rc in recipients:
        counts[rc.state] = counts.get(rc.state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def _timeline(msg: MessageRecord, rc: RecipientRecord, api: str) -> list[dict[str, str]]:
    """One recipient's steps, oldest first: what the store knows of them (it keeps the
    message's creation and acceptance times and the recipient's last change)."""
    steps = [{"at": _utc(msg.created_at), "what": "queued", "detail": ""}]
    if rc.hold_until is not None or rc.state in ("held", "bundled", "collapsed"):
        detail = msg.hold_reason or ""
        if rc.state == "held" and rc.hold_until is not None:
            detail = f"{detail}, until {_utc(rc.hold_until)}".lstrip(", ")
        steps.append({"at": "", "what": "held", "detail": detail})
    if rc.state in ("accepted", "delivered", "undelivered") or rc.api_message_id:
        steps.append({"at": _utc(msg.accepted_at), "what": "sent",
                      "detail": f"Clickatell message {rc.api_message_id}" if rc.api_message_id else ""})
    final = {"delivered": "delivered", "undelivered": "undelivered", "failed": "failed",
             "bundled": "bundled", "collapsed": "collapsed", "suppressed": "suppressed",
             "dry_run": "dry run"}.get(rc.state)
    if final is not None:
        parts = []
        known = meaning(rc.error_code, api)
        if rc.error_code:
            parts.append(f"code {rc.error_code}" + (f": {known}" if known else " (not a code we know)"))
        if rc.error and rc.error.rstrip(".") != known:
            parts.append(rc.error)
        if rc.delivery_status:
            parts.append(f"report: {rc.delivery_status}")
        if rc.bundle_id:
            parts.append(f"in summary {rc.bundle_id}")
        steps.append({"at": _utc(rc.updated_at), "what": final, "detail": "; ".join(parts)})
    elif rc.state in ("pending", "held"):
        steps.append({"at": "", "what": "waiting", "detail": rc.state})
    return steps


def _message_row(msg: MessageRecord) -> dict[str, Any]:
    return {"id": msg.id, "at": _utc(msg.created_at), "group": msg.group_id, "level": msg.level,
            "state": msg.state, "status": msg.status, "text": msg.text,
            "recipients": _recipient_summary(msg.recipients)}


def _quiet(q: QuietHours | None) -> str:
    if q is None:
        return "none"
    days = "every day" if len(q.days) == 7 else ", ".join(_DAYS[d] for d in q.days)
    level = f"; {q.min_level} and above still page" if q.min_level else ""
    return f"{q.start:%H:%M}–{q.end:%H:%M} {q.timezone}, {days}{level}"


def _counted(counts: GroupCounts | None) -> dict[str, int]:
    by_state = counts.by_state if counts is not None else {}
    return {name: sum(by_state.get(s, 0) for s in states) for name, states in COUNTED.items()}


def bar_chart(counts: Mapping[str, int]) -> dict[str, Any]:
    """Horizontal bars (SVG coordinates) for the counts, scaled to the largest."""
    top = max(counts.values(), default=0) or 1
    width = 70  # two charts side by side in a group's card
    return {"bars": [{"name": name, "n": n, "y": i * 16, "w": round(width * n / top, 1)}
                     for i, (name, n) in enumerate(counts.items())],
            "height": 16 * len(counts), "width": width}


def _group(g: Group, cfg: Config, day: GroupCounts | None, week: GroupCounts | None) -> dict[str, Any]:
    windows = {"24 h": _counted(day), "7 d": _counted(week)}
    return {"id": g.id, "name": g.name, "level": cfg.group_level(g),
            "members": [mask(m) for m in g.members], "template": g.template,
            "quiet": _quiet(g.quiet_hours),
            "windows": [{"label": k, "counts": v, "chart": bar_chart(v)} for k, v in windows.items()]}


async def _status(r: Receiver) -> dict[str, Any]:
    """The strip on every page: outbox backlog, balances, dry-run, the last reload."""
    out: dict[str, Any] = {"error": None, "backlog": None, "oldest": "-"}
    try:
        stats = await r.store.stats()
    except StoreError as exc:
        out["error"] = f"the outbox cannot be read: {exc}"
    else:
        out["backlog"] = stats.pending + stats.unplanned
        out["oldest"] = _ago(stats.oldest_pending_age(r.clock.now())) if stats.oldest_pending_created_at else "-"
    polled: dict[str, str] = {}
    for metric in r.metrics.balance.collect():  # what the balance poll last read, by account
        for sample in metric.samples:
            polled[sample.labels["account"]] = f"{sample.value:,.2f} {sample.labels['currency']}"
    cfg = r.config
    out["balances"] = [(name, polled.get(name, "not read yet")) for name in Receiver.accounts(cfg)]
    out["dry_run"] = cfg.dry_run
    out["reload_ok"] = r.last_reload_ok
    out["reload_at"] = _utc(r.last_reload_success) or "-"
    return out


# ---------------------------------------------------------------------------------------------
# Handlers


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("receiver", "ui_templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals["MESSAGE_STATES"] = MESSAGE_STATES
    return env


async def _page(request: web.Request, template: str, status: int = 200,
                headers: Mapping[str, str] | None = None, **context: Any) -> web.Response:
    r: Receiver = request.app[UI_RECEIVER]
    text = request.app[UI_TEMPLATES].get_template(template).render(
        strip=await _status(r), nav=request.path, **context)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers={**HEADERS, **(headers or {})})


def _challenge(auth: AdminAuth) -> str:
    # A browser prompts for Basic only: offered whenever it is configured, bearer tokens or not.
    if auth.basic_auth is not None and auth.basic_auth.username:
        return f'Basic realm="{REALM}", charset="UTF-8"'
    return challenge(auth, REALM)


def guarded(handler: Handler) -> Handler:
    """Admin auth (receiver.auth.admin_denied) with an HTML answer for a refusal."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        auth = request.app[UI_RECEIVER].config.admin_auth
        proxied = any(h in request.headers for h in PROXY_HEADERS)
        denied = admin_denied(auth, request.headers.get("Authorization"), request.remote, proxied)
        if denied is None:
            return await handler(request)
        request.app[UI_RECEIVER].refusals.warning(log, "ui refused route=%s status=%d reason=%r",
                                                  request.match_info.route.resource.canonical,
                                                  denied.status, denied.reason)
        headers = {"WWW-Authenticate": _challenge(auth)} if denied.status == 401 else {}
        # no status strip for someone refused: it is the admin's view
        text = request.app[UI_TEMPLATES].get_template("denied.html").render(reason=denied.reason)
        return web.Response(text=text, status=denied.status, content_type="text/html", charset="utf-8",
                            headers={**HEADERS, **headers})

    return wrapped


async def to_index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def history_list(request: web.Request) -> web.Response:
    r: Receiver = request.app[UI_RECEIVER]
    cfg = r.config
    filters, problems = parse_filters(request.query, cfg, r.clock.now())
    context: dict[str, Any] = {"filters": filters.form, "groups": [g.id for g in cfg.groups],
                               "levels": cfg.level_names, "problems": problems, "rows": [],
                               "older": None, "scanned_to": None, "store_error": None,
                               "export": filters.link("/ui/export.csv", before=""),
                               "newest": filters.link("/ui/", before="") if filters.form["before"] else None}
    if problems:
        return await _page(request, "history.html", status=400, **context)
    try:
        page = await r.store.message_history(filters.query)
    except StoreError as exc:
        context["store_error"] = f"the outbox cannot be read: {exc}"
        return await _page(request, "history.html", status=503, **context)
    context["rows"] = [_message_row(m) for m in page.messages]
    if page.next is not None:
        context["older"] = filters.link("/ui/", before=cursor(page.next))
    context["scanned_to"] = _utc(page.scanned_to) if page.scanned_to is not None else None
    return await _page(request, "history.html", **context)


async def message_detail(request: web.Request) -> web.Response:
    r: Receiver = request.app[UI_RECEIVER]
    mid = request.match_info["id"]
    try:
        msg = await r.store.get_message(mid[:100])
    except StoreError as exc:
        return await _page(request, "error.html", status=503, title="Outbox unavailable",
                           reason=f"the outbox cannot be read: {exc}")
    if msg is None:
        return await _page(request, "error.html", status=404, title="No such message",
                           reason=f"no message {mid[:100]!r}: it may have been pruned after the retention period")
    recipients = [{"number": mask(rc.number), "state": rc.state, "steps": _timeline(msg, rc, r.config.clickatell.api)}
                  for rc in msg.recipients]
    two_way = await _two_way(r, msg.id)
    notification = msg.id[:27] if msg.source in ("alertmanager", "grafana") and len(msg.id) > 27 else None
    return await _page(
        request, "message.html", m=msg, created=_utc(msg.created_at), accepted=_utc(msg.accepted_at),
        next_attempt=_utc(msg.next_attempt_at) if msg.state in ("pending", "held") else "",
        recipients=recipients, notification=notification, two_way=two_way,
    )


async def _two_way(r: Receiver, message_id: str) -> dict[str, Any] | None:
    """The two-way page this message is (or escalated), with its acknowledgements and
    escalations; None when it is none (or the store keeps no pages)."""
    pages_of = getattr(r.store, "pages_of", None)
    if pages_of is None:
        return None
    try:
        page = (await pages_of([message_id])).get(message_id)
    except StoreError as exc:
        return {"error": f"the acknowledgements cannot be read: {exc}"}
    if page is None:
        return None
    return {
        "error": None, "ref": page.ref, "first": page.message_id, "acked": _utc(page.acked_at),
        # the label sets two-way paging keeps for its silences (the alerts table shows them too)
        "labels": [{"labels": ", ".join(f"{k}={v}" for k, v in sorted(labels.items())),
                    "resolved": resolved} for _, labels, resolved in page.alerts],
        "acks": [{"by": a.by, "at": _utc(a.at), "until": _utc(a.until), "outcome": a.outcome or "",
                  "undone": _utc(a.unacked_at)} for a in page.acks],
        "escalations": [{"round": e.round, "group": e.group_id, "at": _utc(e.at), "message": e.message_id}
                        for e in page.escalations],
    }


async def groups_page(request: web.Request) -> web.Response:
    r: Receiver = request.app[UI_RECEIVER]
    cfg, now = r.config, r.clock.now()
    try:
        day = {c.group: c for c in await r.store.group_counts(now - DAY)}
        week = {c.group: c for c in await r.store.group_counts(now - 7 * DAY)}
        error = None
    except StoreError as exc:
        day, week, error = {}, {}, f"the outbox cannot be read: {exc}"
    groups = [_group(g, cfg, day.get(g.id), week.get(g.id)) for g in cfg.groups]
    return await _page(request, "groups.html", status=503 if error else 200, groups=groups,
                       store_error=error)


EXPORT_COLUMNS = ("created_at", "message_id", "group", "level", "alert_status", "message_state", "source",
                  "encoding", "parts", "recipient", "recipient_state", "clickatell_message_id",
                  "error_code", "error_meaning", "error", "delivery_status", "recipient_updated_at", "text")


def _export_rows(msg: MessageRecord, api: str) -> list[list[Any]]:
    head = [_utc(msg.created_at), msg.id, msg.group_id, msg.level, msg.status, msg.state, msg.source,
            msg.encoding, msg.parts]
    if not msg.recipients:
        return [head + [""] * 7 + [msg.text]]
    return [head + [mask(rc.number), rc.state, rc.api_message_id or "", rc.error_code or "",
                    meaning(rc.error_code, api) or "", rc.error or "", rc.delivery_status or "",
                    _utc(rc.updated_at), msg.text]
            for rc in msg.recipients]


async def export_csv(request: web.Request) -> web.StreamResponse:
    """The filtered history as CSV, one row per recipient, streamed as it is read: a chunk of
    messages per query, written before the next is read."""
    r: Receiver = request.app[UI_RECEIVER]
    filters, problems = parse_filters(request.query, r.config, r.clock.now())
    if problems:
        return web.Response(text="; ".join(problems) + "\n", status=400, headers=HEADERS)
    query = replace(filters.query, before=None, limit=EXPORT_CHUNK)
    api = r.config.clickatell.api
    try:
        page = await r.store.message_history(query)  # the first chunk before the 200: a store down is a 503
    except StoreError as exc:
        return web.Response(text=f"the outbox cannot be read: {exc}\n", status=503, headers=HEADERS)
    stamp = datetime.fromtimestamp(r.clock.now(), UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(headers={
        **HEADERS, "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="sms-history-{stamp}.csv"'})
    await response.prepare(request)
    if request.method == "HEAD":  # a streamed body is not dropped for HEAD: it would be the next answer
        await response.write_eof()
        return response
    buffer = io.StringIO()
    out = csv.writer(buffer)
    out.writerow(EXPORT_COLUMNS)
    while True:
        for msg in page.messages:
            for row in _export_rows(msg, api):
                out.writerow([csv_cell(v) for v in row])
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
        if page.next is None:
            break
        try:
            page = await r.store.message_history(replace(query, before=page.next))
        except StoreError as exc:  # too late for a status: the last row says it is cut short
            log.warning("CSV export stopped early: %s", exc)
            out.writerow([f"# export incomplete: the outbox could not be read ({exc})"])
            await response.write(buffer.getvalue().encode())
            break
    await response.write_eof()
    return response


def add_routes(app: web.Application, receiver: Receiver) -> None:
    """Register the pages (before web.create_app's catch-all route)."""
    app[UI_RECEIVER] = receiver
    app[UI_TEMPLATES] = _environment()
    app.router.add_get("/ui", guarded(to_index))
    app.router.add_get("/ui/", guarded(history_list))
    app.router.add_get("/ui/messages/{id}", guarded(message_detail))
    app.router.add_get("/ui/groups", guarded(groups_page))
    app.router.add_get("/ui/export.csv", guarded(export_csv))
