"""The config file: parsed and validated once into typed, frozen objects.

Loading goes YAML → ``${VAR}`` expansion on string values → ``*_file`` secrets read → pydantic
models (types, ranges, unknown keys, matchers, phone numbers) → cross-references (group ids,
levels, templates). Every problem is reported as ``path.to.key: what is wrong``, all at once, in
a :class:`ConfigError`. Nothing downstream ever reads the raw YAML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import time as TimeOfDay
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from receiver.matchers import Matcher, parse_matcher
from receiver.phone import to_e164

# ---------------------------------------------------------------------------------------------
# Value types

_DURATION = re.compile(
    r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$"
)
_UNITS = (7 * 86400, 86400, 3600, 60, 1, 0.001)


def parse_duration(value: Any) -> float:
    """Prometheus-style durations ("90s", "1h30m", "500ms") or plain seconds, as float seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = _DURATION.match(str(value).strip()) if isinstance(value, str) and value.strip() else None
    if not m:
        raise ValueError(f"{value!r} is not a duration such as 30s, 5m or 1h")
    return sum(float(part) * unit for part, unit in zip(m.groups(), _UNITS) if part)


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for messages."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    out, rest = [], int(seconds)
    for unit, name in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if rest >= unit:
            out.append(f"{rest // unit}{name}")
            rest %= unit
    return "".join(out)


def _matcher(value: Any) -> Matcher:
    if isinstance(value, Matcher):
        return value
    return parse_matcher(value)


def _phone(value: Any) -> str:
    return to_e164(value)


def split_listen(listen: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9097``, ``:9097``) → (host, port); ValueError when malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT (e.g. 0.0.0.0:9097)")
    return host.strip("[]") or default_host, int(port)


def _listen(value: Any) -> str:
    split_listen(str(value))
    return str(value)


Duration = Annotated[float, BeforeValidator(parse_duration)]
MatcherField = Annotated[Matcher, BeforeValidator(_matcher)]
Phone = Annotated[str, BeforeValidator(_phone)]
Listen = Annotated[str, BeforeValidator(_listen)]
# "${WEBHOOK_TOKEN}" with the variable unset expands to "": never a valid token, so dropped.
Tokens = Annotated[
    tuple[SecretStr, ...], AfterValidator(lambda ts: tuple(t for t in ts if t.get_secret_value()))
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------------
# Sections (field names are PRODUCT.md's keys)


class BasicAuth(_Model):
    username: str
    password: SecretStr = SecretStr("")


class AdminAuth(_Model):
    bearer_tokens: Tokens = ()
    basic_auth: BasicAuth | None = None

    @property
    def configured(self) -> bool:
        return bool(self.bearer_tokens or (self.basic_auth and self.basic_auth.username))


class WebhookAuth(AdminAuth):
    grafana_hmac_secret: SecretStr = SecretStr("")
    grafana_hmac_header: str = "X-Grafana-Alerting-Signature"
    grafana_hmac_timestamp_header: str = ""  # set when Grafana signs "<timestamp>:<body>"


class ClickatellConfig(_Model):
    api: Literal["rest", "http", "one_api"] = "rest"
    api_key: SecretStr = SecretStr("")
    base_url: str = "https://platform.clickatell.com"
    from_: str = Field("", alias="from")
    max_parts: int = Field(3, ge=1, le=35)
    timeout: Duration = 10.0
    balance_interval: Duration = 300.0

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


class Delivery(_Model):
    """A level's delivery policy: ``immediate``, ``{digest: 15m}`` or ``none``."""

    mode: Literal["immediate", "digest", "none"] = "immediate"
    window: float = 0.0  # digest only: one summary per group per aligned window

    def __str__(self) -> str:
        return f"digest {format_duration(self.window)}" if self.mode == "digest" else self.mode


def _delivery(value: Any) -> Delivery:
    if isinstance(value, Delivery):
        return value
    if value in ("immediate", "none"):
        return Delivery(mode=value)
    if isinstance(value, dict) and set(value) == {"digest"}:
        window = parse_duration(value["digest"])
        if window <= 0:
            raise ValueError("a digest window must be longer than 0s")
        return Delivery(mode="digest", window=window)
    raise ValueError(f"{value!r}: expected immediate, none or {{digest: 15m}}")


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _time_of_day(value: Any) -> TimeOfDay:
    # Unquoted 22:00 is the integer 1320 to YAML 1.1 (base 60): read it back as 22:00.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 24 * 60:
        return TimeOfDay(value // 60, value % 60)
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", str(value).strip())
    if not m:
        raise ValueError(f"{value!r} is not a time of day such as 22:00")
    return TimeOfDay(int(m[1]), int(m[2]))


def _day(value: Any) -> int:
    day = str(value).strip().lower()[:3]
    if day not in _DAYS:
        raise ValueError(f"{value!r} is not a day (mon, tue, wed, thu, fri, sat, sun)")
    return _DAYS.index(day)


def _timezone(value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone such as Europe/Berlin") from None
    return str(value)


class Level(_Model):
    name: str = Field(min_length=1)
    severities: tuple[str, ...] = ()
    delivery: Annotated[Delivery, BeforeValidator(_delivery)] = Delivery()


class QuietHours(_Model):
    """A nightly (or weekend) window in which only urgent pages go out; the rest is held and
    summarised when it ends. ``days`` are the days a quiet period *starts* on."""

    timezone: Annotated[str, BeforeValidator(_timezone)]
    start: Annotated[TimeOfDay, BeforeValidator(_time_of_day)]
    end: Annotated[TimeOfDay, BeforeValidator(_time_of_day)]
    days: tuple[Annotated[int, BeforeValidator(_day)], ...] = tuple(range(7))
    min_level: str | None = None  # least urgent level that still pages; None: the most urgent


class Group(_Model):
    id: str = Field(min_length=1)
    name: str = ""
    level: str | None = None  # None: the most urgent level
    members: tuple[Phone, ...] = Field(min_length=1)
    template: str = "default"
    send_resolved: bool = True
    api_key: SecretStr = SecretStr("")
    quiet_hours: QuietHours | None = None


class Route(_Model):
    matchers: tuple[MatcherField, ...] = ()
    groups: tuple[str, ...] = Field(min_length=1)
    continue_: bool = Field(False, alias="continue")


class DispatchConfig(_Model):
    """How the outbox is drained (not in PRODUCT.md: our own section)."""

    concurrency: int = Field(8, ge=1, le=256)  # Clickatell requests in flight
    batch_size: int = Field(200, ge=1, le=200)  # recipients per request; Clickatell's limit is 200
    retry_initial: Duration = 1.0
    retry_max: Duration = 300.0
    max_age: Duration = 3600.0  # a page not accepted by then becomes a dead letter
    lease: Duration = 60.0  # how long a claimed message is ours before another worker may retry it
    poll_interval: Duration = 1.0


class ThrottleRule(_Model):
    count: int = Field(ge=1)
    window: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


# GoAlert's per-number limits: 1 SMS a minute, 5 in 15 minutes, 11 an hour, 21 in 3 hours.
DEFAULT_THROTTLE = (
    ThrottleRule(count=1, window=60), ThrottleRule(count=5, window=900),
    ThrottleRule(count=11, window=3600), ThrottleRule(count=21, window=10800),
)


class PagingConfig(_Model):
    """Flood control per recipient number (our own section)."""

    throttle: tuple[ThrottleRule, ...] = DEFAULT_THROTTLE  # every rule must allow a send; [] = off
    urgent_level: str | None = None  # this level or more urgent is held at most urgent_max_delay
    urgent_max_delay: Duration = 60.0


class CallbacksConfig(_Model):
    secret: SecretStr = SecretStr("")  # ?secret=… on the callback URLs set in Clickatell's portal


DEFAULT_LEVELS = (
    Level(name="critical", severities=("critical", "page", "p1")),
    Level(name="warning", severities=("warning", "p2")),
    Level(name="info", severities=("info", "none")),
)

DEFAULT_TEMPLATE = (
    "[{{ level | upper }}] {{ status | upper }} {{ alerts | length }}"
    "{% if truncated_alerts %} (+{{ truncated_alerts }} not shown){% endif %}: "
    "{% for a in alerts %}{{ a.labels.alertname }}"
    "{% if a.labels.instance %} {{ a.labels.instance }}{% endif %}"
    "{% if a.annotations.summary %} {{ a.annotations.summary }}{% endif %}"
    "{% if not loop.last %}; {% endif %}{% endfor %}"
)


class Config(_Model):
    listen: Listen = "0.0.0.0:9097"
    storage: str = "sqlite:///var/lib/sms-receiver/outbox.db"
    webhook_auth: WebhookAuth = WebhookAuth()
    admin_auth: AdminAuth = AdminAuth()
    clickatell: ClickatellConfig = ClickatellConfig()
    levels: tuple[Level, ...] = Field(DEFAULT_LEVELS, min_length=1)
    severity_label: str = "severity"
    default_level: str = "warning"
    groups: tuple[Group, ...] = ()
    routes: tuple[Route, ...] = ()
    default_groups: tuple[str, ...] = ()
    templates: Mapping[str, str] = Field(default_factory=lambda: {"default": DEFAULT_TEMPLATE})
    # Our own keys, beyond PRODUCT.md:
    max_body_bytes: int = Field(1 << 20, ge=1024)
    dedup_window: Duration = 3600.0
    log_format: Literal["text", "json"] = "text"
    dispatch: DispatchConfig = DispatchConfig()
    callbacks: CallbacksConfig = CallbacksConfig()
    paging: PagingConfig = PagingConfig()
    retention: Duration = 7 * 86400.0  # finished messages older than this are deleted

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if not (v.startswith("sqlite://") or v.startswith(("postgresql://", "postgres://"))):
            raise ValueError(f"{v!r}: expected sqlite:///path/to/file.db or postgresql://…")
        if v.startswith("sqlite://"):
            from receiver.store import sqlite_options  # the store owns its URL's options

            sqlite_options(v)
        return v

    @field_validator("templates", mode="after")
    @classmethod
    def _default_template(cls, v: Mapping[str, str]) -> Mapping[str, str]:
        return v if "default" in v else {"default": DEFAULT_TEMPLATE, **v}

    # -- derived views, computed from the frozen fields --------------------------------------

    @cached_property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    @cached_property
    def _ranks(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.level_names)}

    @cached_property
    def _severity_levels(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for level in self.levels:  # most urgent first: the first level naming a severity wins
            for severity in level.severities:
                found.setdefault(severity.lower(), level.name)
        return found

    def severity_level(self, severity: str) -> str:
        """The level of a ``severity_label`` value (case-insensitive), else ``default_level``."""
        return self._severity_levels.get(severity.lower(), self.default_level)

    def level_rank(self, name: str) -> int:
        """0 is the most urgent level."""
        return self._ranks[name]

    @cached_property
    def groups_by_id(self) -> Mapping[str, Group]:
        return {g.id: g for g in self.groups}

    def group(self, group_id: str) -> Group | None:
        return self.groups_by_id.get(group_id)

    def group_level(self, group: Group) -> str:
        return group.level or self.levels[0].name

    def delivery(self, level: str) -> Delivery:
        return self.levels[self._ranks[level]].delivery

    @property
    def urgent_rank(self) -> int:
        """Levels of this rank or lower (more urgent) are never held past urgent_max_delay."""
        return self.level_rank(self.paging.urgent_level or self.levels[0].name)

    @property
    def dry_run(self) -> bool:
        """True when no key at all is configured: nothing can reach Clickatell."""
        return not self.clickatell.api_key.get_secret_value() and not any(
            g.api_key.get_secret_value() for g in self.groups
        )

    def api_key_for(self, group: Group) -> str:
        return group.api_key.get_secret_value() or self.clickatell.api_key.get_secret_value()


# ---------------------------------------------------------------------------------------------
# Loading


class ConfigError(Exception):
    """The config is invalid; ``errors`` holds every ``path.to.key: what is wrong`` line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Keys whose value may instead be read from a file named by "<key>_file".
_SECRET_KEYS = {"api_key", "password", "grafana_hmac_secret", "secret", "bearer_tokens"}


def _expand(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return _VAR.sub(lambda m: env.get(m[1]) or (m[2] or ""), node)
    if isinstance(node, list):
        return [_expand(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _expand(v, env) for k, v in node.items()}
    return node


def _read_secret_files(node: Any, base: Path, path: str, errors: list[str]) -> Any:
    """Replace every ``<key>_file`` by ``<key>`` holding the file's content."""
    if isinstance(node, list):
        return [_read_secret_files(v, base, f"{path}.{i}", errors) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[Any, Any] = {}
    for key, value in node.items():
        here = f"{path}.{key}" if path else str(key)
        stem = key[:-5] if isinstance(key, str) and key.endswith("_file") else None
        if stem not in _SECRET_KEYS:
            out[key] = _read_secret_files(value, base, here, errors)
            continue
        if node.get(stem) not in (None, "", []):
            errors.append(f"{here}: give either {stem} or {key}, not both")
            continue
        file = base / str(value)
        try:
            content = file.read_text(encoding="utf-8")
        except OSError as exc:
            errors.append(f"{here}: cannot read {str(value)!r}: {exc.strerror or exc}")
            continue
        if stem == "bearer_tokens":  # one token per line
            out[stem] = [line.strip() for line in content.splitlines() if line.strip()]
        else:
            out[stem] = content.strip()
    return out


_PYDANTIC_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _format_pydantic(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = _PYDANTIC_MESSAGES.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return lines


def _cross_check(cfg: Config) -> list[str]:
    """Checks that span sections: references between ids, levels and templates."""
    from receiver.render import template_error  # render is pure; imported late to keep config light

    errors: list[str] = []
    names = cfg.level_names
    seen_levels: set[str] = set()
    seen_severities: dict[str, str] = {}
    for i, level in enumerate(cfg.levels):
        if level.name in seen_levels:
            errors.append(f"levels.{i}.name: duplicate level {level.name!r}")
        seen_levels.add(level.name)
        for j, sev in enumerate(level.severities):
            other = seen_severities.setdefault(sev.lower(), level.name)
            if other != level.name:
                errors.append(
                    f"levels.{i}.severities.{j}: {sev!r} already belongs to level {other!r}"
                )
    if cfg.default_level not in names:
        errors.append(f"default_level: unknown level {cfg.default_level!r} (levels: {', '.join(names)})")

    group_ids: set[str] = set()
    for i, group in enumerate(cfg.groups):
        if group.id in group_ids:
            errors.append(f"groups.{i}.id: duplicate group id {group.id!r}")
        group_ids.add(group.id)
        if group.level is not None and group.level not in names:
            errors.append(f"groups.{i}.level: unknown level {group.level!r} (levels: {', '.join(names)})")
        if group.template not in cfg.templates:
            errors.append(
                f"groups.{i}.template: unknown template {group.template!r} "
                f"(templates: {', '.join(sorted(cfg.templates))})"
            )
        if len(set(group.members)) != len(group.members):
            errors.append(f"groups.{i}.members: the same number is listed twice")
        qh = group.quiet_hours
        if qh is not None:
            if qh.min_level is not None and qh.min_level not in names:
                errors.append(f"groups.{i}.quiet_hours.min_level: unknown level {qh.min_level!r} "
                              f"(levels: {', '.join(names)})")
            if qh.start == qh.end:
                errors.append(f"groups.{i}.quiet_hours: start and end are the same time")
            if not qh.days:
                errors.append(f"groups.{i}.quiet_hours.days: name at least one day")
    if cfg.paging.urgent_level is not None and cfg.paging.urgent_level not in names:
        errors.append(f"paging.urgent_level: unknown level {cfg.paging.urgent_level!r} "
                      f"(levels: {', '.join(names)})")

    for i, route in enumerate(cfg.routes):
        for j, gid in enumerate(route.groups):
            if gid not in group_ids:
                errors.append(f"routes.{i}.groups.{j}: unknown group id {gid!r}")
    for j, gid in enumerate(cfg.default_groups):
        if gid not in group_ids:
            errors.append(f"default_groups.{j}: unknown group id {gid!r}")

    for name, source in cfg.templates.items():
        problem = template_error(source)
        if problem:
            errors.append(f"templates.{name}: {problem}")
    return errors


def parse_config(text: str, *, env: Mapping[str, str], base_dir: Path) -> Config:
    """Parse a config document. ``env`` feeds ``${VAR}``; ``*_file`` paths are relative to
    ``base_dir``. Raise :class:`ConfigError` listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ConfigError([f"(file): {where}: {getattr(exc, 'problem', None) or exc}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of keys such as listen, groups, routes"])
    errors: list[str] = []
    raw = _read_secret_files(_expand(raw, env), base_dir, "", errors)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(errors + _format_pydantic(exc)) from None
    errors += _cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file (``env`` defaults to the process environment)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {str(file)!r}: {exc.strerror or exc}"]) from None
    return parse_config(text, env=os.environ if env is None else env, base_dir=file.parent)


def config_warnings(cfg: Config) -> list[str]:
    """Things that are valid but that an operator must hear about at start."""
    out = []
    if cfg.dry_run:
        out.append(
            "DRY-RUN MODE: no Clickatell API key is configured (clickatell.api_key); "
            "messages are recorded and logged but NOT sent"
        )
    if not cfg.webhook_auth.configured:
        out.append("webhook_auth is not configured: anyone who can reach the webhook endpoints can page")
    if not cfg.admin_auth.configured:
        out.append("admin_auth is not configured: /send, /-/reload and /api/v1 are open")
    if not cfg.callbacks.secret.get_secret_value():
        out.append("callbacks.secret is not configured: anyone can post delivery reports and replies")
    if not cfg.groups:
        out.append("no groups are configured: alerts are recorded as unrouted and nothing is sent")
    return out
