"""Alertmanager API v2 silences over httpx: create on the first URL that answers (an HA pair
gossips silences to its peer), expire (DELETE) the same way.

``create`` answers the silence id, or raises :class:`SilenceError` naming why no URL took it.
Errors never quote credentials: only the URL's host, the status and Alertmanager's short reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from receiver.config.model import AlertmanagerApi

log = logging.getLogger("sms_receiver.silences")


class SilenceError(Exception):
    """No configured Alertmanager made (or expired) the silence: why, per URL."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _where(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2] or url[:60]


def _headers(api: AlertmanagerApi) -> dict[str, str]:
    if api.bearer_token.get_secret_value():
        return {"Authorization": f"Bearer {api.bearer_token.get_secret_value()}"}
    return {}


def _auth(api: AlertmanagerApi) -> httpx.BasicAuth | None:
    if api.basic_auth is not None and api.basic_auth.username:
        return httpx.BasicAuth(api.basic_auth.username, api.basic_auth.password.get_secret_value())
    return None


async def _each(api: AlertmanagerApi, urls: Sequence[str], method: str, path: str,
                body: Mapping[str, Any] | None) -> httpx.Response:
    """The first answer that is not a failure of that peer (network, 5xx, 401/403: a peer with
    other credentials); any other 4xx is final (the same request fails on every peer)."""
    if not urls:
        raise SilenceError("no Alertmanager is configured (alertmanager.urls)")
    problems = []
    async with httpx.AsyncClient(timeout=api.timeout, headers=_headers(api), auth=_auth(api),
                                 trust_env=False) as http:
        for url in urls:
            try:
                r = await http.request(method, url + path, json=body)
            except httpx.HTTPError as exc:
                problems.append(f"{_where(url)}: {type(exc).__name__}")
                continue
            if r.status_code >= 500 or (r.status_code in (401, 403) and url != urls[-1]):
                problems.append(f"{_where(url)}: HTTP {r.status_code}")
                continue
            return r
    raise SilenceError("; ".join(problems))


async def create(api: AlertmanagerApi, urls: Sequence[str], labels: Mapping[str, str], starts: float,
                 ends: float, created_by: str, comment: str) -> str:
    """One silence whose matchers are exactly ``labels`` (each equal, not a regex)."""
    from receiver.twoway import matchers

    body = {"matchers": matchers(labels), "startsAt": _iso(starts), "endsAt": _iso(ends),
            "createdBy": created_by, "comment": comment}
    r = await _each(api, urls, "POST", "/api/v2/silences", body)
    if r.status_code != 200:
        raise SilenceError(f"{_where(str(r.url))}: HTTP {r.status_code}: {r.text[:200]}")
    try:
        sid = r.json()["silenceID"]
    except (ValueError, KeyError, TypeError):
        raise SilenceError(f"{_where(str(r.url))}: the answer has no silenceID") from None
    return str(sid)


async def expire(api: AlertmanagerApi, urls: Sequence[str], silence_id: str) -> None:
    """Expire a silence; one already gone (404) counts as expired."""
    r = await _each(api, urls, "DELETE", f"/api/v2/silence/{silence_id}", None)
    if r.status_code not in (200, 404):
        raise SilenceError(f"{_where(str(r.url))}: HTTP {r.status_code}: {r.text[:200]}")
