"""Logging: human-readable lines by default, one JSON object per line with ``log_format: json``.

Nothing secret is ever passed to a logger (keys, tokens, passwords, the callback secret), and
phone numbers are logged through :func:`receiver.phone.mask`. aiohttp's access log is not used:
it prints paths and query strings, and a callback URL carries its secret in one of them. Query
strings are also scrubbed from whatever else is logged (:class:`ScrubQueries`); a path is never
logged by our handlers (they name the route pattern), nor by the listener (a fixed reason).

One record is one line in either format, whatever its values hold: the text format escapes
control characters (``\\n``, ``\\r``, ``\\x1b``, …) in every value it prints, so an alertname with
a newline cannot forge a log line; a multi-line record (a traceback, a list of config errors)
has its continuation lines indented, so no line of it can pass for a record of its own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({})))
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# C0 and C1 controls, DEL and the Unicode line and paragraph separators: a line ends at any of them
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""

    def one(m: re.Match[str]) -> str:
        c = m[0]
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
            f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _CONTROL.sub(one, text)


def _safe_arg(value: Any) -> Any:
    if isinstance(value, (int, float)) or value is None:
        return value
    text = value if isinstance(value, str) else str(value)
    return escape(text) if _CONTROL.search(text) else value


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``; values escaped, continuation lines indented."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if args:
            # the format string is ours (its newlines are meant); the values are not
            safe = ({k: _safe_arg(v) for k, v in args.items()} if isinstance(args, dict)
                    else tuple(_safe_arg(a) for a in args))
            record = logging.makeLogRecord({**vars(record), "args": safe})
        text = super().format(record)
        lines = text.split("\n")
        return "\n".join([escape(lines[0])] + ["    " + escape(line) for line in lines[1:]])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items()
                    if k not in _STANDARD and k not in ("message", "exc_text")})
        if record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)
        # json escapes C0 controls; these three end a line for some readers (str.splitlines)
        return (json.dumps(out, default=str, ensure_ascii=False)
                .replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


_KEY_IN_URL = re.compile(r"(apiKey=)[^&\s\"']+")


class RedactKeys(logging.Filter):
    """Belt and braces: should a library log a Clickatell HTTP-API URL, its key is hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "apiKey=" in message:
            record.msg, record.args = _KEY_IN_URL.sub(r"\1REDACTED", message), None
        return True


# a path's query string: "/callbacks/clickatell/status?secret=…" (not the "?" of a sentence)
_QUERY = re.compile(r"(/[^\s?'\"]*)\?[^\s'\"\\]+")


class ScrubQueries(logging.Filter):
    """Every record loses the query strings of the paths it quotes, in its message and its
    traceback: aiohttp quotes request lines in its errors, an exception may quote a request's
    path_qs, and a callback URL carries its ``?secret=`` there."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = _QUERY.sub(r"\1?…", message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and "?" in record.exc_text:
            record.exc_text = _QUERY.sub(r"\1?…", record.exc_text)
        return True


def setup_logging(fmt: str = "text", level: int | str = logging.INFO) -> None:
    """Configure the root logger once for the process (the CLI calls this; tests do not).
    ``level``: a logging level or one of :data:`LEVELS`' names."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactKeys())
    handler.addFilter(ScrubQueries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level] if isinstance(level, str) else level)
    # Libraries that log request URLs at INFO: the HTTP API's carry the key, the number and the text
    for name in ("aiohttp.client", "aiohttp.access", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.INFO)  # its debug lines are about the loop itself


class RefusalLog:
    """Refused requests, logged one line each up to ``burst`` lines per ``interval`` seconds;
    past that they are counted, and the next line that goes out says how many were not logged.
    An unauthenticated client could otherwise fill the disk with our warnings (it is counted in
    the metrics either way). ``monotonic`` is the receiver's clock."""

    def __init__(self, monotonic: Callable[[], float], *, burst: int = 20, interval: float = 10.0) -> None:
        self._monotonic = monotonic
        self._burst, self._interval = burst, interval
        self._window_start = float("-inf")
        self._in_window = 0
        self._suppressed = 0

    def warning(self, logger: logging.Logger, msg: str, *args: Any) -> None:
        now = self._monotonic()
        if now - self._window_start >= self._interval:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self._burst:
            self._suppressed += 1
            return
        self._in_window += 1
        if self._suppressed:
            msg, args = msg + " (and %d more refused requests not logged)", (*args, self._suppressed)
            self._suppressed = 0
        logger.warning(msg, *args)
