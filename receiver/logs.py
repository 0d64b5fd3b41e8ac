"""Logging: human-readable lines by default, one JSON object per line with ``log_format: json``.

Nothing secret is ever passed to a logger (keys, tokens, passwords, the callback secret), and
phone numbers are logged through :func:`receiver.phone.mask`. aiohttp's access log is not used,
because it prints query strings, and the callback URLs carry their secret there.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k != "message"})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


_KEY_IN_URL = re.compile(r"(apiKey=)[^&\s\"']+")


class RedactKeys(logging.Filter):
    """Belt and braces: should a library log a Clickatell HTTP-API URL, its key is hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "apiKey=" in message:
            record.msg, record.args = _KEY_IN_URL.sub(r"\1REDACTED", message), None
        return True


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Configure the root logger once for the process (the CLI calls this; tests do not)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactKeys())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that log request URLs at INFO: the HTTP API's carry the key, the number and the text
    for name in ("aiohttp.client", "aiohttp.access", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
