"""Phone numbers: members are written with or without "+", stored as E.164, sent without "+"."""

from __future__ import annotations

import phonenumbers


def to_e164(raw: str) -> str:
    """Return the E.164 form of an international number; raise ``ValueError`` if it is not valid."""
    if not isinstance(raw, (str, int)):
        raise ValueError("a phone number must be a string such as '+886911960999'")
    text = str(raw).strip()
    digits = text.lstrip("+")
    if text.startswith("00"):
        digits = text[2:]
    try:
        number = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"{text!r} is not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError(
            f"{text!r} is not a valid international phone number (country code first, e.g. +886911960999)"
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def msisdn(e164: str) -> str:
    """The form Clickatell wants: digits only, no "+"."""
    return e164.lstrip("+")


def mask(number: str) -> str:
    """For logs: every digit but the last four hidden."""
    digits = number.lstrip("+")
    return ("+" if number.startswith("+") else "") + "*" * max(0, len(digits) - 4) + digits[-4:]
