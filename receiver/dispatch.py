"""Dispatch: drain the outbox into Clickatell.

One loop releases the holds that are due, claims due messages (most urgent first), runs them
through the throttle (:mod:`receiver.holds`) and sends each in its own task, at most
``dispatch.concurrency`` at a time; the recipients of one text go in requests of at most
``dispatch.batch_size``. What Clickatell answers decides each recipient's fate:

============================  ============================================================
answer                        what happens
============================  ============================================================
accepted                      done; counted as sent
per-recipient permanent code  that recipient failed (105 invalid number, 121 blocked …)
transient (5xx, 429, 301 …)   the message is due again after backoff with jitter
config (001, 007, 108 …)      logged loudly, kept pending; a reload makes it due at once
permanent (100, 101, 113 …)   the remaining recipients failed
still pending at max_age      dead letter: visible in the API and counted
============================  ============================================================

The dispatcher never claims a message it is still sending (a send slower than ``dispatch.lease``
must not go out twice). A result the store cannot take (a full disk) is kept and recorded as soon
as it can be; until then its message is not claimed again either, so nothing Clickatell accepted
is sent twice while the process lives. Without an API key (dry-run) a message is logged and
recorded as ``dry_run``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from receiver import holds
from receiver.clickatell import ClickatellClient, Kind, SendOutcome, classify
from receiver.clock import Clock
from receiver.config import format_duration
from receiver.metrics import Metrics
from receiver.phone import mask, msisdn
from receiver.pipeline import Snapshot, new_message_id
from receiver.store import MessageRecord, RecipientUpdate, Result, Store, StoreError

log = logging.getLogger("sms_receiver.dispatch")
T = TypeVar("T")

# How often held messages are looked at: the granularity of digests, quiet hours and bundles.
RELEASE_INTERVAL = 1.0


def backoff(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": between half and all of ``initial·2^(n-1)``."""
    delay = min(maximum, initial * 2 ** max(0, attempt - 1))
    return delay * rng.uniform(0.5, 1.0)


@dataclass(slots=True)
class _Attempt:
    """What one message's requests to Clickatell came to."""

    updates: list[RecipientUpdate]
    kind: Kind = Kind.OK
    error: str | None = None
    retry_after: float | None = None

    def merge(self, outcome: SendOutcome) -> None:
        if outcome.kind.severity > self.kind.severity:
            self.kind = outcome.kind
            self.error = _describe(outcome)
        if outcome.retry_after is not None:
            self.retry_after = max(self.retry_after or 0.0, outcome.retry_after)


def _describe(outcome: SendOutcome) -> str:
    head = f"HTTP {outcome.http_status}" if outcome.http_status else "no answer"
    code = f" code {outcome.error_code}" if outcome.error_code else ""
    return f"{head}{code}: {outcome.error or outcome.kind.value}"


class Dispatcher:
    def __init__(
        self,
        *,
        store: Store,
        snapshot: Callable[[], Snapshot],
        client: Callable[[], ClickatellClient],
        metrics: Metrics,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._snapshot = snapshot
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], str] = {}  # delivery task → its message id
        # results Clickatell gave that the store could not take yet, by message id
        self._unrecorded: dict[str, tuple[MessageRecord, Result]] = {}
        self.last_run: float | None = None  # monotonic time of the last loop pass (readiness)
        self.last_error: str | None = None  # the store error of the last pass, if any
        self._next_release = float("-inf")  # clock time of the next look at held messages
        self._lease_ends: dict[str, float] = {}  # message being sent → when its claim runs out

    def wake(self) -> None:
        """New messages were stored: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and send until cancelled; in-flight sends are awaited on the way out, and the
        results still unrecorded get one more try."""
        try:
            while True:
                claimed = await self.run_once()
                cfg = self._snapshot().config.dispatch
                if claimed and len(self._inflight) < cfg.concurrency:
                    continue  # more may be due
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                    # that lands as the wake-up fires, and the loop would never stop.
                    async with asyncio.timeout(cfg.poll_interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            await self.drain()
            await self._record_kept()
            for message, _ in self._unrecorded.values():
                log.error("stopping with the result of message %s unrecorded: Clickatell may "
                          "have accepted it, and it will be sent again after the restart", message.id)

    async def run_once(self) -> int:
        """One pass: record results still unrecorded, release what holds are due (at most once a
        second), claim what is due and start sending it. Returns how many were claimed. A step
        that fails does not keep the others from running; readiness shows the failure."""
        self.last_run = self._clock.monotonic()
        now = self._clock.now()
        self._metrics.dispatcher_last_run.set(now)
        snap = self._snapshot()
        errors: list[str] = []
        await self._step(errors, self._record_kept)
        if now >= self._next_release:
            self._next_release = now + RELEASE_INTERVAL
            await self._step(errors, lambda: self._release(snap, now))
        claimed = await self._step(errors, lambda: self._claim(snap, now)) or 0
        error = "; ".join(errors) or None
        if error and self.last_error is None:
            log.error("dispatcher cannot use the outbox: %s", error)
        self.last_error = error
        return claimed

    async def _step(self, errors: list[str], work: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await work()
        except StoreError as exc:
            errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in one step: the next pass tries again
            errors.append(f"{type(exc).__name__}: {exc}")
            if errors[-1] not in (self.last_error or ""):
                log.exception("dispatcher step failed")
        return None

    async def _record_kept(self) -> None:
        for message, result in list(self._unrecorded.values()):
            await self._record(message, result)

    async def _release(self, snap: Snapshot, now: float) -> None:
        self._released(await holds.release(
            self._store, snap.throttle, snap.config.clickatell.max_parts, new_message_id, now))

    async def _claim(self, snap: Snapshot, now: float) -> int:
        cfg = snap.config.dispatch
        room = cfg.concurrency - len(self._inflight)
        if room <= 0:
            return 0
        # neither a message being sent nor one whose result waits to be recorded: ours still
        now = self._clock.now()  # the lease starts now, not when this pass began
        claimed = await self._store.claim(now, room, cfg.lease,
                                          exclude=[*self._inflight.values(), *self._unrecorded])
        admission = await holds.gate(self._store, claimed, snap.throttle, now)
        self._released(admission.released)  # bundles an urgent page took with it
        for gid, n in admission.throttled.items():
            self._metrics.sms_throttled.labels(gid).inc(n)
        for message in admission.ready:
            if self._store.shared:
                self._lease_ends[message.id] = now + cfg.lease
            task = asyncio.create_task(self._deliver(message))
            self._inflight[task] = message.id
            task.add_done_callback(self._done)
        return len(claimed)

    def _released(self, released: list[holds.Released]) -> None:
        m = self._metrics
        for r in released:
            m.collapsed.labels(r.kind).inc(r.collapsed)
            if r.message_id is None:
                log.info("%s for group %s: all %d held alert(s) resolved meanwhile, nothing sent",
                         r.kind, r.group_id, r.alerts)
                continue
            m.summaries.labels(r.kind).inc()
            m.summary_size.labels(r.kind).observe(r.alerts)
            log.info("%s %s for group %s: %d held message(s), %d alert(s), %d collapsed",
                     r.kind, r.message_id, r.group_id, r.held_messages, r.alerts, r.collapsed)

    async def drain(self) -> None:
        """Wait for the sends in flight (tests, shutdown)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        self._wake.set()  # room for another claim

    # -- one message ---------------------------------------------------------------------------

    async def _deliver(self, message: MessageRecord) -> None:
        snap = self._snapshot()
        cfg = snap.config
        group = cfg.group(message.group_id)
        key = cfg.api_key_for(group) if group else cfg.clickatell.api_key.get_secret_value()
        numbers = message.pending_numbers
        try:
            if not key:
                attempt = self._dry_run(message, numbers)
            else:
                attempt = await self._send(message, numbers, key, snap)
        finally:
            self._lease_ends.pop(message.id, None)
        await self._record(message, self._result(message, numbers, attempt, snap))

    def _dry_run(self, message: MessageRecord, numbers: tuple[str, ...]) -> _Attempt:
        log.warning(
            "DRY-RUN (no API key): would send message %s to group %s (%s): %s",
            message.id, message.group_id, ", ".join(mask(n) for n in numbers), message.text,
        )
        self._metrics.sms_dry_run.labels(message.group_id).inc(len(numbers))
        return _Attempt([RecipientUpdate(n, "dry_run") for n in numbers])

    async def _send(
        self, message: MessageRecord, numbers: tuple[str, ...], key: str, snap: Snapshot
    ) -> _Attempt:
        cfg = snap.config
        attempt = _Attempt([])
        size = cfg.dispatch.batch_size
        lease_ends = self._lease_ends.get(message.id, float("inf"))
        with self._client().using() as client:  # all of its requests on one client, kept open
            for start in range(0, len(numbers), size):
                chunk = numbers[start : start + size]
                if self._clock.now() + client.timeout >= lease_ends:
                    # the claim could run out before Clickatell answers, and another replica
                    # would send these too: they wait for the next claim instead
                    attempt.merge(SendOutcome(Kind.TRANSIENT, (), None, client.api, 0.0, None,
                                              "the claim's lease runs out before a request could end"))
                    log.warning("message %s not sent now: its claim (dispatch.lease) would run out before "
                                "a request could end (clickatell.timeout); tried again at its next claim",
                                message.id)
                    break
                outcome = await self._request(client, key, chunk, message.text, message.id,
                                              cfg.clickatell.from_)
                self._take(attempt, outcome, chunk)
        return attempt

    async def _request(self, client: ClickatellClient, key: str, chunk: tuple[str, ...], text: str,
                       message_id: str, from_: str) -> SendOutcome:
        """One request's outcome; a failure of the client itself (a bug) as a transient one, so
        that what the message's earlier requests achieved is still recorded."""
        try:
            return await client.send(api_key=key, to=[msisdn(n) for n in chunk], content=text,
                                     client_message_id=message_id, from_=from_)
        except Exception as exc:  # noqa: BLE001 - the accepted recipients must be recorded
            log.exception("Clickatell client failed for message %s", message_id)
            return SendOutcome(Kind.TRANSIENT, (), None, client.api, 0.0, None,
                               f"client failed: {type(exc).__name__}")

    def _take(self, attempt: _Attempt, outcome: SendOutcome, chunk: tuple[str, ...]) -> None:
        """Merge one request's outcome into the message's attempt."""
        self._observe(outcome)
        attempt.merge(outcome)
        by_to = {r.to: r for r in outcome.recipients}
        for number in chunk:
            r = by_to.get(msisdn(number))
            if r is None:
                continue
            if r.accepted:
                attempt.updates.append(RecipientUpdate(number, "accepted", r.api_message_id))
            elif r.error_code and classify(r.error_code, None) is Kind.PERMANENT:
                attempt.updates.append(RecipientUpdate(number, "failed", None, r.error_code, r.error))

    def _observe(self, outcome: SendOutcome) -> None:
        m = self._metrics
        m.requests.labels(outcome.api, outcome.kind.value, m.status_code(outcome.http_status)).inc()
        m.request_duration.labels(outcome.api).observe(outcome.duration)
        if outcome.kind is not Kind.OK:
            code = outcome.error_code or ("network" if outcome.http_status is None else "http")
            m.clickatell_errors.labels(m.error_code(code)).inc()
        for r in outcome.recipients:
            if not r.accepted and r.error_code:
                m.clickatell_errors.labels(m.error_code(r.error_code)).inc()
        if outcome.kind is Kind.CONFIG:
            log.error(
                "CLICKATELL REJECTED THE ACCOUNT OR API KEY (%s): pages are held until the key is "
                "fixed and the config reloaded, or until dispatch.max_age",
                _describe(outcome),
            )
        elif outcome.kind is not Kind.OK:
            log.warning("Clickatell request failed: %s", _describe(outcome))

    def _result(self, message: MessageRecord, numbers: tuple[str, ...], attempt: _Attempt,
                snap: Snapshot) -> Result:
        """What to record: each recipient's fate, and when the rest is due again (or dead)."""
        cfg = snap.config.dispatch
        now = self._clock.now()
        done = {u.number for u in attempt.updates}
        left = [n for n in numbers if n not in done]
        updates = list(attempt.updates)
        error, dead, retry_at = attempt.error, False, None
        if left and attempt.kind is Kind.PERMANENT:
            updates += [RecipientUpdate(n, "failed", None, None, attempt.error) for n in left]
        elif left and now - message.created_at >= cfg.max_age:
            dead = True
            error = f"not accepted within {format_duration(cfg.max_age)}: {attempt.error}"
        elif left:
            delay = backoff(message.attempts, cfg.retry_initial, cfg.retry_max, self._rng)
            retry_at = now + max(delay, attempt.retry_after or 0.0)
        return Result(message.id, tuple(updates), now, retry_at, error, dead)

    async def _record(self, message: MessageRecord, result: Result) -> bool:
        """Store an attempt's result, then count and log it. A result the store cannot take is
        kept (and its message not claimed again) until it can; none is kept once the store is
        broken, since the process is then stopping. False: not recorded (yet)."""
        try:
            state = await self._store.finish(result)
        except Exception as exc:  # noqa: BLE001 - not recorded, whatever failed: kept, not resent
            if not isinstance(exc, StoreError):
                log.exception("recording the result of message %s failed", message.id)
            if self._store.broken is None:
                if message.id not in self._unrecorded:
                    log.error("could not record the result of message %s (kept until it can "
                              "be): %s", message.id, exc)
                self._unrecorded[message.id] = (message, result)
            return False
        if self._unrecorded.pop(message.id, None) is not None:
            log.info("result of message %s recorded", message.id)
        self._count(message, result)
        log.info(
            "message %s group=%s attempt=%d state=%s accepted=%d failed=%d%s",
            message.id, message.group_id, message.attempts, state,
            sum(u.state == "accepted" for u in result.updates),
            sum(u.state == "failed" for u in result.updates),
            f" retry_in={result.retry_at - result.at:.1f}s" if result.retry_at else "",
        )
        return True

    def _count(self, message: MessageRecord, result: Result) -> None:
        m, gid = self._metrics, message.group_id
        updates = result.updates
        accepted = sum(u.state == "accepted" for u in updates)
        if accepted:
            m.sms_sent.labels(gid).inc(accepted)
            m.sms_parts.labels(gid).inc(accepted * message.parts)
            if message.accepted_at is None:
                m.delivery_latency.observe(max(0.0, result.at - message.created_at))
        rejected = sum(u.state == "failed" and u.error_code is not None for u in updates)
        permanent = sum(u.state == "failed" and u.error_code is None for u in updates)
        if rejected:
            m.sms_failed.labels(gid, "rejected").inc(rejected)
        if permanent:
            m.sms_failed.labels(gid, "permanent").inc(permanent)
        if result.dead:
            left = len(message.pending_numbers) - len(updates)
            m.sms_failed.labels(gid, "dead").inc(max(left, 0))
            m.dead_letters.labels(gid).inc()
            log.error("DEAD LETTER: message %s to group %s was given up", message.id, gid)
