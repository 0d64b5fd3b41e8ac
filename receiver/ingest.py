"""Ingest: each sender's body → one :class:`~receiver.models.Notification`.

Parsing and validation happen in one pass (pydantic straight from the JSON bytes). Unknown keys
are ignored, since Alertmanager and Grafana add keys over time; wrong types and shapes raise
:class:`InvalidPayload` with a short reason that names the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from receiver.models import Alert, AlertStatus, Notification, Source


class InvalidPayload(Exception):
    """The body can never be valid. ``status`` is the HTTP status to answer (400 or 422)."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# ---------------------------------------------------------------------------------------------
# Wire formats (only what we read; everything else is ignored)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _zero_to_none(value: datetime | None) -> datetime | None:
    # Go's zero time (year 1) means "not set": a firing alert's endsAt.
    return None if value is None or value.year <= 1 else value


class _WireAlert(_Wire):
    status: AlertStatus
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: datetime | None = None
    endsAt: datetime | None = None
    generatorURL: str = ""
    fingerprint: str = ""
    # Grafana
    silenceURL: str = ""
    dashboardURL: str = ""
    panelURL: str = ""
    imageURL: str = ""
    values: dict[str, Any] | None = None
    valueString: str = ""

    @field_validator("generatorURL", "silenceURL", "dashboardURL", "panelURL", "imageURL", mode="before")
    @classmethod
    def _null_is_empty(cls, v: Any) -> Any:
        return "" if v is None else v


class _WireNotification(_Wire):
    version: str = ""
    status: AlertStatus = AlertStatus.FIRING
    receiver: str = ""
    groupKey: str = ""
    truncatedAlerts: int = Field(0, ge=0)
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[_WireAlert] = Field(min_length=1)
    # Grafana
    title: str = ""
    message: str = ""

    @field_validator("groupLabels", "commonLabels", "commonAnnotations", mode="before")
    @classmethod
    def _null_is_empty_map(cls, v: Any) -> Any:
        return {} if v is None else v


# ---------------------------------------------------------------------------------------------


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """A stable 16-hex fingerprint for senders that do not send one (Alertmanager < 0.19)."""
    h = hashlib.sha256()
    for name in sorted(labels):
        h.update(name.encode())
        h.update(b"\xff")
        h.update(labels[name].encode())
        h.update(b"\xff")
    return h.hexdigest()[:16]


def _describe(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "required" if err["type"] == "missing" else err["msg"]
        parts.append(f"{loc}: {msg}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


_LEGACY_GRAFANA_KEYS = ("evalMatches", "ruleId", "ruleName", "ruleUrl")


WebhookBody = _WireNotification  # a validated webhook, as sent (only what we read)


def validate_webhook(body: bytes, source: Literal["alertmanager", "grafana"]) -> WebhookBody:
    """Validate a webhook body; raise :class:`InvalidPayload` naming what is wrong. What the
    answer path needs (the planner builds the :class:`Notification` later, from the body)."""
    return _decode(body, source)


def _decode(body: bytes, source: Source) -> _WireNotification:
    try:
        return _WireNotification.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise InvalidPayload(f"body is not valid JSON: {first['msg']}", 400) from None
        if first["type"] == "model_type" and not first["loc"]:
            raise InvalidPayload("body must be a JSON object with an 'alerts' list", 422) from None
        if source == "grafana" and any(k.encode() in body for k in _LEGACY_GRAFANA_KEYS) and (
            b'"alerts"' not in body
        ):
            raise InvalidPayload(
                "legacy Grafana alerting (before 8.0) webhook body is not supported: "
                "use a unified-alerting webhook contact point",
                422,
            ) from None
        raise InvalidPayload(_describe(exc), 422) from None


def parse_webhook(body: bytes, source: Literal["alertmanager", "grafana"]) -> Notification:
    """Decode an Alertmanager (v4) or Grafana (unified alerting) webhook body."""
    return notification_of(_decode(body, source), source)


def notification_of(wire: WebhookBody, source: Literal["alertmanager", "grafana"]) -> Notification:
    """The internal model of a validated webhook."""
    alerts = tuple(
        Alert(
            status=a.status,
            labels=a.labels,
            annotations=a.annotations,
            starts_at=_zero_to_none(a.startsAt),
            ends_at=_zero_to_none(a.endsAt),
            generator_url=a.generatorURL,
            fingerprint=a.fingerprint or label_fingerprint(a.labels),
            silence_url=a.silenceURL,
            dashboard_url=a.dashboardURL,
            panel_url=a.panelURL,
            image_url=a.imageURL,
            values=a.values,
            value_string=a.valueString,
        )
        for a in wire.alerts
    )
    return Notification(
        source=source,
        alerts=alerts,
        status=wire.status,
        receiver=wire.receiver,
        group_key=wire.groupKey,
        group_labels=wire.groupLabels,
        common_labels=wire.commonLabels,
        common_annotations=wire.commonAnnotations,
        external_url=wire.externalURL,
        truncated_alerts=wire.truncatedAlerts,
        title=wire.title,
        message=wire.message,
    )


def dedup_key(n: Notification) -> str:
    """Identity of a notification for replay detection.

    Alertmanager retries, repeats and HA peers send the same group with the same alerts in the
    same states; any change (an alert added, one resolving, a new startsAt) is a new key.
    """
    return _key(n.source, n.group_key,
                [_alert_key(a.fingerprint, a.status, a.starts_at) for a in n.alerts])


def webhook_key(wire: WebhookBody, source: Source) -> str:
    """:func:`dedup_key` of ``notification_of(wire, source)``, without building it."""
    return _key(source, wire.groupKey, [
        _alert_key(a.fingerprint or label_fingerprint(a.labels), a.status, _zero_to_none(a.startsAt))
        for a in wire.alerts
    ])


def _alert_key(fingerprint: str, status: AlertStatus, starts_at: datetime | None) -> str:
    return f"{fingerprint}:{status.value}:{starts_at.isoformat() if starts_at else ''}"


def _key(source: str, group_key: str, alerts: list[str]) -> str:
    """One hash of the source, group key and sorted alerts, each ended by a NUL."""
    alerts.sort()
    alerts.append("")
    return hashlib.sha256(f"{source}\x00{group_key}\x00{chr(0).join(alerts)}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The seed's /send API


class SendItem(_Wire):
    """One item of ``POST /send``: a literal ``message``, or the group's template with variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groupId: str = Field(min_length=1)
    useTemplate: bool = False
    template: str | None = None  # our extension: a named template instead of the group's own
    variables: dict[str, Any] = Field(default_factory=dict)
    message: str | None = None

    def problem(self) -> str | None:
        if self.useTemplate and self.message is not None:
            return "give either message or useTemplate, not both"
        if not self.useTemplate and not (self.message or "").strip():
            return "message is required (or useTemplate: true)"
        return None


def parse_send(body: bytes) -> list[SendItem | InvalidPayload]:
    """Decode a ``/send`` body: a JSON list (or a single object) of items.

    Each item is validated on its own, so one bad item does not reject the others.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"body is not valid JSON: {exc}", 400) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise InvalidPayload("body must be a non-empty JSON list of {groupId, …} items", 422)
    out: list[SendItem | InvalidPayload] = []
    for item in data:
        try:
            parsed = SendItem.model_validate(item)
        except ValidationError as exc:
            out.append(InvalidPayload(_describe(exc)))
            continue
        problem = parsed.problem()
        out.append(InvalidPayload(problem) if problem else parsed)
    return out


def send_notification(item: SendItem) -> Notification:
    """A ``/send`` item as a notification with no alerts (the template sees ``variables``)."""
    return Notification(
        source="send",
        alerts=(),
        message=item.message or "",
        variables=item.variables,
    )
