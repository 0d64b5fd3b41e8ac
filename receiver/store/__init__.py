"""The durable outbox: storage primitives behind one protocol, with no paging policy inside.

Contract of every implementation (the embedded one is :mod:`receiver.store.sqlite`):

- :meth:`Store.receive` makes a webhook's notification durable, with its dedup key checked and
  recorded in the same transaction, or raises :class:`StoreError`; only after it returns may the
  webhook be answered 2xx. False: a replay within the window (nothing written).
- :meth:`Store.planned` turns received notifications into messages, each in one transaction with
  the notification's removal: planned exactly once whoever crashes when.
- :meth:`Store.claim` hands out due messages under a lease; a claimed message whose lease ran out
  (its sending ended without a result, or its holder died) is due again. A crash between
  Clickatell's answer and :meth:`Store.finish` is the at-least-once window (README, Delivery
  guarantees).
- The paging policy (:mod:`receiver.holds`) reads and writes its state through
  :meth:`Store.deciding`: inside it no other process decides for the same store, so what it
  read (the throttle history, the holds) is still true when :meth:`Decisions.apply` writes what
  it decided, in one transaction. Two replicas never both clear a phone's last allowed send.
- A fault that may have lost data (an I/O error, corruption) sets :attr:`Store.broken` and calls
  the ``on_broken`` callback: the process must stop answering and exit so that it is restarted.
  A full disk is not such a fault: writes fail with :class:`StoreError` until there is room.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from receiver.config import Storage
from receiver.models import Item, MessageState, NewMessage, RecipientState

# How far back a delivery report without a clientMessageId is looked for. Clickatell's reports
# arrive within the SMS validity period (hours); looking by message keeps the recipients table
# free of an index on Clickatell's random ids, whose inserts land on random pages of a big file.
REPORT_WINDOW = 3 * 86400.0


class StoreError(Exception):
    """The store could not do what was asked (disk full, broken): the caller answers 5xx."""


# ---------------------------------------------------------------------------------------------
# What goes in


@dataclass(frozen=True, slots=True)
class Received:
    """A notification answered 2xx and not planned yet: its validated body."""

    id: str  # the notification id of the webhook's answer
    received_at: float
    source: str
    body: bytes
    priority: int = 0  # its most urgent alert's level rank: the most urgent are planned first
    error: str | None = None  # why it could not be planned (kept, tried again at the next start)


@dataclass(frozen=True, slots=True)
class Planned:
    """What became of a received notification: its messages (created at ``received_at``), or
    the ``error`` that kept it from being planned."""

    notification_id: str
    received_at: float
    messages: tuple[NewMessage, ...] = ()
    error: str | None = None
    pages: tuple[NewPage, ...] = ()  # two-way pages among ``messages``
    resolved: tuple[str, ...] = ()  # keys of the alerts it resolves: their pages stop escalating


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    number: str
    state: RecipientState
    api_message_id: str | None = None
    error_code: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """What one attempt to send a claimed message came to."""

    message_id: str
    updates: tuple[RecipientUpdate, ...]
    at: float
    retry_at: float | None  # still-pending recipients are due again then
    last_error: str | None
    dead: bool = False  # given up: the still-pending recipients fail


@dataclass(frozen=True, slots=True)
class Fold:
    """Held rows gone out inside the summary ``bundle_id`` (None: collapsed, nothing sent):
    whole messages (``number`` None), or one number's held recipients of them."""

    message_ids: tuple[str, ...]
    bundle_id: str | None
    number: str | None = None


@dataclass(frozen=True, slots=True)
class Changes:
    """Writes the paging policy decided, applied in one transaction at time ``at``. A message
    left with no recipient to send to settles into the state its recipients give it."""

    at: float
    messages: tuple[NewMessage, ...] = ()  # new summaries
    # (message id, number) the throttle cleared: sent to at ``at`` in its history. A send that
    # does not go out gives its place back (finish)
    sends: tuple[tuple[str, str], ...] = ()
    holds: tuple[tuple[str, str, float], ...] = ()  # (message id, number, until) it holds
    hold_reason: str = ""  # shown on the messages of ``holds``
    folds: tuple[Fold, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.messages or self.sends or self.holds or self.folds)


# ---------------------------------------------------------------------------------------------
# What comes out


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
    hold_reason: str | None = None  # why it is or was held, as the paging policy put it
    bundle_id: str | None = None  # the summary message it went out in
    items: tuple[Item, ...] = ()
    recipients: tuple[RecipientRecord, ...] = ()

    @property
    def pending_numbers(self) -> tuple[str, ...]:
        return tuple(r.number for r in self.recipients if r.state == "pending")


@dataclass(frozen=True, slots=True)
class NumberHistory:
    """What the store knows of one phone number: when it was sent to, and whether it has
    recipients held by the throttle now."""

    sent_at: list[float]
    holding: bool


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int  # pending or being sent
    oldest_pending_created_at: float | None  # of those, or of a notification not planned yet
    by_state: dict[str, int] = field(default_factory=dict)
    held_recipients: int = 0  # (message, number) pairs held by the throttle
    unplanned: int = 0  # notifications received and not yet planned
    unplanned_failed: int = 0  # notifications that could not be planned (kept, with their error)

    def oldest_pending_age(self, now: float) -> float:
        """Seconds the oldest waiting message has waited (0 when none waits)."""
        oldest = self.oldest_pending_created_at
        return 0.0 if oldest is None else max(0.0, now - oldest)


@dataclass(frozen=True, slots=True)
class MessageQuery:
    group: str | None = None
    state: str | None = None
    since: float | None = None
    notification: str | None = None  # the messages planned from one webhook (its answer's id)
    limit: int = 100


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """How the store's connections are used, for metrics (zeros where a backend has none)."""

    backend: str  # "sqlite" or "postgresql"
    connections_in_use: int = 0
    connections_idle: int = 0
    waiting: int = 0  # callers waiting for a connection
    errors: int = 0  # operations that failed on the database's side or its connection, ever
    claims_taken_over: int = 0  # claims of another (or a dead) process this one took, ever


class Decisions(Protocol):
    """The paging policy's state, read and written inside :meth:`Store.deciding`."""

    async def history(self, numbers: Sequence[str], since: float) -> dict[str, NumberHistory]:
        """Each number's sends after ``since`` and whether it has throttle-held recipients."""

    async def held_messages(self, now: float) -> list[MessageRecord]:
        """Messages held whole (digest, quiet hours) whose hold ended by ``now``."""

    async def held_numbers(self, now: float) -> dict[str, list[MessageRecord]]:
        """Numbers with a throttle hold due by ``now``: every message that number has held."""

    async def apply(self, changes: Changes) -> None:
        """Write what the policy decided, in one transaction."""

    async def urgent_sends(self, numbers: Sequence[str], since: float, created_since: float,
                           rank: int) -> dict[str, list[float]]:
        """When each number was sent a firing message of level rank ≤ ``rank`` after ``since``
        (the throttle's clearance; a send that did not go out is not counted), among messages
        created after ``created_since``. Numbers with none are left out."""


class Store(Decisions, Protocol):
    """The outbox. Its :class:`Decisions` methods used outside :meth:`deciding` are each a
    transaction of their own (tests, tools); the dispatcher uses them inside."""

    broken: str | None  # set when a fault ended this store (see the module's docstring)
    # Other processes claim from it too (PostgreSQL): a claim whose lease runs out while it is
    # being sent is taken over by another, so a send must not start past its lease.
    shared: bool

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers and can write (readiness)."""

    def trouble(self) -> str | None:
        """Why the store will not accept again without a restart (broken, a write stuck for
        long, writes failing for long for another reason than a full disk), or None (liveness)."""

    # -- intake and planning ---------------------------------------------------------------------

    async def receive(self, notification: Received, key: str, window: float) -> bool:
        """Store a webhook's notification unless ``key`` was seen within ``window`` seconds
        (False); durable when it returns."""

    async def accept(self, messages: Sequence[NewMessage], now: float) -> None:
        """Store messages planned at once (``/send``), created ``now``."""

    async def unplanned(self, limit: int) -> list[Received]:
        """Notifications not planned yet (none that failed): the most urgent first, then in
        order of receipt (a critical page is not planned behind a storm of warnings)."""

    async def planned(self, plans: Sequence[Planned]) -> None:
        """Insert each plan's messages and remove its notification (or keep it, with its error)."""

    async def received(self, notification_id: str) -> Received | None:
        """The notification if it is not planned yet (or could not be)."""

    # -- sending ---------------------------------------------------------------------------------

    async def claim(self, now: float, limit: int, lease: float,
                    exclude: Sequence[str] = ()) -> list[MessageRecord]:
        """Due messages (most urgent first, and those whose lease ran out), marked ``sending``
        until ``now + lease``, with their recipients; never one of ``exclude``."""

    async def finish(self, result: Result) -> MessageState:
        """Record an attempt's per-recipient results; returns the message's new state. A
        recipient still pending after the attempt loses its place in the throttle's history:
        the throttle counts what went out, and clears it again before the next attempt."""

    async def retry_now(self, now: float) -> int:
        """Make every pending message due now (after a reload fixed a key)."""

    # -- holds (the paging policy's storage) ------------------------------------------------------

    def deciding(self) -> AbstractAsyncContextManager[Decisions]:
        """Exclusive access to the policy's state: one decider at a time across every process
        on this store. Raises :class:`StoreError` (on entry, inside or on exit) when the store
        cannot be used. PostgreSQL: everything inside is one transaction, stored whole or not at
        all. SQLite: each :meth:`Decisions.apply` is a transaction of its own (one process, one
        decider: a failure leaves what it decided before, all of it true)."""

    def usage(self) -> StoreUsage: ...

    # -- reporting and housekeeping --------------------------------------------------------------

    async def delivery_report(self, api_message_id: str, status: str,
                              final_state: RecipientState | None, now: float,
                              message_id: str | None = None) -> bool:
        """Record a delivery report; False when no recipient has that Clickatell message id.
        ``message_id`` is the report's ``clientMessageId`` (ours); without it only messages
        created in the last :data:`REPORT_WINDOW` seconds are searched. Reports only move a
        recipient forward: a late "in progress" never overwrites "delivered"."""

    async def get_message(self, message_id: str) -> MessageRecord | None: ...

    async def list_messages(self, query: MessageQuery) -> list[MessageRecord]: ...

    async def stats(self) -> OutboxStats: ...

    async def prune(self, before: float, keys_before: float, sends_before: float,
                    limit: int = 10_000) -> int:
        """Delete at most ``limit`` finished messages created before ``before`` (with their
        recipients), and at most ``limit`` dedup keys older than ``keys_before`` and rows of
        throttle history older than ``sends_before``; returns how many rows went, all tables
        counted. Call again while it returns ``limit`` or more."""

    async def message_history(self, query: HistoryQuery) -> HistoryPage:
        """A page of the history page's list (see :class:`HistoryQuery`): bounded work per call
        whatever the filters and however many messages are stored."""

    async def group_counts(self, since: float) -> list[GroupCounts]:
        """Per group, the recipients of its messages created in the hour ``since`` falls in or
        later, by state (counted as they are written: no scan of the messages)."""

    # -- two-way paging (receiver.acks, receiver.escalation) ---------------------------------------

    async def allocate_refs(self, n: int) -> list[int]:
        """``n`` new page references, never handed out before (gaps are harmless)."""

    async def page(self, ref: int) -> PageRecord | None: ...

    async def last_page(self, number: str) -> PageRecord | None:
        """The newest page (or escalation of one) sent to ``number``."""

    async def pages_of(self, message_ids: Sequence[str]) -> dict[str, PageRecord]:
        """The pages of these messages (each page's own message id, or an escalation's)."""

    async def reply_seen(self, reply_id: str, number: str, at: float, action: str) -> bool:
        """Record a reply; False when one with this id was recorded before (a repeated callback)."""

    async def replied_since(self, number: str, action: str, since: float) -> int:
        """How many replies ``number`` sent with ``action`` after ``since``."""

    async def ack(self, ack: NewAck) -> bool:
        """Record an acknowledgement and stop the page's escalation, in one transaction; False
        when this reply acknowledged before."""

    async def ack_outcome(self, reply_id: str, silence_ids: Sequence[str], outcome: str) -> None: ...

    async def unack(self, ref: int, at: float, escalate_at: float | None) -> list[str]:
        """Undo a page's acknowledgements; its escalation is due at ``escalate_at`` (None: not
        resumed). Returns the silence ids they made."""

    async def escalate_at(self, ref: int, at: float) -> bool:
        """Make the page's next escalation round due at ``at`` (unless acknowledged)."""

    async def due_escalations(self, now: float, limit: int) -> list[PageRecord]:
        """Unacknowledged pages with a firing alert whose round is due by ``now``, or whose every
        recipient failed (a failed delivery escalates at once)."""

    async def escalated(self, ref: int, rounds: int, next_at: float | None, at: float,
                        messages: Sequence[NewMessage], groups: Sequence[str]) -> bool:
        """Round ``rounds + 1`` of the page: its messages in, when still unacknowledged and at
        ``rounds`` (another replica did not take it), in one transaction; False otherwise."""


def open_store(storage: Storage, on_broken: Callable[[str], None] | None = None) -> Store:
    """The implementation for a ``storage`` setting (not yet opened)."""
    if storage.kind == "postgresql":
        from receiver.store.postgres import PostgresStore

        return PostgresStore(storage)
    from receiver.store.sqlite import SQLiteStore

    return SQLiteStore(storage.path, on_broken=on_broken)


# ---------------------------------------------------------------------------------------------
# The history page (receiver.ui): keyset-paged reads over a million messages

# How many index entries a page may walk past when a filter no index serves (the text, a second
# filter) leaves most of them out: the page then stops there and offers to search on, rather
# than walk every message (a rare word in a year of pages) within one request.
HISTORY_SCAN = 20_000


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """One page of messages, newest first (``created_at``, then ``id``, descending).

    ``group`` and ``state`` are served by an index each (the group's when both are given);
    ``level``, ``text`` (a case-insensitive substring of the SMS text) and the other of
    ``group``/``state`` are checked on at most ``scan`` entries of that index per page.
    ``since`` (inclusive) and ``until`` (exclusive) bound ``created_at``; ``before`` is the
    cursor a previous page returned."""

    group: str | None = None
    level: str | None = None
    state: str | None = None
    since: float | None = None
    until: float | None = None
    text: str | None = None
    before: tuple[float, str] | None = None
    limit: int = 50
    scan: int = HISTORY_SCAN


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """``messages`` (at most the query's limit, with their recipients); ``next``: the cursor of
    the following page (None: there is none); ``scanned_to``: set when the page stopped at its
    scan bound, the ``created_at`` it searched back to (older messages may still match)."""

    messages: list[MessageRecord]
    next: tuple[float, str] | None = None
    scanned_to: float | None = None


@dataclass(frozen=True, slots=True)
class GroupCounts:
    """Recipients of one group's messages created in a window (whole hours), by state."""

    group: str
    by_state: dict[str, int]


# ---------------------------------------------------------------------------------------------
# Two-way paging: pages by reference, their acknowledgements and escalations


@dataclass(frozen=True, slots=True)
class NewPage:
    """A firing page of a two-way group, stored with its message."""

    ref: int
    message_id: str
    group_id: str
    source: str
    escalate_at: float | None  # its first escalation round is due then (None: no escalation)
    alerts: tuple[tuple[str, dict[str, str]], ...]  # (key, labels) of its firing alerts


@dataclass(frozen=True, slots=True)
class NewAck:
    reply_id: str
    ref: int
    number: str
    by: str  # as shown: a masked number
    at: float
    until: float


@dataclass(frozen=True, slots=True)
class AckRecord:
    by: str
    number: str
    at: float
    until: float
    silence_ids: tuple[str, ...] = ()
    outcome: str | None = None
    unacked_at: float | None = None


@dataclass(frozen=True, slots=True)
class EscalationRecord:
    round: int
    group_id: str
    at: float
    message_id: str


@dataclass(frozen=True, slots=True)
class PageRecord:
    ref: int
    message_id: str
    group_id: str
    source: str
    created_at: float
    acked_at: float | None
    escalate_at: float | None
    rounds: int
    alerts: tuple[tuple[str, dict[str, str], bool], ...] = ()  # (key, labels, resolved)
    acks: tuple[AckRecord, ...] = ()
    escalations: tuple[EscalationRecord, ...] = ()

    @property
    def firing(self) -> bool:
        return any(not resolved for _, _, resolved in self.alerts)

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups it reached: its own, then those it escalated to."""
        out = [self.group_id]
        for e in self.escalations:
            if e.group_id not in out:
                out.append(e.group_id)
        return tuple(out)
