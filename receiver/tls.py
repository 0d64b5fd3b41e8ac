"""The listener's TLS context from ``server.tls``: read and checked by the config loader (so
``check-config`` reports a bad file with every other error) and loaded by the listener."""

from __future__ import annotations

import ssl

from receiver.config.model import TlsConfig


class TlsError(Exception):
    """A certificate or key that cannot be used; the message names the key and the file."""


def _refuse_password() -> bytes:
    # without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase
    raise TlsError("server.tls.key_file: the key is encrypted: give an unencrypted PEM key "
                   "(readable by the receiver only)")


def load_tls(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """A server context for ``tls`` (its paths as the config resolved them), or None without
    TLS. Raises :class:`TlsError` naming the file at fault; never shows a key's content."""
    if tls is None:
        return None
    cert, key = tls.cert_file, tls.key_file
    texts = {}
    for name, path in (("server.tls.cert_file", cert), ("server.tls.key_file", key)):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                texts[name] = f.read()
        except OSError as exc:
            raise TlsError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        ssl.create_default_context(cadata=texts["server.tls.cert_file"])
    except (ssl.SSLError, ValueError):
        raise TlsError(f"server.tls.cert_file: {cert!r} holds no PEM certificate "
                       "(-----BEGIN CERTIFICATE-----)") from None
    if "PRIVATE KEY-----" not in texts["server.tls.key_file"]:
        raise TlsError(f"server.tls.key_file: {key!r} holds no PEM private key "
                       "(-----BEGIN PRIVATE KEY-----)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key, password=_refuse_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsError(f"server.tls.key_file: {key!r} is not the key of the certificate "
                           f"in {cert!r}") from None
        raise TlsError(f"server.tls.key_file: cannot use {key!r} with {cert!r}: "
                       f"{exc.reason or exc}") from None
    return ctx
