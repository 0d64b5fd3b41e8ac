"""Render: a group's template and a notification → the SMS text, safely.

Templates run in Jinja2's sandbox with ``ChainableUndefined`` (a missing label renders empty
rather than failing). A template that fails at run time never loses the page: :meth:`Renderer.render`
then returns a plain :func:`fallback_text` built without Jinja, with ``error`` set so the failure is
counted and logged.

A template can never stop paging: each render runs in the budgeted sandbox of
:mod:`receiver.sandbox` (CPU time and output size); one over budget gets the fallback text
(``error`` names what happened). :func:`template_error` renders every template against a sample
notification under the same budget, so ``check-config`` and reload refuse one that overruns.

``/send`` templates (:meth:`Renderer.render_send`) are either the seed's ``{name}`` syntax
(:func:`render_seed`) or Jinja2 in the same sandbox with strict variables; both run under the
same budget, and a variable the caller did not give raises :class:`MissingVariable` (the item is
refused) instead of rendering empty.

Filters, beside Jinja's own (``lipsum`` is removed):

``hhmm(dt, tz=None, zone=True)``
    "20:34 UTC", "21:34 CET": in ``tz`` (an IANA name; default the group's ``timezone``), with the
    zone's abbreviation unless ``zone=false``; None renders "".
``short_time(dt, fmt="%d %b %H:%M %Z", tz=None)``
    strftime in a zone (default the group's); ``%Z`` is the zone's abbreviation.
``duration(seconds | timedelta)``
    "45s", "5m", "1h5m", "2d3h": at most two units.
``since(dt)``
    the duration from ``dt`` to the render time (``now``): "firing for {{ a.starts_at | since }}".
``sms_truncate(text, length, end="…")``
    at most ``length`` characters, ``end`` included.
``join_labels(labels, keys=None, sep=" ")``
    "k=v k=v", for all labels or the given keys.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import jinja2

from receiver.encoding import fit
from receiver.models import Alert, AlertStatus, GroupDelivery, Notification, SmsText
from receiver.sandbox import MAX_OUTPUT, RENDER_BUDGET, Budget, RenderBudgetExceeded, Sandbox



class GroupInfo(Protocol):
    """What a template sees of the group it renders for (a config ``Group`` is one)."""

    id: str
    name: str
    level: str | None


def _zone(tz: str) -> ZoneInfo | timezone:
    return timezone.utc if tz.upper() == "UTC" else ZoneInfo(tz)


def _abbreviation(local: datetime) -> str:
    name = local.strftime("%Z")
    return f"UTC{name}" if name[:1] in "+-" else name  # zones without a name: "-03" → "UTC-03"


def _context_zone(ctx: jinja2.runtime.Context) -> str:
    group = ctx.get("group")
    tz = group.get("timezone") if isinstance(group, Mapping) else None
    return tz if isinstance(tz, str) and tz else "UTC"


@jinja2.pass_context
def _short_time(ctx: jinja2.runtime.Context, value: datetime | None, fmt: str = "%d %b %H:%M %Z",
                tz: str | None = None) -> str:
    if not isinstance(value, datetime):
        return ""
    local = value.astimezone(_zone(tz or _context_zone(ctx)))
    if fmt == "%H:%M %Z":  # hhmm's, in a loop over the alerts: strftime once
        return f"{local.hour:02d}:{local.minute:02d} {_abbreviation(local)}"
    abbreviation = _abbreviation(local).replace("%", "%%")
    # %Z by hand: strftime's is "+03" for some zones, and "%%Z" must stay literal.
    return local.strftime(re.sub(r"%(.)", lambda m: abbreviation if m[1] == "Z" else m[0], str(fmt)))


@jinja2.pass_context
def _hhmm(ctx: jinja2.runtime.Context, value: datetime | None, tz: str | None = None,
          zone: bool = True) -> str:
    return _short_time(ctx, value, "%H:%M %Z" if zone else "%H:%M", tz)


def _duration(value: float | int | timedelta | None) -> str:
    if value is None:
        return ""
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else value)
    if seconds < 60:
        return f"{max(0, seconds)}s"
    out = []
    for unit, name in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if seconds >= unit:
            out.append(f"{seconds // unit}{name}")
            seconds %= unit
        if len(out) == 2:
            break
    return "".join(out)


@jinja2.pass_context
def _since(ctx: jinja2.runtime.Context, value: datetime | None) -> str:
    now = ctx.get("now")
    if not isinstance(value, datetime) or not isinstance(now, datetime):
        return ""
    return _duration(now - value)


def _sms_truncate(text: Any, length: int, end: str = "…") -> str:
    text = str(text)
    if len(text) <= length:
        return text
    return text[: max(0, length - len(end))].rstrip() + end


def _join_labels(labels: Mapping[str, Any], keys: Iterable[str] | None = None, sep: str = " ") -> str:
    if not isinstance(labels, Mapping):
        return ""
    names = list(keys) if keys is not None else sorted(labels)
    return sep.join(f"{k}={labels[k]}" for k in names if k in labels)


def _environment(undefined: type[jinja2.Undefined] = jinja2.ChainableUndefined) -> Sandbox:
    env = Sandbox(
        undefined=undefined, autoescape=False, keep_trailing_newline=False
    )
    for name, func in dict(
        hhmm=_hhmm,
        short_time=_short_time,
        duration=_duration,
        since=_since,
        sms_truncate=_sms_truncate,
        join_labels=_join_labels,
    ).items():
        env.filters[name] = env.guard_filter(name, func)
    return env


# ---------------------------------------------------------------------------------------------
# Checking a template


@dataclass(frozen=True, slots=True)
class _SampleGroup:
    id: str = "sample"
    name: str = "Sample group"
    level: str | None = None


_SAMPLE_NOW = datetime(2026, 1, 15, 21, 55, tzinfo=timezone.utc)  # fixed: a check is reproducible


def _sample_contexts() -> list[tuple[str, dict[str, Any]]]:
    """A firing notification of several alerts with the usual labels, and a resolved one."""
    started = _SAMPLE_NOW - timedelta(minutes=7)

    def alert(i: int, status: AlertStatus) -> Alert:
        return Alert(
            status=status,
            labels={"alertname": "HighLatency" if i % 2 else "DiskFull", "instance": f"web-{i}:9100",
                    "job": "node", "severity": "critical" if i == 0 else "warning", "env": "prod"},
            annotations={"summary": f"p99 latency above 2s on web-{i}",
                         "description": f"web-{i}:9100 answered in 2.5s (p99) over the last 5 minutes",
                         "runbook_url": "https://runbooks.example/latency"},
            starts_at=started,
            ends_at=_SAMPLE_NOW if status is AlertStatus.RESOLVED else None,
            generator_url="http://prometheus.example/graph?g0.expr=up",
            fingerprint=f"{i:016x}",
        )

    out = []
    for label, status, count in (("firing", AlertStatus.FIRING, 5), ("resolved", AlertStatus.RESOLVED, 1)):
        alerts = tuple(alert(i, status) for i in range(count))
        n = Notification(source="alertmanager", alerts=alerts, status=status,
                         group_labels={"alertname": alerts[0].labels["alertname"]},
                         external_url="http://alertmanager.example", receiver="sms",
                         group_key='{}:{alertname="HighLatency"}')
        delivery = GroupDelivery("sample", "critical", status, alerts)
        out.append((label, build_context(n, delivery, _SampleGroup(), _SAMPLE_NOW.timestamp())))
    return out


def template_error(source: str, *, budget: float = RENDER_BUDGET,
                   timer: Callable[[], float] = time.thread_time) -> str | None:
    """None when ``source`` compiles and renders a sample firing and a sample resolved
    notification within the render budget; else a short message saying what went wrong (the
    line of a syntax error, the budget that ran out, the exception). A failure on an undefined
    value is not reported: the template may need ``/send`` variables or labels the sample lacks."""
    samples = [(f"a sample {label} notification", context) for label, context in _sample_contexts()]
    return _check(_environment(), source, samples, budget, timer)


def _check(env: Sandbox, source: str, samples: list[tuple[str, dict[str, Any]]], budget: float,
           timer: Callable[[], float]) -> str | None:
    """None when ``source`` compiles and renders each sample within the budget; a value a sample
    lacks is not reported (the real notification or the caller's variables may have it)."""
    try:
        compiled = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        return f"template syntax error at line {exc.lineno}: {exc.message}"
    for label, context in samples:
        try:
            env.run(compiled, context, Budget(budget, timer))
        except RenderBudgetExceeded as exc:
            return f"{exc} (rendering {label})"
        except jinja2.UndefinedError:
            continue
        except Exception as exc:  # noqa: BLE001 - reported, as check-config reports everything
            return f"rendering {label} failed: {type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True, slots=True)
class Rendered:
    sms: SmsText
    error: str | None  # set when the fallback text was used


def _rendered(text: str, what: str, context: Mapping[str, Any], max_parts: int) -> Rendered:
    """A template's text as the SMS; an empty one is a failure: the fallback text instead."""
    if text:
        return Rendered(fit(text, max_parts), None)
    return Rendered(fit(fallback_text(context), max_parts), f"{what} rendered an empty text")


class Renderer:
    """Compiled templates. Construct once per config; :meth:`render` never raises and returns
    within about ``budget`` seconds of ``timer`` (CPU time of the rendering thread by default: the
    cost of the template, whatever the load of the machine)."""

    def __init__(self, templates: Mapping[str, str], *, budget: float = RENDER_BUDGET,
                 timer: Callable[[], float] = time.thread_time) -> None:
        self._env = _environment()
        self._budget = budget
        self._timer = timer
        self._templates = {name: self._env.from_string(src) for name, src in templates.items()}
        # /send templates (Jinja2 ones), compiled on first use: their environment is strict
        self._send_env: Sandbox | None = None
        self._send_compiled: dict[tuple[str, str], jinja2.Template] = {}

    def render(self, template: str, context: Mapping[str, Any], max_parts: int) -> Rendered:
        compiled = self._templates.get(template)
        error: str | None
        if compiled is None:
            error = f"unknown template {template!r}"
        else:
            try:
                text = self._env.run(compiled, context, Budget(self._budget, self._timer)).strip()
            except RenderBudgetExceeded as exc:
                error = f"template {template!r} stopped: {exc}"
            except Exception as exc:  # noqa: BLE001 - whatever a template does, the page goes out
                error = f"template {template!r} failed: {type(exc).__name__}: {exc}"
            else:
                return _rendered(text, f"template {template!r}", context, max_parts)
        return Rendered(fit(fallback_text(context), max_parts), error)

    def render_send(self, name: str, template: SendTemplateSource, context: Mapping[str, Any],
                    max_parts: int) -> Rendered:
        """A ``/send`` template (see :func:`render_send_text`) under the same budget as alert
        templates. Raises :class:`MissingVariable` when the caller's variables lack one the
        template uses (the caller gets a 422: never a half-empty SMS); any other failure gets
        the fallback text with ``error`` set, as alert templates do."""
        key = (template.syntax, template.text)
        if template.syntax == "jinja2" and key not in self._send_compiled:
            if self._send_env is None:
                self._send_env = _environment(_StrictVariable)
            try:
                self._send_compiled[key] = self._send_env.from_string(template.text)
            except jinja2.TemplateSyntaxError as exc:  # check-config refuses it: not reached
                return Rendered(fit(fallback_text(context), max_parts), f"send template {name!r}: {exc}")
        budget = Budget(self._budget, self._timer)
        try:
            if template.syntax == "jinja2":
                assert self._send_env is not None
                text = self._send_env.run(self._send_compiled[key], context, budget).strip()
            else:
                text = render_seed(template.text, context.get("variables") or {}, budget).strip()
        except MissingVariable:
            raise
        except RenderBudgetExceeded as exc:
            error = f"send template {name!r} stopped: {exc}"
        except Exception as exc:  # noqa: BLE001 - whatever a template does, the page goes out
            error = f"send template {name!r} failed: {type(exc).__name__}: {exc}"
        else:
            return _rendered(text, f"send template {name!r}", context, max_parts)
        return Rendered(fit(fallback_text(context), max_parts), error)


# ---------------------------------------------------------------------------------------------
# /send templates: the seed's {name} placeholders, or Jinja2 with strict variables


class SendTemplateSource(Protocol):
    """What a ``/send`` template is (a config ``SendTemplate`` is one)."""

    syntax: str  # "seed" or "jinja2"
    text: str


class MissingVariable(jinja2.UndefinedError):
    """A ``/send`` template uses variables the item does not give (``names``, in order of use)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(repr(n) for n in names))
        self.names = names


class _StrictVariable(jinja2.StrictUndefined):
    """Jinja's StrictUndefined (printing, testing or iterating a missing value fails; ``is
    defined`` and ``default`` work), failing with the name of what is missing."""

    __slots__ = ()

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
        name = self._undefined_name
        if name is None or not isinstance(name, str):
            raise jinja2.UndefinedError(self._undefined_message)
        raise MissingVariable([name])

    __add__ = __radd__ = __mul__ = __rmul__ = __div__ = __rdiv__ = __truediv__ = __rtruediv__ = \
        __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pos__ = __neg__ = __call__ = __getitem__ = \
        __lt__ = __le__ = __gt__ = __ge__ = __int__ = __float__ = __complex__ = __pow__ = __rpow__ = \
        __iter__ = __str__ = __len__ = __hash__ = __bool__ = __contains__ = __eq__ = __ne__ = \
        _fail_with_undefined_error

    def __getattr__(self, name: str) -> Any:
        if name[:2] == "__":
            raise AttributeError(name)
        return self._fail_with_undefined_error()


# {name}: a letter or _ then letters, digits, _ or -. Anything else in braces is literal text.
SEED_PLACEHOLDER = re.compile(r"\{([^\W\d][\w-]*)\}")


def _seed_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render_seed(text: str, variables: Mapping[str, Any], budget: Budget | None = None) -> str:
    """The seed's syntax: each ``{name}`` becomes the variable's value (a string as is, any other
    JSON value as JSON). A variable that is missing or null raises :class:`MissingVariable`
    naming every such one; the output is bounded by :data:`MAX_OUTPUT` characters."""
    missing = [m[1] for m in SEED_PLACEHOLDER.finditer(text)
               if variables.get(m[1]) is None]
    if missing:
        raise MissingVariable(list(dict.fromkeys(missing)))
    out: list[str] = []
    size = 0
    last = 0
    for m in SEED_PLACEHOLDER.finditer(text):
        if budget is not None:
            budget.tick()
        value = _seed_value(variables[m[1]])
        out += (text[last:m.start()], value)
        size += m.start() - last + len(value)
        if size > MAX_OUTPUT:
            raise RenderBudgetExceeded(f"rendering produced more than {MAX_OUTPUT} characters")
        last = m.end()
    out.append(text[last:])
    return "".join(out)


def send_context(variables: Mapping[str, Any], group: GroupInfo, level: str, now: float,
                 zone: str | None = None) -> dict[str, Any]:
    """What a ``/send`` template sees: ``variables`` but the null ones (and each by its own name
    where it does not shadow these), ``group``, ``level``, ``source`` ("send") and ``now``. No ``alerts``: there
    are none, and a template that expects them fails as a missing variable, not as ``FIRING 0``."""
    ctx: dict[str, Any] = {
        "group": {"id": group.id, "name": group.name, "level": group.level or "",
                  "timezone": zone or getattr(group, "timezone", None) or "UTC"},
        "level": level,
        "source": "send",
        # a null is no value: it is missing (a 422 naming it), never the text "None"
        "variables": {k: v for k, v in variables.items() if v is not None},
        "now": datetime.fromtimestamp(now, timezone.utc),
    }
    for name, value in variables.items():
        if value is not None:
            ctx.setdefault(name, value)
    return ctx


def send_template_error(text: str, syntax: str, *, budget: float = RENDER_BUDGET,
                        timer: Callable[[], float] = time.thread_time) -> str | None:
    """None when a ``/send`` template is usable; else what is wrong. Seed syntax must not look
    like Jinja2 (``{{``, ``{%``: it would be sent literally); Jinja2 must compile and render a
    sample context within the budget (a missing variable is fine: the caller gives them)."""
    if syntax == "seed":
        if "{{" in text or "{%" in text:
            return ("looks like Jinja2 ({{ or {%) but is in the seed's {name} syntax, where it would be "
                    "sent literally: write it as {syntax: jinja2, text: ...}, or use {name} placeholders")
        return None
    context = send_context({}, _SampleGroup(), "critical", _SAMPLE_NOW.timestamp())
    return _check(_environment(_StrictVariable), text, [("with no variables", context)], budget, timer)


# ---------------------------------------------------------------------------------------------
# Context


def _common(maps: list[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    first, rest = maps[0], maps[1:]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in rest)}


def _alert_dict(a: Alert) -> dict[str, Any]:
    return {
        "status": a.status.value,
        "labels": dict(a.labels),
        "annotations": dict(a.annotations),
        "starts_at": a.starts_at,
        "ends_at": a.ends_at,
        "generator_url": a.generator_url,
        "fingerprint": a.fingerprint,
        "silence_url": a.silence_url,
        "dashboard_url": a.dashboard_url,
        "panel_url": a.panel_url,
        "image_url": a.image_url,
        "values": dict(a.values) if a.values is not None else None,
        "value_string": a.value_string,
    }


def build_context(
    notification: Notification, delivery: GroupDelivery, group: GroupInfo, now: float,
    zone: str | None = None,
) -> dict[str, Any]:
    """The template context of PRODUCT.md for one group's share of a notification.

    ``zone`` is the IANA time zone the time filters use by default (``group.timezone``, shown
    to templates; the pipeline passes the group's, else the config's): None means the group's
    own ``timezone`` attribute if it has one, else UTC.

    ``common_labels``/``common_annotations`` are computed over the alerts this group receives,
    which may be a subset of the notification's. The caller's ``/send`` variables are also
    available by their own names where they do not shadow a key of the context.
    """
    alerts = [_alert_dict(a) for a in delivery.alerts]
    ctx: dict[str, Any] = {
        "alerts": alerts,
        "status": delivery.status.value,
        "level": delivery.level,
        "group": {"id": group.id, "name": group.name, "level": group.level or "",
                  "timezone": zone or getattr(group, "timezone", None) or "UTC"},
        "group_labels": dict(notification.group_labels),
        "common_labels": _common([a["labels"] for a in alerts]),
        "common_annotations": _common([a["annotations"] for a in alerts]),
        "external_url": notification.external_url,
        "source": notification.source,
        "receiver": notification.receiver,
        "group_key": notification.group_key,
        "truncated_alerts": notification.truncated_alerts,
        "title": notification.title,
        "message": notification.message,
        "now": datetime.fromtimestamp(now, timezone.utc),
    }
    return ctx


def fallback_text(context: Mapping[str, Any]) -> str:
    """A plain text from the context, built without Jinja; never raises."""
    try:
        level = str(context.get("level") or "alert").upper()
        status = str(context.get("status") or "firing").upper()
        alerts = context.get("alerts") or []
        if not alerts:
            message = str(context.get("message") or "").strip()
            if message:
                return message
            group = context.get("group") or {}
            name = group.get("name") or group.get("id") or "?"
            variables = context.get("variables") or {}
            extra = " ".join(f"{k}={v}" for k, v in variables.items())
            return f"[{level}] message for group {name}" + (f": {extra}" if extra else "")
        truncated = int(context.get("truncated_alerts") or 0)
        head = f"[{level}] {status} {len(alerts)}" + (f" (+{truncated} not shown)" if truncated else "")
        items = []
        for a in alerts:
            labels, annotations = a.get("labels") or {}, a.get("annotations") or {}
            words = [labels.get("alertname", "alert"), labels.get("instance", ""),
                     annotations.get("summary", "")]
            items.append(" ".join(str(w) for w in words if w))
        return f"{head}: " + "; ".join(items)
    except Exception:  # noqa: BLE001 - the last resort must not fail
        return "[ALERT] a notification arrived but could not be rendered"
