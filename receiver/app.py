"""The running receiver: one config snapshot, the outbox, the planner, the dispatcher, the
Clickatell client and the metrics, wired together in one process and one event loop. The web
layer and the CLI both talk to a :class:`Receiver`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver import gc_tuning
from receiver.clickatell import ClickatellClient, ClickatellError
from receiver.clock import Clock, SystemClock
from receiver.config import Config, ConfigError, config_warnings, lease_problem, load_config
from receiver.acks import Replies
from receiver.dispatch import Dispatcher
from receiver.logs import RefusalLog
from receiver.escalation import Escalator
from receiver.metrics import Metrics
from receiver.pipeline import Snapshot
from receiver.planner import Planner
from receiver.store import Store, StoreError, open_store

log = logging.getLogger("sms_receiver")

PRUNE_INTERVAL = 300.0  # seconds between retention passes


@dataclass(frozen=True, slots=True)
class Health:
    running: bool  # the dispatcher loop ran recently
    last_run_age: float | None  # seconds since it last ran
    error: str | None  # the dispatcher's and the planner's last errors, each named


class Receiver:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | Path | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config_path = Path(config_path) if config_path else None
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        # Why this receiver can no longer do its job (the store broke, a background task died):
        # set once, shown by /-/healthy; ``on_fatal`` is told, and the CLI exits 1 to be restarted.
        self.fatal: str | None = None
        self.on_fatal: Callable[[str], None] = lambda reason: None
        self.store = store or open_store(
            config.storage, on_broken=lambda reason: self._fail(f"the outbox failed ({reason})"))
        self.metrics.store.usage = self.store.usage
        self._snapshot = Snapshot.build(config)
        self._client = self._new_client(config)
        self._retired: dict[asyncio.Task[None], ClickatellClient] = {}  # replaced by a reload
        self.dispatcher = Dispatcher(
            store=self.store,
            snapshot=lambda: self._snapshot,
            client=lambda: self._client,
            metrics=self.metrics,
            clock=self.clock,
            rng=rng,
        )
        self.answering = 0  # webhooks being answered now (the web layer counts them)
        self.planner = Planner(
            store=self.store,
            snapshot=lambda: self._snapshot,
            metrics=self.metrics,
            planned=self.dispatcher.wake,
            answering=lambda: self.answering > 0,
        )
        # Two-way paging: escalation rounds, and what SMS replies do
        self.escalator = Escalator(store=self.store, snapshot=lambda: self._snapshot, metrics=self.metrics,
                                   clock=self.clock, sent=self.dispatcher.wake)
        self.replies = Replies(store=self.store, snapshot=lambda: self._snapshot, metrics=self.metrics,
                               clock=self.clock, sent=self.dispatcher.wake, escalate=self.escalator.wake)
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self.last_reload_ok = True
        self.last_reload_success: float | None = None
        # Called by reload() with a valid new config before it is used; each returns its errors
        # (none: it applied its part). The CLI's listener re-reads its TLS files here.
        self.reload_hooks: list[Callable[[Config], list[str]]] = []
        self.listen: str | None = None  # run --listen, when it overrides the config's
        self.refusals = RefusalLog(self.clock.monotonic)  # refused requests' log lines, rate-limited

    def _reloaded(self, ok: bool) -> None:
        self.last_reload_ok = ok
        self.metrics.reload_ok.set(int(ok))
        if ok:
            self.last_reload_success = self.clock.now()
            self.metrics.reload_ts.set(self.last_reload_success)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def config(self) -> Config:
        return self._snapshot.config

    def _init_metrics(self, cfg: Config) -> None:
        self.metrics.init_groups((g.id for g in cfg.groups), cfg.level_names)
        self.metrics.init_accounts(self.accounts(cfg))
        self.metrics.dry_run.set(int(cfg.dry_run))

    def _new_client(self, cfg: Config) -> ClickatellClient:
        c = cfg.clickatell
        return ClickatellClient(base_url=c.base_url, api=c.api, timeout=c.timeout,
                                max_connections=cfg.dispatch.concurrency)

    async def start(self, *, dispatch: bool = True, plan: bool = True) -> None:
        """Open the outbox; start the planner, the dispatcher, pruning and balance polls.
        ``dispatch=False`` / ``plan=False``: a test drives that stage itself."""
        await self.store.open()
        cfg = self.config
        self._init_metrics(cfg)
        self._reloaded(True)
        for warning in config_warnings(cfg, self.listen):
            log.warning("%s", warning)
        if plan:
            self._spawn(self.planner.run(), "planner")
        if dispatch:
            self._spawn(self.dispatcher.run(), "dispatcher")
            self._spawn(self.escalator.run(), "escalator")
            self._spawn(self._poll_balances(), "balance")
            self._spawn(self._prune_forever(), "prune")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._ended)
        self._tasks.append(task)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A background task runs until it is cancelled: one that ended otherwise (a bug that
        escaped its own handling) stopped its stage for good, so the process must restart."""
        if task.cancelled():
            return
        exc = task.exception()
        log.critical("the %s stopped: %r", task.get_name(), exc, exc_info=exc)
        self._fail(f"the {task.get_name()} stopped: {exc!r}")

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            self.on_fatal(reason)

    @staticmethod
    def accounts(cfg: Config) -> dict[str, str]:
        """Each distinct API key under a name that is safe to show: "default" for
        ``clickatell.api_key``, else the id of the first group that uses it."""
        out: dict[str, str] = {}
        seen: set[str] = set()
        for name, key in [("default", cfg.clickatell.api_key.get_secret_value())] + [
            (g.id, g.api_key.get_secret_value()) for g in cfg.groups
        ]:
            if key and key not in seen:
                seen.add(key)
                out[name] = key
        return out

    async def poll_balances_once(self) -> None:
        """Read every account's balance into ``sms_receiver_clickatell_balance``."""
        for account, key in self.accounts(self.config).items():
            try:
                balance, currency = await self._client.balance(key)
            except ClickatellError as exc:
                self.metrics.balance_failures.labels(account).inc()
                log.warning("balance poll for account %s failed: %s", account, exc)
            else:
                self.metrics.balance.labels(account, currency or "unknown").set(balance)

    async def _poll_balances(self) -> None:
        while True:
            interval = self.config.clickatell.balance_interval
            if interval > 0:
                await self.poll_balances_once()
            await asyncio.sleep(interval if interval > 0 else 60)

    async def prune_once(self) -> int:
        """Delete what is no longer needed, in chunks: finished messages older than ``retention``,
        dedup keys older than ``dedup_window``, throttle history older than its longest rule."""
        cfg, now = self.config, self.clock.now()
        total, limit = 0, 10_000
        while True:
            n = await self.store.prune(
                now - cfg.retention,
                keys_before=now - cfg.dedup_window,
                sends_before=now - max(self.snapshot.throttle.horizon, 1.0),
                limit=limit,
            )
            total += n
            if n < limit:
                break
            await asyncio.sleep(0)  # let webhooks in between chunks
        if total:
            log.info("pruned %d outbox row(s) past retention", total)
        return total

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self.prune_once()
            except StoreError as exc:
                log.warning("pruning the outbox failed: %s", exc)
            await asyncio.sleep(PRUNE_INTERVAL)

    def health(self) -> Health:
        """How the planner and the dispatcher are doing."""
        last = self.dispatcher.last_run
        age = None if last is None else self.clock.monotonic() - last
        errors = [f"{name}: {error}" for name, error in (("dispatcher", self.dispatcher.last_error),
                                                         ("planner", self.planner.last_error),
                                                         ("escalator", self.escalator.last_error)) if error]
        return Health(
            running=age is not None and age <= max(5.0, 3 * self.config.dispatch.poll_interval),
            last_run_age=age,
            error="; ".join(errors) or None,
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await asyncio.gather(*self._retired)  # the sends that held them are done
        await self._client.aclose()
        await self.store.close()

    async def reload(self) -> list[str]:
        """Re-read the config file; on any error keep the running config and return the errors."""
        async with self._reload_lock:
            if self.config_path is None:
                return ["(file): the receiver was not started from a config file"]
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                self._reloaded(False)
                log.error("config reload failed, keeping the running config:\n  %s",
                          "\n  ".join(exc.errors))
                return exc.errors
            old = self.config
            problem = lease_problem(new, old.storage.kind)  # the storage it runs on, not the file's
            if problem:
                self._reloaded(False)
                log.error("config reload failed, keeping the running config:\n  %s", problem)
                return [problem]
            # the listener re-reads its TLS files (each hook applies the new config or says why not)
            problems = [p for hook in self.reload_hooks for p in hook(new)]
            if problems:
                self._reloaded(False)
                log.error("config reload failed, keeping the running config:\n  %s", "\n  ".join(problems))
                return problems
            for key in ("listen", "storage"):
                if getattr(new, key) != getattr(old, key):
                    log.warning("config reload: %s changed; it takes effect after a restart", key)
            self._snapshot = Snapshot.build(new)
            if (new.clickatell.model_dump(), new.dispatch.concurrency) != (
                    old.clickatell.model_dump(), old.dispatch.concurrency):
                previous, self._client = self._client, self._new_client(new)
                # closed once the sends that hold it are done (a message's requests finish on it)
                task = asyncio.create_task(previous.aclose(), name="retire client")
                self._retired[task] = previous
                task.add_done_callback(lambda t: self._retired.pop(t, None))
            self._init_metrics(new)
            self._reloaded(True)
            gc_tuning.after_reload()
            for warning in config_warnings(new, self.listen):
                log.warning("%s", warning)
            try:  # a fixed key must not wait for the backoff of what it held back
                await self.store.retry_now(self.clock.now())
            except StoreError as exc:
                log.warning("after reload, could not reschedule pending messages: %s", exc)
            self.dispatcher.wake()
            log.info("config reloaded from %s", self.config_path)
            return []
