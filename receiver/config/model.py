"""The config as typed, frozen objects: value types, sections and the derived views.

No I/O here: :mod:`receiver.config.load` reads the file, expands ``${VAR}``, reads ``*_file``
secrets, validates into these models and cross-checks them. Field names are PRODUCT.md's keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time as TimeOfDay
from functools import cached_property
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
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


@dataclass(frozen=True, slots=True, repr=False)
class Storage:
    """Where the outbox lives: ``url`` as written; for SQLite the file it names (``path``), for
    PostgreSQL the password given beside the URL (``password``, from ``password_file``)."""

    url: str
    path: str = ""  # sqlite only
    password: str | None = field(default=None, repr=False)  # postgresql only, when not in the URL

    @property
    def kind(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.url.startswith("sqlite:") else "postgresql"

    def __str__(self) -> str:
        """The URL with any password masked: safe to log."""
        return redact(self.url)

    def __repr__(self) -> str:
        return f"Storage({str(self)!r})"


def redact(url: str) -> str:
    """``url`` with the password of its user part masked, however it is written (a ``#``, ``/``
    or ``?`` left unencoded in it included): everything between the first ``:`` after the
    scheme and the last ``@`` of the URL."""
    url = _SECRET_PARAM.sub(r"\1***", url)  # ?password=, ?sslpassword= (any case)
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


_SECRET_PARAM = re.compile(r"([?&][^=&#]*password=)[^&#]*", re.IGNORECASE)
# Query parameters of a postgresql:// URL asyncpg understands (anything else is a server setting,
# which is allowed too, but these are checked).
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _postgresql(url: str, password: str | None) -> Storage:
    """``postgresql://user[:password]@host[:port]/database[?sslmode=…&…]``; host, user,
    password and database may also come from the ``PG*`` environment variables."""
    try:
        parts = urlsplit(url)
        # one host's port must be a number; several hosts (h1:5432,h2:5432) are the driver's
        port = None if "," in parts.netloc else parts.port
        if port == 0:
            raise ValueError
    except ValueError:  # its message may quote the password: not shown
        raise ValueError(f"{str(Storage(url))!r} is not a PostgreSQL URL: its port is not a number from "
                         "1 to 65535 (a password with # / ? @ must be percent-encoded, %23 %2F %3F %40)") from None
    if parts.fragment:
        raise ValueError(f"{str(Storage(url))!r}: a PostgreSQL URL has no #fragment")
    query = parse_qs(parts.query, keep_blank_values=True)
    for key, values in query.items():
        if len(values) > 1:
            raise ValueError(f"{str(Storage(url))!r}: {key} is given {len(values)} times")
    if any(k.lower() == "password" for k in query):
        raise ValueError(f"{str(Storage(url))!r}: a password in the query would be shown wherever the "
                         "URL is; give it as user:password@ in the URL, or as storage.password_file")
    mode = query.get("sslmode", ["prefer"])[0]
    if mode not in _SSLMODES:
        raise ValueError(f"{str(Storage(url))!r}: sslmode {mode!r} is not one of {', '.join(_SSLMODES)}")
    if password and parts.password:
        raise ValueError("give the PostgreSQL password in the URL or as storage.password(_file), not both")
    return Storage(url, "", password or None)


def _storage(value: Any, info: ValidationInfo) -> Storage:
    """``sqlite:///absolute/path.db``, ``sqlite://relative/path.db`` (relative to the config
    file's directory, the validation context's ``base_dir``; to the working directory when there
    is none), or ``postgresql://…`` (or a mapping ``{url, password | password_file}``).
    Exactly what ``run`` can open: no path, sqlite options or another scheme is an error."""
    if isinstance(value, Storage):
        return value
    password = None
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"url", "password"})
        if unknown or "url" not in value:
            raise ValueError(f"storage: unknown key {unknown[0]!r}" if unknown else
                             "storage: a mapping needs url (and may have password or password_file)")
        value, password = value["url"], value.get("password")
    url = str(value).strip()
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and sep:
        return _postgresql(url, password)
    if password:
        raise ValueError("storage: a password is for postgresql:// storage only")
    if scheme != "sqlite" or not sep:
        raise ValueError(f"{str(Storage(url))!r} is not a storage URL such as "
                         "sqlite:///var/lib/sms-receiver/outbox.db or postgresql://user@host/db")
    if "?" in rest or "#" in rest:
        raise ValueError(f"{url!r}: sqlite storage takes no options")
    if not rest or rest.endswith("/") or rest == ":memory:":
        raise ValueError(
            f"{url!r} names no file: the outbox must be a file that outlives the process, "
            "e.g. sqlite:///var/lib/sms-receiver/outbox.db"
        )
    base = (info.context or {}).get("base_dir")
    if base is not None and not os.path.isabs(rest):  # the rule *_file paths follow too
        return Storage(url, os.path.normpath(os.path.join(base, rest)))
    return Storage(url, rest)


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
    username: str = Field(min_length=1)
    # required and not empty: an empty password would let anyone in who knows the user name
    password: SecretStr

    @field_validator("password")
    @classmethod
    def _not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("the password is empty: give one (or password_file), or remove basic_auth")
        return v


class AdminAuth(_Model):
    """Credentials for ``Authorization``; configured ones are always required. With none:
    admin endpoints answer loopback clients only, webhooks are refused, unless
    ``allow_unauthenticated`` (ignored when credentials are configured)."""

    bearer_tokens: Tokens = ()
    basic_auth: BasicAuth | None = None
    allow_unauthenticated: bool = False

    @property
    def configured(self) -> bool:
        """Bearer or basic credentials are configured (Grafana's HMAC secret is not counted)."""
        return bool(self.bearer_tokens or (self.basic_auth and self.basic_auth.username))


class WebhookAuth(AdminAuth):
    grafana_hmac_secret: SecretStr = SecretStr("")
    grafana_hmac_header: str = "X-Grafana-Alerting-Signature"
    grafana_hmac_timestamp_header: str = ""  # set when Grafana signs "<timestamp>:<body>"
    # how far the signed timestamp may be from our clock, either way: bounds replays
    grafana_hmac_max_age: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 300.0


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


class Escalate(_Model):
    """A page nobody acknowledged within ``after`` goes to ``to`` (and on down the chain), at
    most ``repeat`` rounds."""

    after: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
    to: tuple[str, ...] = Field(min_length=1)
    repeat: int = Field(1, ge=1, le=10)
    level: str | None = None  # only pages at this level or more urgent escalate; None: every page


class AlertmanagerApi(_Model):
    """Where an acknowledgement creates its silences (Alertmanager API v2): the first of ``urls``
    that answers (an HA pair gossips silences); ``grafana_urls``: the same for Grafana-sourced
    pages (Grafana's Alertmanager API, same v2 shape), none: no silence for those."""

    urls: tuple[str, ...] = ()
    grafana_urls: tuple[str, ...] = ()
    bearer_token: SecretStr = SecretStr("")
    basic_auth: BasicAuth | None = None
    timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 5.0

    @field_validator("urls", "grafana_urls")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"{url!r} is not an http(s) URL such as http://alertmanager:9093")
        return tuple(u.rstrip("/") for u in v)


class Group(_Model):
    id: str = Field(min_length=1)
    name: str = ""
    level: str | None = None  # None: the most urgent level
    members: tuple[Phone, ...]
    template: str = "default"
    send_resolved: bool = True
    api_key: SecretStr = SecretStr("")
    quiet_hours: QuietHours | None = None
    timezone: Annotated[str, BeforeValidator(_timezone)] | None = None  # of template times; None: Config's
    send_template: str | None = None  # the send_templates entry its /send useTemplate items render
    # Two-way paging (PRODUCT.md "Two-way paging and escalation")
    two_way: bool = False  # firing pages end with " #<ref>"; members may reply ACK/UNACK/ESC/HELP
    ack_duration: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 3600.0
    escalate: Escalate | None = None

    @field_validator("members", mode="after")
    @classmethod
    def _some_members(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("the group has no members: list at least one phone number, e.g. "
                             "members: ['+886911960999']")
        return v


class SendTemplate(_Model):
    """A ``/send`` template: ``syntax`` ``seed`` (the seed's ``{name}`` placeholders, filled from
    the item's ``variables``) or ``jinja2`` (the sandbox, with the variables by name). Written in
    the file as a plain string (seed syntax) or as ``{syntax, text}``."""

    syntax: Literal["seed", "jinja2"] = "seed"
    text: str = Field(min_length=1)


def _send_template(value: Any) -> Any:
    return {"text": value} if isinstance(value, str) else value


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
    # how long a claimed message is reserved: should its sending end without a result recorded
    # (a bug), it is due again then
    lease: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 60.0
    poll_interval: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 1.0


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
    # Firing pages at urgent_level go out at once, past the throttle, while the number got fewer
    # than this many of them in the window; beyond it they are throttled (held ≤ urgent_max_delay).
    # 10 an hour: more distinct critical pages than anyone can act on, yet it stops a flapping
    # critical alert from ringing a phone every few seconds. null: no ceiling.
    urgent_ceiling: ThrottleRule | None = ThrottleRule(count=10, window=3600)


class TlsConfig(_Model):
    """The listener's certificate (chain) and key, PEM; relative paths are relative to the config
    file's directory. Re-read by a reload: new connections get the renewed certificate."""

    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)

    @field_validator("cert_file", "key_file")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")  # the rule storage and *_file paths follow
        return os.path.normpath(os.path.join(base, v)) if base is not None and not os.path.isabs(v) else v


class ServerConfig(_Model):
    """Limits of the HTTP listener (our own section): a stalled or idle connection holds a file
    descriptor, so every phase of a connection is timed and their number is capped."""

    header_timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 10.0
    body_timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 60.0
    idle_timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 75.0
    max_connections: int = Field(2000, ge=2)
    tls: TlsConfig | None = None


class CallbacksConfig(_Model):
    # …/callbacks/clickatell/status/<secret> (or ?secret=…) on the callback URL in Clickatell's portal
    secret: SecretStr = SecretStr("")
    allow_unauthenticated: bool = False  # with no secret: accept callbacks anyway (else 401)


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
    storage: Annotated[Storage, BeforeValidator(_storage)] = Storage(
        "sqlite:///var/lib/sms-receiver/outbox.db", "/var/lib/sms-receiver/outbox.db")
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
    timezone: Annotated[str, BeforeValidator(_timezone)] = "UTC"  # of template times, unless the group's
    send_templates: Mapping[str, Annotated[SendTemplate, BeforeValidator(_send_template)]] = Field(
        default_factory=dict)  # /send templates by name (alert templates are never used for /send)
    # Our own keys, beyond PRODUCT.md:
    max_body_bytes: int = Field(1 << 20, ge=1024)
    dedup_window: Duration = 3600.0
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # run --log-level wins
    server: ServerConfig = ServerConfig()
    dispatch: DispatchConfig = DispatchConfig()
    callbacks: CallbacksConfig = CallbacksConfig()
    paging: PagingConfig = PagingConfig()
    retention: Duration = 7 * 86400.0  # finished messages older than this are deleted
    alertmanager: AlertmanagerApi = AlertmanagerApi()  # silences made by SMS acknowledgements

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

    def severity_rank(self, severity: str) -> int:
        """The rank of a ``severity_label`` value's level (0 is the most urgent)."""
        return self._ranks[self.severity_level(severity)]

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


