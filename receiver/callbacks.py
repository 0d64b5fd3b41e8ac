"""Clickatell delivery reports → what they mean for a recipient.

Reports arrive as GET query parameters, a POSTed form or JSON (REST/HTTP integrations), or as
One API JSON (``event.messageStatusUpdate[]``). Duplicates and out-of-order reports happen, so a
report only ever moves a recipient forward (the store enforces that); we key on ``statusCode``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from receiver.models import RecipientState

# statusCode → (metric label, final recipient state or None while in progress)
_REST_STATUS: Mapping[int, tuple[str, RecipientState | None]] = {
    1: ("undelivered", "undelivered"),  # MESSAGE_UNKNOWN
    2: ("in_progress", None),  # MESSAGE_QUEUED
    3: ("in_progress", None),  # DELIVERED_TO_GATEWAY
    4: ("delivered", "delivered"),  # RECEIVED_BY_RECIPIENT
    5: ("undelivered", "undelivered"),  # ERROR_WITH_MESSAGE
    6: ("undelivered", "undelivered"),  # USER_CANCELLED_MESSAGE_DELIVERY
    7: ("undelivered", "undelivered"),  # ERROR_DELIVERING_MESSAGE
    8: ("in_progress", None),  # RECEIVED_BY_GATEWAY
    9: ("undelivered", "undelivered"),  # ROUTING_ERROR
    10: ("undelivered", "undelivered"),  # MESSAGE_EXPIRED
    11: ("in_progress", None),  # MESSAGE_QUEUED_FOR_LATER_DELIVERY
    12: ("undelivered", "undelivered"),  # OUT_OF_CREDIT
    14: ("undelivered", "undelivered"),  # MAX_MT_LIMIT_EXCEEDED
}
_ONE_API_STATUS: Mapping[int, tuple[str, RecipientState | None]] = {
    1: ("in_progress", None),  # UNKNOWN
    2: ("in_progress", None),  # QUEUED
    3: ("in_progress", None),  # SCHEDULED
    4: ("in_progress", None),  # SENT_TO_SUPPLIER
    5: ("delivered", "delivered"),  # DEVICE_ACK
    6: ("delivered", "delivered"),  # READ
    20: ("undelivered", "undelivered"),  # EXPIRED
    21: ("undelivered", "undelivered"),  # STOPPED_BY_USER
    23: ("undelivered", "undelivered"),  # DELIVERY_FAILURE
    25: ("undelivered", "undelivered"),  # INSUFFICIENT_ACCOUNT_BALANCE
    29: ("undelivered", "undelivered"),  # RECIPIENT_DOES_NOT_EXIST
    100: ("undelivered", "undelivered"),  # ROUTING_ERROR
}


@dataclass(frozen=True, slots=True)
class StatusReport:
    api_message_id: str
    client_message_id: str | None  # our message id, echoed by Clickatell (we always send it)
    status: str  # "4 RECEIVED_BY_RECIPIENT", as shown in the API
    label: str  # bounded metric label: delivered | undelivered | in_progress | unknown
    final_state: RecipientState | None


def _report(message_id: Any, client_id: Any, code: Any, name: Any,
            table: Mapping[int, tuple[str, Any]]) -> StatusReport:
    if not message_id:
        raise ValueError("messageId is missing")
    try:
        number = int(code)
    except (TypeError, ValueError, OverflowError):  # 1e999 is a float infinity to JSON
        raise ValueError(f"statusCode {code!r} is not a number") from None
    label, final = table.get(number, ("unknown", None))
    return StatusReport(str(message_id), str(client_id) if client_id else None,
                        f"{number} {name or ''}".strip(), label, final)


def parse_status_callback(fields: Mapping[str, Any] | bytes) -> list[StatusReport]:
    """Decode one callback request (query/form mapping, or a JSON body). Raise ``ValueError``."""
    if isinstance(fields, (bytes, bytearray)):
        try:
            data = json.loads(fields)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValueError("body must be a JSON object")
        fields = data
    event = fields.get("event")
    if isinstance(event, dict):  # One API
        updates = event.get("messageStatusUpdate")
        if not isinstance(updates, list):
            raise ValueError("event.messageStatusUpdate must be a list")
        return [
            _report(u.get("messageId"), u.get("clientMessageId"), u.get("statusCode"), u.get("status"),
                    _ONE_API_STATUS)
            for u in updates
            if isinstance(u, dict)
        ]
    message_id = fields.get("messageId") or fields.get("apiMessageId")
    return [_report(message_id, fields.get("clientMessageId"), fields.get("statusCode"),
                    fields.get("status"), _REST_STATUS)]
