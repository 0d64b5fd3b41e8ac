"""SMS encodings and parts: GSM-7 or UCS-2, how many parts a text takes, and cutting it to fit.

A text is GSM-7 when every character is in the GSM 03.38 default alphabet or its extension table
(extension characters cost two septets: an escape and the character); anything else makes the
whole text UCS-2, counted in UTF-16 code units (an emoji is two). One SMS holds 160 septets or 70
units; concatenated parts hold 153 or 67, and a part boundary never splits an escape pair or a
surrogate pair, which is why parts are packed one by one rather than divided.
"""

from __future__ import annotations

from receiver.models import Encoding, SmsText

GSM7_BASIC: frozenset[str] = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION: frozenset[str] = frozenset("^{}\\[~]|€\f")

_SINGLE = {"GSM-7": 160, "UCS-2": 70}
_PART = {"GSM-7": 153, "UCS-2": 67}
_ELLIPSIS = {"GSM-7": "...", "UCS-2": "…"}


def encoding_of(text: str) -> Encoding:
    gsm = GSM7_BASIC | GSM7_EXTENSION
    return "GSM-7" if all(ch in gsm for ch in text) else "UCS-2"


def _cost(ch: str, encoding: Encoding) -> int:
    if encoding == "GSM-7":
        return 2 if ch in GSM7_EXTENSION else 1
    return 2 if ord(ch) > 0xFFFF else 1


def units(text: str, encoding: Encoding) -> int:
    """Septets (GSM-7) or UTF-16 code units (UCS-2) the text takes."""
    return sum(_cost(ch, encoding) for ch in text)


def _parts(text: str, encoding: Encoding) -> int:
    total = units(text, encoding)
    if total <= _SINGLE[encoding]:
        return 1
    size, parts, used = _PART[encoding], 1, 0
    for ch in text:  # a character never straddles two parts
        cost = _cost(ch, encoding)
        if used + cost > size:
            parts, used = parts + 1, 0
        used += cost
    return parts


def count_parts(text: str) -> tuple[Encoding, int]:
    """The encoding of ``text`` and how many SMS parts it takes (an empty text takes one)."""
    encoding = encoding_of(text)
    return encoding, _parts(text, encoding)


def _cut(text: str, max_parts: int, encoding: Encoding) -> str:
    """The longest prefix of ``text`` that, with the ellipsis, fits in ``max_parts``."""
    ellipsis = _ELLIPSIS[encoding]
    budget = _SINGLE[encoding] if max_parts == 1 else None
    if budget is not None:  # one SMS: a plain budget of units
        limit = budget - units(ellipsis, encoding)
        used, end = 0, 0
        for i, ch in enumerate(text):
            used += _cost(ch, encoding)
            if used > limit:
                break
            end = i + 1
        return text[:end].rstrip() + ellipsis
    # several parts: pack characters part by part, keeping room for the ellipsis in the last one
    size = _PART[encoding]
    tail = units(ellipsis, encoding)
    parts, used, end = 1, 0, 0
    for i, ch in enumerate(text):
        cost = _cost(ch, encoding)
        if used + cost > size:
            parts, used = parts + 1, 0
        if parts > max_parts or (parts == max_parts and used + cost > size - tail):
            break
        used += cost
        end = i + 1
    return text[:end].rstrip() + ellipsis


def fit(text: str, max_parts: int) -> SmsText:
    """``text`` as it will be sent: unchanged when it fits in ``max_parts`` parts, otherwise cut
    at a character boundary and ended with an ellipsis ("..." in GSM-7, "…" in UCS-2)."""
    if max_parts < 1:
        raise ValueError("max_parts must be at least 1")
    encoding, parts = count_parts(text)
    if parts <= max_parts:
        return SmsText(text, encoding, parts)
    cut = _cut(text, max_parts, encoding)
    if encoding == "UCS-2":
        # Stopping before the first non-GSM character gives a GSM-7 text, which holds more per
        # part: keep whichever cut keeps more of the text.
        gsm = GSM7_BASIC | GSM7_EXTENSION
        prefix = text[: next(i for i, ch in enumerate(text) if ch not in gsm)].rstrip()
        candidate = prefix + _ELLIPSIS["GSM-7"]
        if _parts(candidate, "GSM-7") > max_parts:
            candidate = _cut(prefix, max_parts, "GSM-7")
        if len(candidate) - 3 > len(cut) - 1:
            cut = candidate
    cut_encoding, cut_parts = count_parts(cut)
    return SmsText(cut, cut_encoding, cut_parts, truncated=True)
