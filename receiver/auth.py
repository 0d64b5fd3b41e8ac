"""Who may call what: bearer tokens (several, for rotation), basic auth, Grafana's HMAC signature,
the callback secret, and the loopback rule for admin endpoints without credentials.

Closed by default: an endpoint with no credentials configured is refused unless the config says
``allow_unauthenticated: true`` (admin endpoints without credentials answer loopback clients
only). Configured credentials are always required; ``allow_unauthenticated`` only opens an
endpoint that has none.

Every comparison is constant-time on bytes and walks all configured tokens, so timing tells
nothing about which token, or how much of one, matched. Header values are compared as the bytes
that were sent (aiohttp decodes them with ``surrogateescape``), so non-ASCII or invalid bytes are
a wrong credential, never an exception.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from receiver.config.model import AdminAuth, CallbacksConfig, WebhookAuth, format_duration

WRONG_CREDENTIALS = "missing or wrong credentials"
# A request that passed through a proxy carries one of these: its peer address is the proxy's.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


@dataclass(frozen=True, slots=True)
class Denied:
    """Why a request is refused: ``status`` (401 or 403) and a reason safe to answer and log
    (it names config keys and headers, never a secret or what was sent)."""

    status: int
    reason: str


def _raw(value: str | None) -> bytes | None:
    """The bytes a header or query value was sent as; None when it cannot be one."""
    if value is None:
        return None
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte decodes to
        return None


def _eq(given: bytes | None, expected: str) -> bool:
    """Constant-time; ``given`` None (undecodable) compares against itself, and fails."""
    want = expected.encode()
    return hmac.compare_digest(want if given is None else given, want) and given is not None


def is_loopback(remote: str | None) -> bool:
    """True when the peer address is on this host: 127.0.0.0/8, ::1 or ::ffff:127.x.
    Unix sockets and unparsable addresses are not."""
    if not remote:
        return False
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])  # fe80::1%eth0
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_credentials(auth: AdminAuth | WebhookAuth, header: str | None) -> bool:
    """True if ``Authorization`` carries one of the configured credentials (False when none is
    configured: callers decide what an endpoint without credentials does).

    Accepts ``Bearer <token>`` (Alertmanager's ``authorization``/``bearer_token``, Grafana's
    default scheme) and ``Basic <base64>``.
    """
    raw = _raw(header)
    if not auth.configured or not raw:
        return False
    scheme, _, value = raw.strip().partition(b" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == b"bearer":
        ok = False
        for token in auth.bearer_tokens:
            ok |= _eq(value, token.get_secret_value())
        return ok
    if scheme == b"basic" and auth.basic_auth is not None:
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        expected = auth.basic_auth
        # both compared, always: no early exit on a wrong user name
        return _eq(user, expected.username) & _eq(password, expected.password.get_secret_value())
    return False


def challenge(auth: AdminAuth | WebhookAuth, realm: str) -> str:
    """The ``WWW-Authenticate`` value for a 401."""
    return f'Basic realm="{realm}"' if auth.basic_auth and not auth.bearer_tokens else f'Bearer realm="{realm}"'


def admin_denied(auth: AdminAuth, header: str | None, remote: str | None,
                 proxied: bool) -> Denied | None:
    """None when an admin request (``/send``, ``/-/reload``, ``/api/v1/*``) may proceed.

    With credentials configured they are required (401). Without: ``allow_unauthenticated``
    opens the endpoints; otherwise only a direct client on loopback is served, and any other
    (or one that came through a proxy, ``proxied``) gets 403.
    """
    if auth.configured:
        return None if check_credentials(auth, header) else Denied(401, WRONG_CREDENTIALS)
    if auth.allow_unauthenticated or (is_loopback(remote) and not proxied):
        return None
    why = "came through a proxy" if proxied and is_loopback(remote) else "is not from a loopback address"
    return Denied(403, f"admin_auth has no credentials configured, so admin endpoints answer only "
                       f"clients on this host (this request {why}): set admin_auth.bearer_tokens "
                       "or admin_auth.basic_auth")


def webhook_denied(auth: WebhookAuth, source: Literal["alertmanager", "grafana"],
                   header: str | None) -> Denied | None:
    """None when a webhook may be read (Grafana's HMAC signature is checked after, by
    :func:`check_grafana_signature`).

    Bearer/basic credentials, when configured, are required on both endpoints. An endpoint with
    no credentials at all (for Grafana: nor an HMAC secret) is refused unless
    ``webhook_auth.allow_unauthenticated`` is true.
    """
    if auth.configured:
        return None if check_credentials(auth, header) else Denied(401, WRONG_CREDENTIALS)
    if source == "grafana" and auth.grafana_hmac_secret.get_secret_value():
        return None
    if auth.allow_unauthenticated:
        return None
    hmac_hint = " or grafana_hmac_secret" if source == "grafana" else ""
    return Denied(401, f"webhook_auth has no credentials configured for this endpoint: set "
                       f"webhook_auth.bearer_tokens or basic_auth{hmac_hint} (and the same in the "
                       f"sender), or webhook_auth.allow_unauthenticated: true")


def callback_denied(callbacks: CallbacksConfig, given: Iterable[str | None]) -> Denied | None:
    """None when a Clickatell callback may proceed. ``given`` holds the candidate secrets as
    sent (path segment, ``X-Callback-Secret`` header, ``?secret=``): the first non-empty one is
    compared. With no ``callbacks.secret``, callbacks are refused unless
    ``callbacks.allow_unauthenticated`` is true."""
    secret = callbacks.secret.get_secret_value()
    if not secret:
        if callbacks.allow_unauthenticated:
            return None
        return Denied(401, "callbacks.secret is not configured: set it and end the callback URL in "
                           "Clickatell's portal with /callbacks/clickatell/status/<secret>, or set "
                           "callbacks.allow_unauthenticated: true")
    candidate = next((v for v in given if v), None)
    if candidate is None or not _eq(_raw(candidate), secret):
        return Denied(401, "missing or wrong callback secret")
    return None


def check_grafana_signature(auth: WebhookAuth, headers: Mapping[str, str], body: bytes,
                            now: float) -> str | None:
    """None when the body's HMAC-SHA256 signature is valid (or no secret is configured), else
    why not.

    Grafana 12 signs the body, or ``"<timestamp>:<body>"`` when a timestamp header is configured
    (Unix seconds); the signature is lowercase hex without a ``sha256=`` prefix. A timestamp must
    be within ``grafana_hmac_max_age`` of ``now``, either way, so a captured request cannot be
    replayed once the dedup window has passed.
    """
    secret = auth.grafana_hmac_secret.get_secret_value()
    if not secret:
        return None
    name = auth.grafana_hmac_header
    signature = (_raw(headers.get(name)) or b"").strip().lower().removeprefix(b"sha256=")
    if not signature:
        return f"missing {name} header"
    payload = body
    timestamp = None
    ts_name = auth.grafana_hmac_timestamp_header
    if ts_name:
        raw_ts = (_raw(headers.get(ts_name)) or b"").strip()
        if not raw_ts:
            return f"missing {ts_name} header"
        if not raw_ts.isdigit() or len(raw_ts) > 12:  # bytes.isdigit: ASCII digits only
            return f"{ts_name} is not a Unix time in seconds"
        timestamp = int(raw_ts)
        payload = raw_ts + b":" + body
    expected = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(signature, expected):
        return "HMAC signature does not match"
    if timestamp is not None and abs(now - timestamp) > auth.grafana_hmac_max_age:
        direction = "old" if timestamp < now else "far in the future"
        return (f"{ts_name} is too {direction}: more than webhook_auth.grafana_hmac_max_age "
                f"({format_duration(auth.grafana_hmac_max_age)}) from this host's clock (a replayed "
                "request, or a clock out of sync)")
    return None
