"""The durable outbox: one interface, an embedded SQLite implementation (and PostgreSQL later).

Contract shared by every implementation:

- :meth:`Store.receive` makes a webhook's body and routing durable (the SQLite store: a record
  appended to its journal), or raises :class:`StoreError`; only after it returns may the webhook
  be answered 2xx. A notification whose dedup key was seen within ``window`` seconds is a
  replay: nothing is written (a replay older than what the receiving process remembers is
  stored, and dropped when planned).
- :meth:`Store.unplanned` / :meth:`Store.planned_unplanned` turn received notifications into
  messages: their dedup keys, their messages and the position after them commit together, so a
  notification is planned exactly once whoever crashes when. :meth:`Store.inbox` /
  :meth:`Store.planned` do the same for inbox rows (kept from an older release, or that could
  not be planned).
- :meth:`Store.accept` commits messages planned at once (``/send``), with the same dedup rule.
- :meth:`Store.claim` hands out due messages under a lease; a claimed message whose lease ran out
  (the process died mid-send) is due again. This is the only at-least-once window.
- :meth:`Store.finish` records what Clickatell answered per recipient and the next state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, urlsplit

from receiver.config import parse_duration
from receiver.models import Item, NewMessage
from receiver.paging import Throttle

# How far back a delivery report without a clientMessageId is looked for. Clickatell's reports
# arrive within the SMS validity period (hours); looking by message keeps the recipients table
# free of an index on Clickatell's random ids, whose inserts land on random pages of a big file.
REPORT_WINDOW = 3 * 86400.0

MessageState = Literal[
    "pending", "sending", "sent", "partial", "failed", "dead", "dry_run",
    "held", "suppressed", "bundled", "collapsed",
]
RecipientState = Literal[
    "pending", "accepted", "failed", "delivered", "undelivered", "dry_run",
    "held", "suppressed", "bundled", "collapsed",
]
# held: waiting for a digest, quiet hours or the throttle; suppressed: delivery none;
# bundled: folded into the summary message ``bundle_id``; collapsed: fired and resolved while held.
MESSAGE_STATES: tuple[MessageState, ...] = (
    "pending", "sending", "sent", "partial", "failed", "dead", "dry_run",
    "held", "suppressed", "bundled", "collapsed",
)


class StoreError(Exception):
    """The store could not do what was asked (disk, database down): the caller answers 5xx."""


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    number: str  # E.164
    state: RecipientState
    api_message_id: str | None = None
    error_code: str | None = None
    error: str | None = None
    delivery_status: str | None = None
    updated_at: float = 0.0
    hold_until: float | None = None  # held by the throttle until then
    bundle_id: str | None = None  # the summary message it went out in
    admitted: bool = False  # the throttle cleared it (retries are not throttled again)


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: str
    created_at: float
    source: str
    group_id: str
    level: str
    status: str
    text: str
    encoding: str
    parts: int
    alert_count: int
    state: MessageState
    attempts: int
    next_attempt_at: float
    updated_at: float
    priority: int = 0
    template_error: str | None = None
    last_error: str | None = None
    accepted_at: float | None = None
    hold_reason: str | None = None  # "digest 15m", "quiet hours", "throttle"
    bundle_id: str | None = None  # the summary message it went out in
    items: tuple[Item, ...] = ()
    recipients: tuple[RecipientRecord, ...] = ()

    @property
    def pending_numbers(self) -> tuple[str, ...]:
        return tuple(r.number for r in self.recipients if r.state == "pending")


@dataclass(frozen=True, slots=True)
class AcceptResult:
    duplicate: bool
    message_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Received:
    """A notification answered 2xx and not yet planned: its body and its routing (JSON)."""

    id: int
    received_at: float
    source: str
    body: bytes
    plan: str
    error: str | None = None  # why it could not be planned (it stays in the inbox)
    key: str = ""  # journal rows: the dedup key, checked when planned, and its window
    window: float = 0.0


@dataclass(frozen=True)
class Unplanned:
    """Received notifications not yet planned, from the journal: ``rows`` numbered from 0 and
    the position after them (None: the same as before)."""

    rows: list[Received]
    after: Any


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    number: str
    state: RecipientState
    api_message_id: str | None = None
    error_code: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int  # pending or being sent
    oldest_pending_created_at: float | None
    by_state: dict[str, int] = field(default_factory=dict)
    held_recipients: int = 0  # (message, number) pairs held by the throttle
    inbox: int = 0  # notifications received and not yet planned
    inbox_failed: int = 0  # notifications that could not be planned (kept, with their error)

    def oldest_pending_age(self, now: float) -> float:
        """Seconds the oldest waiting message has waited (0 when none waits)."""
        oldest = self.oldest_pending_created_at
        return 0.0 if oldest is None else max(0.0, now - oldest)


@dataclass(frozen=True, slots=True)
class Released:
    """One summary made from held messages (``message_id`` None: all of it collapsed)."""

    kind: Literal["bundle", "digest", "quiet_hours"]
    group_id: str
    message_id: str | None
    held_messages: int
    alerts: int
    collapsed: int


@dataclass(frozen=True, slots=True)
class MessageQuery:
    group: str | None = None
    state: str | None = None
    since: float | None = None
    notification: str | None = None  # the messages planned from one webhook (its answer's id)
    limit: int = 100


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers a query."""

    async def accept(
        self, key: str, source: str, now: float, window: float, messages: Sequence[NewMessage]
    ) -> AcceptResult: ...

    async def receive(
        self, key: str, source: str, now: float, window: float, body: bytes, plan: str
    ) -> bool:
        """Store a notification in the inbox; False (nothing stored) when it is a replay."""

    async def inbox(self, limit: int) -> list[Received]:
        """The oldest inbox rows not marked failed, in the order they were received."""

    async def received(self, message_id: str) -> Received | None:
        """The inbox row of notification (or, from an older release, message) ``message_id``,
        if it is still there."""

    async def unplanned(self, limit: int) -> Unplanned:
        """The journal's notifications after the planned position (about ``limit``)."""

    async def planned_unplanned(self, batch: Unplanned, done: Sequence[tuple[int, Sequence[NewMessage], float]],
                                failed: Sequence[tuple[int, str]] = ()) -> set[int]:
        """Like :meth:`planned` for a journal batch, with each row's dedup key checked in the
        same transaction, and the position moved past it; returns the ids of replays."""

    async def planned(self, done: Sequence[tuple[int, Sequence[NewMessage], float]],
                      failed: Sequence[tuple[int, str]] = ()) -> None:
        """Insert each done row's messages (created at the given time, when the notification
        was received; ids already stored are kept as they are), then delete the rows; mark
        ``failed`` rows."""

    async def claim(
        self, now: float, limit: int, lease: float,
        throttle: Throttle | None = None, throttled: dict[str, int] | None = None,
    ) -> list[MessageRecord]:
        """Due messages, most urgent first, marked ``sending`` until ``now + lease``.

        With a ``throttle``, each recipient not yet cleared is checked against its number's
        recent sends (kept in the store, so the rules hold across restarts and replicas): it is
        cleared and its send recorded, or it is ``held`` (counted per group into ``throttled``).
        A message left with no recipient to send to now is not returned."""

    async def release(
        self, now: float, throttle: Throttle, max_parts: int, new_id: Callable[[float], str]
    ) -> list[Released]:
        """Turn what is due of the held messages into summaries, in one transaction: per group
        for digests and quiet hours, per number for the throttle once its rules (or an urgent
        message's deadline) allow. The summaries are new pending messages."""

    async def finish(
        self,
        message_id: str,
        updates: Sequence[RecipientUpdate],
        now: float,
        *,
        retry_at: float | None,
        last_error: str | None,
        dead: bool = False,
    ) -> MessageState:
        """Apply per-recipient results; recipients still pending make the message due again at
        ``retry_at`` (or, with ``dead``, fail). Returns the message's new state."""

    async def retry_now(self, now: float) -> int:
        """Make every pending message due now (after a reload fixed a key)."""

    async def get_message(self, message_id: str) -> MessageRecord | None: ...

    async def list_messages(self, query: MessageQuery) -> list[MessageRecord]: ...

    async def stats(self) -> OutboxStats: ...

    async def delivery_report(
        self, api_message_id: str, status: str, final_state: RecipientState | None, now: float,
        message_id: str | None = None,
    ) -> bool:
        """Record a delivery report; False when no recipient has that Clickatell message id.

        ``message_id`` is the report's ``clientMessageId`` (our id, which every send carries):
        the recipient is then found through the message. Without it only messages created in
        the last :data:`REPORT_WINDOW` seconds are searched."""

    async def prune(self, before: float, keys_before: float | None = None,
                    sends_before: float | None = None, limit: int = 10_000) -> int:
        """Delete at most ``limit`` finished messages created before ``before`` (with their
        recipients), dedup keys older than ``keys_before`` and throttle history older than
        ``sends_before`` (both default to ``before``); returns how many rows went. Chunked so a
        large backlog never blocks the writer for long: call again while it returns ``limit``."""


def open_store(url: str) -> Store:
    """The implementation for a ``storage`` URL (not yet opened)."""
    if url.startswith("sqlite://"):
        from receiver.store.sqlite import SQLiteStore

        try:
            options = sqlite_options(url)
        except ValueError as exc:
            raise StoreError(f"storage: {exc}") from None
        return SQLiteStore(sqlite_path(url), **options)
    raise StoreError(f"storage {url.split('://')[0]}:// is not supported yet (use sqlite://)")


def sqlite_path(url: str) -> str:
    """``sqlite:///var/lib/x.db`` → ``/var/lib/x.db``; ``sqlite://data/x.db`` → ``data/x.db``.

    Options go in the query: ``?busy_timeout=500ms`` (how long a write waits for a lock held by
    another process before the store counts as unavailable; default 5s)."""
    rest = url.removeprefix("sqlite://").split("?", 1)[0]
    return rest or ":memory:"


def sqlite_options(url: str) -> dict[str, float]:
    """The keyword options of :class:`~receiver.store.sqlite.SQLiteStore` in a URL's query;
    raise ``ValueError`` naming an unknown or malformed one."""
    raw = dict(parse_qsl(urlsplit(url).query)) if "?" in url else {}
    unknown = set(raw) - {"busy_timeout"}
    if unknown:
        raise ValueError(f"unknown sqlite option(s): {', '.join(sorted(unknown))} (known: busy_timeout)")
    return {name: parse_duration(value) for name, value in raw.items()}
