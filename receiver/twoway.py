"""Two-way paging, the pure part: Clickatell reply callbacks → :class:`Reply`, reply texts →
:class:`Command`, and the texts the receiver answers with. No I/O here: the web handler
(:func:`receiver.web.reply_callback`) and :mod:`receiver.acks` act on what these return.

Commands (case-insensitive, PRODUCT.md "Two-way paging and escalation"): ``ACK``, ``ACK <ref>``,
``ACK <ref> <duration>``, ``UNACK <ref>``, ``ESC <ref>``, ``HELP``; ``<ref>`` may be written
``42`` or ``#42``. Anything else is ``unknown``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote_to_bytes
from zoneinfo import ZoneInfo

import pydantic_core

from receiver.config import parse_duration
from receiver.encoding import fit
from receiver.models import SmsText

Action = Literal["ack", "unack", "esc", "help", "unknown"]
MAX_ACK = 7 * 86400.0  # the longest silence a reply may ask for: a typo ("ACK 42 2000h") is refused
REF_SUFFIX = " #{ref}"
HELP_TEXT = ("Reply ACK (your last page), ACK <ref>, ACK <ref> 2h (silence for 2h), UNACK <ref>, "
             "ESC <ref> (escalate now), HELP. <ref> is the number after # in the page.")
_MSISDN = re.compile(r"^\d{6,15}$")
_COMMAND = re.compile(r"^\s*(ACK|UNACK|ESC|HELP)\b\s*#?(\d{1,12})?\s*(\S+)?\s*$", re.IGNORECASE)


class BadReply(ValueError):
    """A reply callback body that is not one Clickatell sends: its reason."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One inbound SMS. ``id``: Clickatell's id of the reply (or a digest of its fields), what
    makes a repeated callback harmless; ``related``: Clickatell's id of the message replied to."""

    id: str
    number: str  # E.164 with "+"
    text: str
    related: str | None = None
    related_client: str | None = None  # our message id (One API relatedClientMessageId)


@dataclass(frozen=True, slots=True)
class Command:
    action: Action
    ref: int | None = None
    duration: float | None = None  # seconds (ACK only), None: the group's ack_duration
    problem: str | None = None  # why an ACK/UNACK/ESC cannot be done as written


def parse_command(text: str) -> Command:
    """What a reply asks for. Never raises: a text that is no command is ``unknown``, and one
    that is a command written wrong is that command with its ``problem`` said."""
    m = _COMMAND.match(text.replace("\x00", ""))
    if m is None:
        return Command("unknown")
    word, ref, extra = m.group(1).lower(), m.group(2), m.group(3)
    action: Action = word  # type: ignore[assignment]
    number = int(ref) if ref else None
    if action == "help":
        return Command("help") if number is None and extra is None else Command("unknown")
    if action == "ack":
        duration = None
        if extra is not None:
            if number is None:
                return Command("ack", problem=f"{extra!r} is not a page number: reply ACK <ref> [2h]")
            try:
                duration = parse_duration(extra.lower())
            except ValueError:
                return Command("ack", number, problem=f"{extra!r} is not a duration such as 30m or 2h")
            if not 0 < duration <= MAX_ACK:
                return Command("ack", number, problem=f"{extra} is not between 1s and 7d")
        return Command("ack", number, duration)
    if extra is not None or number is None:
        return Command(action, number, problem=f"reply {word.upper()} <ref>, e.g. {word.upper()} 42")
    return Command(action, number)


# ---------------------------------------------------------------------------------------------
# Callback bodies


_HEX = re.compile(r"(?:[0-9A-Fa-f]{4})+")
_UNSAFE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _decode(text: str, charset: str | None) -> str:
    """Texts in other charsets arrive URL-encoded (reference/clickatell-api.md): decoded with
    their charset; a UTF-8 text is taken as it is."""
    cs = (charset or "UTF-8").strip().upper()
    if cs in ("UTF-8", "UTF8", ""):
        return text
    if cs in ("UCS-2", "UCS2", "UTF-16", "UTF-16BE") and _HEX.fullmatch(text):
        # an SMS's UCS-2 text, given as hex digits (0041 = "A")
        return bytes.fromhex(text).decode("utf-16-be", errors="replace")
    if cs in ("UCS-2", "UCS2"):
        cs = "UTF-16-BE"
    try:
        return unquote_to_bytes(text).decode(cs.lower())
    except (LookupError, UnicodeDecodeError) as exc:
        raise BadReply(f"text cannot be decoded as {cs[:20]}: {type(exc).__name__}") from None


def _number(value: Any, field: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise BadReply(f"{field} is missing")
    # Clickatell sends MSISDNs without "+" (members are E.164 with it); not validated further:
    # a number that is no member is refused by the caller
    digits = str(value).strip().lstrip("+")
    if digits.startswith("00"):
        digits = digits[2:]
    if not _MSISDN.match(digits):
        raise BadReply(f"{field} is not a phone number")
    return "+" + digits


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadReply(f"{field} is missing or not text")
    if len(value) > 2000:
        raise BadReply(f"{field} is longer than an SMS reply can be")
    return value


def _opt(value: Any) -> str | None:
    """An optional id as stored: a string or number, bounded, without control characters or lone
    surrogates (a reply that can never be stored must be a 400, not a 503 Clickatell retries)."""
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value):
        return None
    text = str(value)
    if len(text) > 200 or _UNSAFE.search(text):
        raise BadReply("an id is over 200 characters or holds a control character or lone surrogate")
    return text


def _fallback_id(number: str, text: str, stamp: Any) -> str:
    """No reply id given: one made of what identifies the reply, so a repeat is still one."""
    raw = json.dumps([number, text, _opt(stamp)]).encode()
    return "h:" + hashlib.blake2b(raw, digest_size=12).hexdigest()


def parse_reply_callback(fields: Mapping[str, Any] | bytes) -> list[Reply]:
    """The replies of one callback: the REST/HTTP shape (``fromNumber``, ``text``, ``charset``,
    ``messageId`` of the message replied to, ``replyMessageId``) as JSON, form or query fields,
    or the One API envelope (``event.moText[]``). Raises :class:`BadReply` naming the problem."""
    if isinstance(fields, bytes):
        try:  # pydantic's parser, as for status callbacks: bounded nesting, no lone surrogates
            data = pydantic_core.from_json(fields)
        except ValueError:
            raise BadReply("body is not JSON (nor form fields), or nests too deep") from None
    else:
        data = fields
    if not isinstance(data, Mapping):
        raise BadReply("body must be a JSON object")
    event = data.get("event")
    if isinstance(event, Mapping) and "moText" in event:
        items = event["moText"]
        if not isinstance(items, list) or not items:
            raise BadReply("event.moText must be a non-empty list")
        if len(items) > 100:
            raise BadReply("event.moText has more than 100 replies")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise BadReply(f"event.moText.{i} must be an object")
            number = _number(item.get("from"), f"event.moText.{i}.from")
            text = _decode(_text(item.get("content"), f"event.moText.{i}.content"), _opt(item.get("charset")))
            out.append(Reply(_opt(item.get("messageId")) or _fallback_id(number, text, item.get("timestamp")),
                             number, text, _opt(item.get("relatedMessageId")),
                             _opt(item.get("relatedClientMessageId"))))
        return out
    number = _number(data.get("fromNumber", data.get("from")), "fromNumber")
    text = _decode(_text(data.get("text"), "text"), _opt(data.get("charset")))
    rid = _opt(data.get("replyMessageId")) or _fallback_id(number, text, data.get("timestamp"))
    return [Reply(rid, number, text, _opt(data.get("messageId")))]


# ---------------------------------------------------------------------------------------------
# Texts


def with_ref(sms: SmsText, ref: int, max_parts: int) -> SmsText:
    """``sms`` ending with `` #<ref>``, said once: the text before it is cut (not the ref)
    should the two not fit in ``max_parts``."""
    suffix = REF_SUFFIX.format(ref=ref)
    whole = fit(sms.text + suffix, max_parts)
    if not whole.truncated:
        return whole
    for cut in range(len(sms.text) - 1, -1, -1):  # rare: only a text already near its limit
        candidate = fit(sms.text[:cut].rstrip() + "..." + suffix, max_parts)
        if not candidate.truncated:
            return candidate
    return fit(suffix.strip(), max_parts)


def mask(number: str) -> str:
    """A phone number as shown to others and in silences: its last four digits, as the web page
    and the logs show them, behind a GSM-7 character ("…" would make every confirmation UCS-2)."""
    digits = number.lstrip("+")
    return f"*{digits[-4:]}" if digits else "*"


def matchers(labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """A silence's matchers for exactly one alert's label set (the recorded exchange's shape)."""
    return [{"name": k, "value": v, "isRegex": False, "isEqual": True} for k, v in sorted(labels.items())]


def clock_time(ts: float, zone: str) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone(ZoneInfo(zone)).strftime("%H:%M")


def ack_text(ref: int, until: float, by: str, names: Sequence[str], zone: str, silence: str) -> str:
    """The confirmation to the group: ``ACKED #42 until 14:30 by …999: DiskFull db-1`` and, when
    the silence could not be made, why."""
    shown = ", ".join(names[:5]) + (f" +{len(names) - 5}" if len(names) > 5 else "")
    text = f"ACKED #{ref} until {clock_time(until, zone)} by {by}: {shown}"
    return text + (f" ({silence})" if silence else "")
