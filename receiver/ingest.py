"""Ingest: each sender's body → one :class:`~receiver.models.Notification`, validated.

Webhook bodies are parsed and validated in one pass by pydantic (JSON straight into the wire
models below, in Rust). Unknown keys are ignored, since Alertmanager and Grafana add keys over
time; wrong types and shapes raise :class:`InvalidPayload` with a short reason that names the
field (``alerts.0.labels.a: Input should be a valid string``): 400 for a body that is not JSON,
422 for JSON of the wrong shape.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from receiver.models import Alert, AlertStatus, Notification

WebhookSource = Literal["alertmanager", "grafana"]


class InvalidPayload(Exception):
    """The body can never be valid. ``status`` is the HTTP status to answer (400 or 422)."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# ---------------------------------------------------------------------------------------------
# Wire formats (only what we read; everything else is ignored). Grafana sends null for unset
# strings and maps: accepted here, read as "" and {}. Times keep microseconds (Alertmanager's
# nanoseconds are truncated).


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _WireAlert(_Wire):
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] | None = None
    startsAt: datetime | None = None
    endsAt: datetime | None = None
    generatorURL: str | None = None
    fingerprint: str | None = None
    # Grafana
    silenceURL: str | None = None
    dashboardURL: str | None = None
    panelURL: str | None = None
    imageURL: str | None = None
    values: dict[str, Any] | None = None
    valueString: str | None = None


class _WireNotification(_Wire):
    alerts: list[_WireAlert] = Field(min_length=1)
    version: str | None = None
    status: Literal["firing", "resolved"] = "firing"
    receiver: str | None = None
    groupKey: str | None = None
    truncatedAlerts: int = Field(0, ge=0)
    groupLabels: dict[str, str] | None = None
    commonLabels: dict[str, str] | None = None
    commonAnnotations: dict[str, str] | None = None
    externalURL: str | None = None
    # Grafana
    title: str | None = None
    message: str | None = None
    orgId: Any = None  # only to tell a Grafana body from an Alertmanager one
    state: Any = None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _zero_to_none(value: datetime | None) -> datetime | None:
    # Go's zero time (year 1) means "not set": a firing alert's endsAt.
    return None if value is None or value.year <= 1 else value


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """A stable 16-hex fingerprint for senders that do not send one (Alertmanager < 0.19)."""
    h = hashlib.sha256()
    for name in sorted(labels):
        h.update(name.encode())
        h.update(b"\xff")
        h.update(labels[name].encode())
        h.update(b"\xff")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Errors that name the field


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _message(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required"
    if kind.startswith(("datetime", "date_")):
        return f"not an RFC 3339 time: {str(err.get('input'))[:40]!r}"
    return str(err["msg"])


def describe(exc: ValidationError, limit: int = 3) -> str:
    """The first ``limit`` problems as ``path: what``, and how many more there are."""
    errors = exc.errors(include_url=False)
    parts = [f"{_where(e['loc'])}: {_message(e)}" for e in errors[:limit]]
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


_LEGACY_GRAFANA_KEYS = ("evalMatches", "ruleId", "ruleName", "ruleUrl")


def not_json(parser_message: str) -> str:
    """The reason for a body the JSON parser refused, with a hint where its words are obscure
    (a lone ``\\ud800`` escape reads as "unexpected end of hex escape")."""
    hint = (" (a \\ud800-\\udfff escape must be half of a surrogate pair)"
            if "surrogate" in parser_message or "hex escape" in parser_message else "")
    return f"body is not valid JSON: {parser_message.removeprefix('Invalid JSON: ')[:160]}{hint}"


def _problem(exc: ValidationError, body: bytes, source: WebhookSource) -> InvalidPayload:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return InvalidPayload(not_json(first["msg"]), 400)
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidPayload("body must be a JSON object with an 'alerts' list", 422)
    if source == "grafana":
        data = pydantic_core.from_json(body)
        if isinstance(data, dict) and "alerts" not in data and any(k in data for k in _LEGACY_GRAFANA_KEYS):
            return InvalidPayload(
                "legacy Grafana alerting (before 8.0) webhook body is not supported: "
                "use a unified-alerting webhook contact point", 422)
    return InvalidPayload(describe(exc), 422)


# ---------------------------------------------------------------------------------------------
# Webhooks


Webhook = _WireNotification  # a validated webhook body, as sent (only what we read)


def validate_webhook(body: bytes, source: WebhookSource) -> Webhook:
    """Validate an Alertmanager (v4) or Grafana (unified alerting) webhook body; raise
    :class:`InvalidPayload` naming what is wrong."""
    try:
        return _WireNotification.model_validate_json(body)
    except ValidationError as exc:
        raise _problem(exc, body, source) from None


_GRAFANA_KEYS = frozenset({"orgId", "state", "title", "message"})  # Grafana always sends all four


def endpoint_problem(wire: Webhook, source: WebhookSource) -> InvalidPayload | None:
    """A 422 when a validated body belongs to the other endpoint: a Grafana body on
    ``/webhook/alertmanager`` (it would skip Grafana's signature check), or an Alertmanager body
    (none of Grafana's keys) on ``/webhook/grafana``. Checked where webhooks arrive only: stored
    bodies are re-parsed with :func:`parse_webhook`, which does not ask."""
    grafana = sorted(_GRAFANA_KEYS & wire.model_fields_set)
    if source == "alertmanager" and grafana:
        return InvalidPayload(f"this is a Grafana webhook body (it has {', '.join(grafana)}): send it to "
                              "/webhook/grafana, where Grafana's checks apply", 422)
    if source == "grafana" and not grafana:
        return InvalidPayload("this is not a Grafana webhook body (no orgId, state, title or message): "
                              "Alertmanager sends to /webhook/alertmanager", 422)
    return None


def parse_webhook(body: bytes, source: WebhookSource) -> Notification:
    """A webhook body as the internal model (see :func:`validate_webhook`)."""
    return notification_of(validate_webhook(body, source), source)


def _no_nul(values: Mapping[str, str]) -> Mapping[str, str]:
    """NUL is valid JSON but no PostgreSQL text can hold it: it would fail the page's planning
    after the webhook was answered 2xx. Replaced (refusing the webhook would drop the page)."""
    if not any("\x00" in k or "\x00" in v for k, v in values.items()):
        return values
    return {k.replace("\x00", "\ufffd"): v.replace("\x00", "\ufffd") for k, v in values.items()}


def notification_of(wire: Webhook, source: WebhookSource) -> Notification:
    alerts = tuple(
        Alert(
            status=AlertStatus(a.status),
            labels=_no_nul(a.labels),
            annotations=_no_nul(a.annotations or {}),
            starts_at=_zero_to_none(a.startsAt),
            ends_at=_zero_to_none(a.endsAt),
            generator_url=a.generatorURL or "",
            fingerprint=a.fingerprint or label_fingerprint(a.labels),
            silence_url=a.silenceURL or "",
            dashboard_url=a.dashboardURL or "",
            panel_url=a.panelURL or "",
            image_url=a.imageURL or "",
            values=a.values,
            value_string=a.valueString or "",
        )
        for a in wire.alerts
    )
    return Notification(
        source=source,
        alerts=alerts,
        status=AlertStatus(wire.status),
        receiver=wire.receiver or "",
        group_key=wire.groupKey or "",
        group_labels=_no_nul(wire.groupLabels or {}),
        common_labels=_no_nul(wire.commonLabels or {}),
        common_annotations=_no_nul(wire.commonAnnotations or {}),
        external_url=wire.externalURL or "",
        truncated_alerts=wire.truncatedAlerts,
        title=wire.title or "",
        message=wire.message or "",
    )


def dedup_key(wire: Webhook, source: WebhookSource) -> str:
    """Identity of a notification for replay detection: its source, group key, and each
    alert's fingerprint, status and start.

    Alertmanager retries, repeats and HA peers send the same group with the same alerts in the
    same states; any change (an alert added, one resolving, a new startsAt) is a new key.
    """
    alerts = sorted(
        f"{a.fingerprint or label_fingerprint(a.labels)}:{a.status}:{_micros(a.startsAt)}"
        for a in wire.alerts
    )
    return hashlib.sha256("\x00".join([source, wire.groupKey or "", *alerts, ""]).encode()).hexdigest()


def _micros(value: datetime | None) -> int | str:
    """An instant as integer microseconds since the epoch ("" when not set): the same instant
    written with any offset is the same key; a time without an offset is UTC."""
    if (value := _zero_to_none(value)) is None:
        return ""
    return ((value if value.tzinfo else value.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


# ---------------------------------------------------------------------------------------------
# The seed's /send API


class SendItem(BaseModel):
    """One item of ``POST /send``: a ``message`` (its ``{name}`` placeholders filled from
    ``variables`` when there are any), or ``useTemplate`` with ``variables``: the group's
    ``send_template`` or the named ``template``, a ``send_templates`` entry (see
    :mod:`receiver.send`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groupId: str = Field(min_length=1)
    useTemplate: bool = False
    template: str | None = None  # our extension: a send template instead of the group's send_template
    variables: dict[str, Any] = Field(default_factory=dict)
    message: str | None = None

    def problem(self) -> str | None:
        if self.useTemplate and self.message is not None:
            return "give either message or useTemplate, not both"
        if not self.useTemplate and self.template is not None:
            return "template is used with useTemplate: true only"
        if not self.useTemplate and not (self.message or "").strip():
            return "message is required (or useTemplate: true)"
        return _unfit(self.message or "", "message") or _unfit(self.variables, "variables")


# NUL and the other C0 controls but tab and newlines: no SMS carries them, PostgreSQL text
# refuses NUL. (Lone surrogates never get this far: the JSON parser refuses them.)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _unfit(value: Any, where: str) -> str | None:
    """The first string (key or value) holding a control character, or number that is not
    finite (1e400 parses as infinity), in a JSON value; the parser bounds its nesting."""
    if isinstance(value, str):
        bad = _CONTROL.search(value)
        return None if bad is None else f"{where}: holds a control character (U+{ord(bad.group()):04X})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: numbers must be finite"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{where}.{key!s:.40}"
        if problem := (_unfit(key, here) if isinstance(key, str) else None) or _unfit(item, here):
            return problem
    return None


def parse_send(body: bytes) -> list[SendItem | InvalidPayload]:
    """Decode a ``/send`` body: a JSON list (or a single object) of items.

    Each item is validated on its own, so one bad item does not reject the others.
    """
    try:
        # no NaN or Infinity (1e400 is one): variables are rendered into texts
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidPayload(not_json(str(exc)), 400) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise InvalidPayload("body must be a non-empty JSON list of {groupId, …} items", 422)
    out: list[SendItem | InvalidPayload] = []
    for item in data:
        try:
            parsed = SendItem.model_validate(item)
        except ValidationError as exc:
            out.append(InvalidPayload(describe(exc)))
            continue
        problem = parsed.problem()
        out.append(InvalidPayload(problem) if problem else parsed)
    return out
