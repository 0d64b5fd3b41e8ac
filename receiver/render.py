"""Render: a group's template and a notification → the SMS text, safely.

Templates run in Jinja2's sandbox with ``ChainableUndefined`` (a missing label renders empty
rather than failing). A template that fails at run time never loses the page: :meth:`Renderer.render`
then returns a plain :func:`fallback_text` built without Jinja, with ``error`` set so the failure is
counted and logged.

Filters, beside Jinja's own:

``hhmm(dt, tz="UTC")``
    "20:34" (``tz`` an IANA zone name); None renders "".
``short_time(dt, fmt="%d %b %H:%M", tz="UTC")``
    strftime in a zone.
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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from receiver.encoding import fit
from receiver.models import Alert, GroupDelivery, Notification, SmsText


class GroupInfo(Protocol):
    """What a template sees of the group it renders for (a config ``Group`` is one)."""

    id: str
    name: str
    level: str | None


def _zone(tz: str) -> ZoneInfo | timezone:
    return timezone.utc if tz.upper() == "UTC" else ZoneInfo(tz)


def _short_time(value: datetime | None, fmt: str = "%d %b %H:%M", tz: str = "UTC") -> str:
    if not isinstance(value, datetime):
        return ""
    return value.astimezone(_zone(tz)).strftime(fmt)


def _hhmm(value: datetime | None, tz: str = "UTC") -> str:
    return _short_time(value, "%H:%M", tz)


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


_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, with ``a.labels.alertname`` on the context's plain dicts looked up
    directly. Jinja tries ``getattr`` first and falls back to the item on AttributeError: for a
    name that is not a dict attribute that always ends in the item (or undefined), the same
    result without raising (an exception per dot was most of a 10-alert render)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except (TypeError, KeyError):  # TypeError: an unhashable name cannot be a key
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


def _environment() -> SandboxedEnvironment:
    env = _Sandbox(
        undefined=jinja2.ChainableUndefined, autoescape=False, keep_trailing_newline=False
    )
    env.filters.update(
        hhmm=_hhmm,
        short_time=_short_time,
        duration=_duration,
        since=_since,
        sms_truncate=_sms_truncate,
        join_labels=_join_labels,
    )
    return env


def template_error(source: str) -> str | None:
    """None when ``source`` compiles; else a short message naming the line."""
    try:
        _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        return f"template syntax error at line {exc.lineno}: {exc.message}"
    return None


@dataclass(frozen=True, slots=True)
class Rendered:
    sms: SmsText
    error: str | None  # set when the fallback text was used


class Renderer:
    """Compiled templates. Construct once per config; :meth:`render` never raises."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        env = _environment()
        self._templates = {name: env.from_string(src) for name, src in templates.items()}

    def render(self, template: str, context: Mapping[str, Any], max_parts: int) -> Rendered:
        compiled = self._templates.get(template)
        error: str | None
        if compiled is None:
            error = f"unknown template {template!r}"
        else:
            try:
                text = compiled.render(context).strip()
            except Exception as exc:  # noqa: BLE001 - whatever a template does, the page goes out
                error = f"template {template!r} failed: {type(exc).__name__}: {exc}"
            else:
                if text:
                    return Rendered(fit(text, max_parts), None)
                error = f"template {template!r} rendered an empty text"
        return Rendered(fit(fallback_text(context), max_parts), error)


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
    notification: Notification, delivery: GroupDelivery, group: GroupInfo, now: float
) -> dict[str, Any]:
    """The template context of PRODUCT.md for one group's share of a notification.

    ``common_labels``/``common_annotations`` are computed over the alerts this group receives,
    which may be a subset of the notification's. The caller's ``/send`` variables are also
    available by their own names where they do not shadow a key of the context.
    """
    alerts = [_alert_dict(a) for a in delivery.alerts]
    ctx: dict[str, Any] = {
        "alerts": alerts,
        "status": delivery.status.value,
        "level": delivery.level,
        "group": {"id": group.id, "name": group.name, "level": group.level or ""},
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
        "variables": dict(notification.variables),
        "now": datetime.fromtimestamp(now, timezone.utc),
    }
    for name, value in notification.variables.items():
        ctx.setdefault(name, value)
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
