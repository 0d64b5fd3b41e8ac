"""Clickatell delivery reports → what they mean for a recipient.

Reports arrive as GET query parameters, a POSTed form or JSON (REST/HTTP integrations), or as
One API JSON (``event.messageStatusUpdate[]``). Duplicates and out-of-order reports happen, so a
report only ever moves a recipient forward (the store enforces that); we key on ``statusCode``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import pydantic_core

from receiver.ingest import not_json
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


_MAX_ID = 200  # Clickatell's ids are 32 hex digits; ours are shorter
_MAX_CODE = 10**6  # no status code comes near; bounds what is stored and shown
_UNSAFE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")  # no database or SMS carries these


def _text(value: Any, field: str, required: bool = False) -> str | None:
    """A string field as stored: refused when it is not a string or number, holds a control
    character or a lone surrogate (which no database or SMS can carry), or is over-long."""
    if value is None or value == "":
        if required:
            raise ValueError(f"{field} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{field} must be a string")
    text = str(value)
    if len(text) > _MAX_ID:
        raise ValueError(f"{field} is longer than {_MAX_ID} characters")
    if _UNSAFE.search(text):
        raise ValueError(f"{field} holds a control character or a lone surrogate")
    return text


def _code(code: Any) -> int:
    """``statusCode`` as a whole number: an integer, or a string of digits (forms and queries)."""
    if isinstance(code, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", code):
        number = int(code)
    elif isinstance(code, int) and not isinstance(code, bool):
        number = code
    else:  # true, 4.5, Infinity, NaN and 1e400 (a float infinity to JSON), "-0x10", objects
        raise ValueError(f"statusCode {str(code)[:20]!r} is not a whole number")
    if not 0 <= number <= _MAX_CODE:
        raise ValueError(f"statusCode is out of range (0 to {_MAX_CODE})")
    return number


def _report(message_id: Any, client_id: Any, code: Any, name: Any,
            table: Mapping[int, tuple[str, Any]]) -> StatusReport:
    api_id = _text(message_id, "messageId", required=True)
    assert api_id is not None
    number = _code(code)
    label, final = table.get(number, ("unknown", None))
    return StatusReport(api_id, _text(client_id, "clientMessageId"),
                        f"{number} {_text(name, 'status') or ''}".strip(), label, final)


def parse_form(body: bytes, what: str = "form body") -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (or query string) as a mapping (the last of
    repeated keys); ``ValueError`` when it is not UTF-8, raw or percent-encoded."""
    try:
        text = body.decode("utf-8")
        return dict(parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict"))
    except UnicodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None


def parse_status_callback(fields: Mapping[str, Any] | bytes) -> list[StatusReport]:
    """Decode one callback request (query/form mapping, or a JSON body). Raise ``ValueError``
    with a short reason for anything that is not a valid report: every string it returns is
    safe to store (no lone surrogate, no control character, bounded length)."""
    if isinstance(fields, (bytes, bytearray)):
        try:  # pydantic's parser: bounded nesting, no lone surrogates, invalid UTF-8 refused
            data = pydantic_core.from_json(bytes(fields))
        except ValueError as exc:
            raise ValueError(not_json(str(exc))) from None
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
