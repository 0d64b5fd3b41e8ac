"""Phone numbers: members are written with or without "+", stored as E.164, sent without "+"."""

from __future__ import annotations

import phonenumbers

# How many international forms a local-number error lists before "and N more".
_MAX_SUGGESTIONS = 15


def to_e164(raw: str) -> str:
    """Return the E.164 form of an international number; raise ``ValueError`` if it is not valid.

    A number written the local way (one leading 0, no country code) is refused with the
    international forms it could have in the countries where it is a valid mobile number: the
    country is the operator's to choose, never guessed."""
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        raise ValueError("a phone number must be a string such as '+886911960999'")
    text = str(raw).strip()
    if not text:
        raise ValueError("the phone number is empty: write it in international form, e.g. +886911960999")
    digits = text.lstrip("+")
    if text.startswith("00"):
        digits = text[2:]
    elif digits.startswith("0"):  # no country code starts with 0: "0912…" or "+0912…"
        raise ValueError(_local_number(text))
    try:
        number = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException:
        raise ValueError(f"{text!r} is not a phone number: write it in international form, "
                         "+ then the country code and number, e.g. +886911960999") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError(
            f"{text!r} is not a valid international phone number (country code first, e.g. +886911960999)"
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def local_forms(text: str) -> list[tuple[str, str]]:
    """``(region, e164)`` for every country where ``text``, dialled locally, is a valid mobile
    number (pages go to mobiles), sorted by region code."""
    found = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number) and phonenumbers.number_type(number) in (
            phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE
        ):
            found.append((region, phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)))
    return found


def _local_number(text: str) -> str:
    local = text.lstrip("+")
    head = f"{text!r} is a local number without a country code: write it in international form"
    forms = local_forms(local)
    if not forms:
        return f"{head}, + then the country code and the number without its leading 0, e.g. +886911960999"
    shown = ", ".join(f"{e164} for {region}" for region, e164 in forms[:_MAX_SUGGESTIONS])
    more = f" and {len(forms) - _MAX_SUGGESTIONS} more" if len(forms) > _MAX_SUGGESTIONS else ""
    return f"{head} with its country code, e.g. {shown}{more}"


def msisdn(e164: str) -> str:
    """The form Clickatell wants: digits only, no "+"."""
    return e164.lstrip("+")


def mask(number: str) -> str:
    """For logs: every digit but the last four hidden."""
    digits = number.lstrip("+")
    return ("+" if number.startswith("+") else "") + "*" * max(0, len(digits) - 4) + digits[-4:]
