"""Clickatell client: the REST, HTTP and One API integration types, and error mapping.

It speaks HTTP through httpx, which also takes the proxy from the environment (``HTTPS_PROXY``,
``HTTP_PROXY``, ``NO_PROXY``) when the client is made: at start and after a reload that changes
``clickatell``.

Error codes are normalised: the REST/HTTP family as three-digit strings ("001", "108"), One API
codes as plain strings ("1", "25"). :func:`classify` maps a code (or, without one, an HTTP status)
to what the caller should do, from the tables below: data, not branches.

Contract of :meth:`ClickatellClient.send` — ``SendOutcome.recipients`` lists what is known per
recipient, whatever ``kind`` says:

- ``accepted=True``: done, never send it again;
- ``accepted=False`` with a code that :func:`classify` calls ``PERMANENT``: failed for good
  (105 invalid number, 121 blocked …);
- anyone else (absent from ``recipients``, or without such a code): not sent; retry or give up
  according to ``kind`` (TRANSIENT: later; CONFIG: after the key/account is fixed; PERMANENT: never).

The API key never appears in an error, a repr or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import httpx

Api = Literal["rest", "http", "one_api"]


class Kind(StrEnum):
    OK = "ok"
    TRANSIENT = "transient"  # retry with backoff
    CONFIG = "config"  # wrong key, account or sender: hold until a reload fixes it
    PERMANENT = "permanent"  # never succeeds as sent (our bug, or the content)

    @property
    def severity(self) -> int:
        """Which kind wins when several requests for one text answer differently: what keeps
        the page alive (hold for a fixed key, retry) before what gives it up."""
        return _SEVERITY[self]


_SEVERITY = {Kind.OK: 0, Kind.PERMANENT: 1, Kind.TRANSIENT: 2, Kind.CONFIG: 3}


# REST/HTTP family (legacy numbering) and One API codes → what to do.
# Per-recipient codes (105, 114, 121, 122; One API 25, 26) are PERMANENT for that recipient only.
_REST_CODES: Mapping[str, Kind] = {
    "001": Kind.CONFIG, "007": Kind.CONFIG, "106": Kind.CONFIG, "108": Kind.CONFIG,
    "123": Kind.CONFIG,
    "100": Kind.PERMANENT, "101": Kind.PERMANENT, "113": Kind.PERMANENT,
    "105": Kind.PERMANENT, "114": Kind.PERMANENT, "121": Kind.PERMANENT, "122": Kind.PERMANENT,
    "130": Kind.TRANSIENT, "301": Kind.TRANSIENT, "901": Kind.TRANSIENT,
}
_ONE_API_CODES: Mapping[str, Kind] = {
    "1": Kind.CONFIG, "2": Kind.CONFIG, "3": Kind.CONFIG, "7": Kind.CONFIG, "45": Kind.CONFIG,
    "21": Kind.PERMANENT, "22": Kind.PERMANENT, "23": Kind.PERMANENT, "24": Kind.PERMANENT,
    "100": Kind.PERMANENT, "25": Kind.PERMANENT, "26": Kind.PERMANENT,
    "18": Kind.TRANSIENT, "19": Kind.TRANSIENT, "20": Kind.TRANSIENT, "43": Kind.TRANSIENT,
}
_CODES = {**_ONE_API_CODES, **_REST_CODES}  # the spellings never collide ("1" vs "001")


def _status_kind(status: int | None) -> Kind:
    if status is None or status == 429 or status >= 500 or status == 402:
        return Kind.TRANSIENT  # no answer, rate limit, server trouble, no credit (a top-up fixes)
    if status in (401, 403):
        return Kind.CONFIG
    if status >= 400:
        return Kind.PERMANENT
    return Kind.OK


def normalise_code(code: Any, api: Api = "rest") -> str | None:
    """``108``/``"108"``/``"0108"`` → ``"108"``, ``1`` → ``"001"`` (REST family); One API as is."""
    if code is None or code == "":
        return None
    text = str(code).strip()
    if not text.isdigit():
        return text
    return str(int(text)) if api == "one_api" else f"{int(text):03d}"


def classify(code: str | int | None, http_status: int | None) -> Kind:
    """What to do about an error: by its code when known, else by the HTTP status."""
    if code is not None:
        text = str(code)
        kind = _CODES.get(text) or _CODES.get(normalise_code(text) or "")
        if kind is not None:
            return kind
    return _status_kind(http_status)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    to: str  # MSISDN digits, no "+"
    accepted: bool
    api_message_id: str | None = None
    error_code: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SendOutcome:
    kind: Kind
    recipients: tuple[RecipientResult, ...]
    http_status: int | None
    api: str
    duration: float
    error_code: str | None = None
    error: str | None = None
    retry_after: float | None = None


class ClickatellError(Exception):
    """A balance or status query failed (the message never contains the key)."""


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):  # neither seconds nor an HTTP date: no hint
        return None


def _snippet(text: str) -> str:
    return " ".join(text.split())[:200]


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return None


@dataclass(slots=True)
class _Answer:
    """One HTTP exchange, before it is read as one API or another."""

    status: int | None
    body: Any = None
    text: str = ""
    retry_after: float | None = None
    network_error: str | None = None


class ClickatellClient:
    """One connection pool (``max_connections``) for one config. A reload replaces it:
    :meth:`aclose` then waits until whoever is :meth:`using` it is done."""

    def __init__(self, *, base_url: str, api: Api, timeout: float, max_connections: int = 20) -> None:
        self.base_url = base_url.rstrip("/")
        self.api: Api = api
        self._users = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.timeout = timeout  # a whole request's, not each phase's (httpx's)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            headers={"Accept": "application/json"},
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"ClickatellClient(base_url={self.base_url!r}, api={self.api!r})"

    @contextlib.contextmanager
    def using(self) -> Iterator[ClickatellClient]:
        """Hold the client open across several requests (all of one message's)."""
        self._users += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._users -= 1
            if not self._users:
                self._idle.set()

    async def aclose(self) -> None:
        await self._idle.wait()
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, *, key: str, key_in_header: bool = True, **kwargs: Any
    ) -> _Answer:
        # The raw key, no "Bearer"; the HTTP API carries it in the query instead.
        headers = {"Authorization": key} if key_in_header else {}
        try:
            # httpx times connect, write and each read apart: bound the whole request, so that
            # a send ends within its claim's lease (another replica takes it over after that)
            async with asyncio.timeout(self.timeout):
                with self.using():
                    response = await self._http.request(method, path, headers=headers, **kwargs)
        except (httpx.TimeoutException, TimeoutError):
            return _Answer(None, network_error="timed out")
        except httpx.HTTPError as exc:
            # str(exc) may contain the URL, and for the HTTP API the URL holds the key
            return _Answer(None, network_error=f"connection failed ({type(exc).__name__})")
        return _Answer(response.status_code, _json_or_none(response.content),
                       response.content.decode("utf-8", "replace"), _retry_after(response.headers))

    # -- send ----------------------------------------------------------------------------------

    async def send(
        self,
        *,
        api_key: str,
        to: Sequence[str],
        content: str,
        client_message_id: str,
        from_: str = "",
    ) -> SendOutcome:
        """Send one text to up to 200 recipients (MSISDN digits; a leading "+" is stripped)."""
        if len(to) > 200:
            raise ValueError("Clickatell takes at most 200 recipients per request")
        numbers = [n.lstrip("+") for n in to]
        start = time.monotonic()
        if self.api == "rest":
            body: dict[str, Any] = {"content": content, "to": numbers, "clientMessageId": client_message_id}
            if from_:
                body["from"] = from_
            answer = await self._request("POST", "/messages", key=api_key, json=body)
            return self._rest_outcome(answer, numbers, time.monotonic() - start, "rest")
        if self.api == "one_api":
            items = []
            for n in numbers:
                item = {"channel": "sms", "to": n, "content": content, "clientMessageId": client_message_id}
                if from_:
                    item["from"] = from_
                items.append(item)
            answer = await self._request("POST", "/v1/message", key=api_key, json={"messages": items})
            return self._one_api_outcome(answer, numbers, time.monotonic() - start)
        # HTTP API: one recipient per request, sent concurrently, merged
        outcomes = await asyncio.gather(*[
            self._http_send_one(api_key, n, content, from_) for n in numbers
        ])
        return _merge(outcomes, numbers, time.monotonic() - start)

    async def _http_send_one(self, key: str, number: str, content: str, from_: str) -> SendOutcome:
        params = {"apiKey": key, "to": number, "content": content}
        if from_:
            params["from"] = from_
        start = time.monotonic()
        answer = await self._request(
            "GET", "/messages/http/send", key=key, key_in_header=False, params=params
        )
        return self._rest_outcome(answer, [number], time.monotonic() - start, "http")

    def _rest_outcome(self, a: _Answer, numbers: list[str], duration: float, api: str) -> SendOutcome:
        """REST and HTTP answers share one body: per-recipient ``messages`` and a global error."""
        if a.status is None:
            return SendOutcome(Kind.TRANSIENT, (), None, api, duration, None, a.network_error)
        body = a.body if isinstance(a.body, dict) else None
        if body is None:
            kind = _status_kind(a.status)
            if kind is Kind.OK:
                kind = Kind.TRANSIENT  # a 2xx we cannot read: nothing is known to be accepted
            return SendOutcome(kind, (), a.status, api, duration, None,
                               f"unexpected answer: {_snippet(a.text)}", a.retry_after)
        recipients = tuple(
            RecipientResult(
                to=str(item.get("to", "")).lstrip("+"),
                accepted=bool(item.get("accepted")) and bool(item.get("apiMessageId")),
                api_message_id=item.get("apiMessageId") or None,
                error_code=normalise_code(item.get("errorCode")),
                error=item.get("error") or item.get("errorDescription"),
            )
            for item in body.get("messages") or []
            if isinstance(item, dict)
        )
        code = normalise_code(body.get("errorCode"))
        error = body.get("error") or body.get("errorDescription")
        if code is not None:
            kind = classify(code, a.status)
        else:
            kind = _status_kind(a.status)
            if kind is Kind.OK and not recipients:
                kind, error = Kind.TRANSIENT, f"no per-recipient results: {_snippet(a.text)}"
        return SendOutcome(kind, recipients, a.status, api, duration, code,
                           str(error) if error else None, a.retry_after)

    def _one_api_outcome(self, a: _Answer, numbers: list[str], duration: float) -> SendOutcome:
        if a.status is None:
            return SendOutcome(Kind.TRANSIENT, (), None, "one_api", duration, None, a.network_error)
        body = a.body if isinstance(a.body, dict) else None
        if body is None:
            kind = _status_kind(a.status)
            return SendOutcome(Kind.TRANSIENT if kind is Kind.OK else kind, (), a.status, "one_api",
                               duration, None, f"unexpected answer: {_snippet(a.text)}", a.retry_after)
        recipients = []
        for item in body.get("messages") or []:
            if not isinstance(item, dict):
                continue
            err = item.get("error") if isinstance(item.get("error"), dict) else {}
            message_id = item.get("apiMessageId") or item.get("messageId")
            recipients.append(RecipientResult(
                to=str(item.get("to", "")).lstrip("+"),
                accepted=bool(item.get("accepted")) and bool(message_id),
                api_message_id=message_id or None,
                error_code=normalise_code(err.get("code"), "one_api"),
                error=err.get("description"),
            ))
        top = body.get("error") if isinstance(body.get("error"), dict) else {}
        code = normalise_code(top.get("code"), "one_api")
        kind = classify(code, a.status) if code else _status_kind(a.status)
        if kind is Kind.OK and not recipients:
            kind = Kind.TRANSIENT
        return SendOutcome(kind, tuple(recipients), a.status, "one_api", duration, code,
                           top.get("description"), a.retry_after)

    # -- balance -------------------------------------------------------------------------------

    async def balance(self, api_key: str) -> tuple[float, str]:
        """The account's balance and currency; raise :class:`ClickatellError` on any failure."""
        path = "/v1/balance" if self.api == "one_api" else "/public-client/balance"
        a = await self._request("GET", path, key=api_key)
        if a.status is None:
            raise ClickatellError(f"balance query failed: {a.network_error}")
        body = a.body if isinstance(a.body, dict) else {}
        if a.status not in (200, 202) or "balance" not in body:
            error = body.get("error")
            code = error.get("code") if isinstance(error, dict) else body.get("errorCode")
            raise ClickatellError(
                f"balance query failed: HTTP {a.status}" + (f" code {code}" if code else "")
            )
        try:
            return float(body["balance"]), str(body.get("currency", ""))
        except (TypeError, ValueError):
            raise ClickatellError("balance query failed: balance is not a number") from None


def _merge(outcomes: Sequence[SendOutcome], numbers: Sequence[str], duration: float) -> SendOutcome:
    """HTTP API: one request per recipient → one outcome.

    A request's own permanent error with a code is that recipient's failure, not the whole
    message's; otherwise the most pressing kind wins (CONFIG > TRANSIENT > PERMANENT > OK).
    """
    recipients: list[RecipientResult] = []
    rest: list[SendOutcome] = []
    for number, o in zip(numbers, outcomes):
        if o.kind is Kind.PERMANENT and o.error_code and not o.recipients:
            recipients.append(RecipientResult(number, False, None, o.error_code, o.error))
            continue
        recipients.extend(o.recipients)
        rest.append(o)
    worst = max(rest, key=lambda o: o.kind.severity, default=None)
    retry = [o.retry_after for o in outcomes if o.retry_after is not None]
    if worst is None:
        return SendOutcome(Kind.OK, tuple(recipients), 202, "http", duration)
    return SendOutcome(worst.kind, tuple(recipients), worst.http_status, "http", duration,
                       worst.error_code, worst.error, max(retry) if retry else None)
