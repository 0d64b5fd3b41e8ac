"""Alertmanager's label matchers: ``name="value"``, ``!=``, ``=~``, ``!~``.

Regexes are anchored at both ends, as Alertmanager anchors them (``^(?:re)$``), and a label that
is absent matches as the empty string, so ``team!=""`` means "has a team label".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Op = Literal["=", "!=", "=~", "!~"]

_MATCHER = re.compile(
    r"""^\s*(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>.*?)\s*$""", re.S
)
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass(frozen=True, slots=True)
class Matcher:
    name: str
    op: Op
    value: str
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        match self.op:
            case "=":
                return actual == self.value
            case "!=":
                return actual != self.value
            case "=~":
                return self._regex.fullmatch(actual) is not None  # type: ignore[union-attr]
            case "!~":
                return self._regex.fullmatch(actual) is None  # type: ignore[union-attr]

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{self.name}{self.op}"{escaped}"'


def _unquote(raw: str) -> str:
    if not (len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"'):
        if '"' in raw:
            raise ValueError(f"unbalanced quotes in value {raw!r}")
        return raw  # Alertmanager accepts unquoted values since 0.22
    out, i, body = [], 0, raw[1:-1]
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body) or body[i + 1] not in _ESCAPES:
                raise ValueError(f"invalid escape in value {raw!r}")
            out.append(_ESCAPES[body[i + 1]])
            i += 2
            continue
        if ch == '"':
            raise ValueError(f"unescaped quote in value {raw!r}")
        out.append(ch)
        i += 1
    return "".join(out)


def parse_matcher(text: str) -> Matcher:
    """Parse one matcher; raise ``ValueError`` saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError("a matcher must be a string such as 'team=\"db\"'")
    m = _MATCHER.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a matcher: expected label_name, one of = != =~ !~, and a value"
        )
    name, op, value = m["name"], m["op"], _unquote(m["value"])
    regex = None
    if op in ("=~", "!~"):
        try:
            regex = re.compile(f"^(?:{value})$")
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return Matcher(name, op, value, regex)  # type: ignore[arg-type]
