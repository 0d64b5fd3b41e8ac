"""Who may call what: bearer tokens (several, for rotation), basic auth, Grafana's HMAC signature,
the callback secret.

Every comparison is constant-time and walks all configured tokens, so timing tells nothing about
which token, or how much of one, matched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from receiver.config import AdminAuth, WebhookAuth


def _eq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def check_callback_secret(secret: str, given: str) -> bool:
    """Clickatell callbacks carry the configured secret (``?secret=`` or a header); with no
    secret configured, everything is allowed."""
    return not secret or _eq(given, secret)


def check_credentials(auth: AdminAuth | WebhookAuth, header: str | None) -> bool:
    """True if ``Authorization`` carries one of the configured credentials.

    Accepts ``Bearer <token>`` (Alertmanager's ``authorization``/``bearer_token``, Grafana's
    default scheme) and ``Basic <base64>``. With nothing configured, everything is allowed.
    """
    if not auth.configured:
        return True
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "bearer":
        ok = False
        for token in auth.bearer_tokens:
            ok |= _eq(value, token.get_secret_value())
        return ok
    if scheme == "basic" and auth.basic_auth is not None:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        if not sep:
            return False
        expected = auth.basic_auth
        # both compared, always: no early exit on a wrong user name
        return _eq(user, expected.username) & _eq(password, expected.password.get_secret_value())
    return False


def challenge(auth: AdminAuth | WebhookAuth, realm: str) -> str:
    """The ``WWW-Authenticate`` value for a 401."""
    return f'Basic realm="{realm}"' if auth.basic_auth and not auth.bearer_tokens else f'Bearer realm="{realm}"'


def check_grafana_signature(
    auth: WebhookAuth, headers: Mapping[str, str], body: bytes
) -> str | None:
    """None when the body's HMAC-SHA256 signature is valid (or none is configured), else why not.

    Grafana 12 signs the body, or ``"<timestamp>:<body>"`` when a timestamp header is configured;
    the signature is lowercase hex without a ``sha256=`` prefix.
    """
    secret = auth.grafana_hmac_secret.get_secret_value()
    if not secret:
        return None
    signature = headers.get(auth.grafana_hmac_header, "").strip().lower().removeprefix("sha256=")
    if not signature:
        return f"missing {auth.grafana_hmac_header} header"
    payload = body
    if auth.grafana_hmac_timestamp_header:
        timestamp = headers.get(auth.grafana_hmac_timestamp_header, "").strip()
        if not timestamp:
            return f"missing {auth.grafana_hmac_timestamp_header} header"
        payload = timestamp.encode() + b":" + body
    expected = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    return None if hmac.compare_digest(signature, expected) else "HMAC signature does not match"
