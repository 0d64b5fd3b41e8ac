"""The running receiver: one config snapshot, the outbox, the planner, the dispatcher, the
Clickatell client and the metrics, wired together in one process and one event loop. The web
layer and the CLI both talk to a :class:`Receiver`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from receiver import gc_tuning
from receiver.clickatell import ClickatellClient, ClickatellError
from receiver.clock import Clock, SystemClock
from receiver.config import Config, ConfigError, config_warnings, load_config
from receiver.dispatch import Dispatcher
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
    error: str | None  # the planner's or dispatcher's last store error


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
        # called once if the store breaks (an I/O fault): the process must stop and be restarted
        self.on_broken: Callable[[str], None] = lambda reason: None
        self.store = store or open_store(config.storage, on_broken=lambda reason: self.on_broken(reason))
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
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        self.last_reload_ok = True
        self.last_reload_success: float | None = None

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
        for warning in config_warnings(cfg):
            log.warning("%s", warning)
        if plan:
            self._tasks.append(asyncio.create_task(self.planner.run(), name="planner"))
        if dispatch:
            self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="dispatcher"))
            self._tasks.append(asyncio.create_task(self._poll_balances(), name="balance"))
            self._tasks.append(asyncio.create_task(self._prune_forever(), name="prune"))

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
        return Health(
            running=age is not None and age <= max(5.0, 3 * self.config.dispatch.poll_interval),
            last_run_age=age,
            error=self.dispatcher.last_error or self.planner.last_error,
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for task, client in list(self._retired.items()):
            task.cancel()
            await client.aclose()
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
            for key in ("listen", "storage"):
                if getattr(new, key) != getattr(old, key):
                    log.warning("config reload: %s changed; it takes effect after a restart", key)
            self._snapshot = Snapshot.build(new)
            if (new.clickatell.model_dump(), new.dispatch.concurrency) != (
                    old.clickatell.model_dump(), old.dispatch.concurrency):
                previous, self._client = self._client, self._new_client(new)

                async def retire() -> None:  # requests in flight on the old client finish first
                    await asyncio.sleep(old.clickatell.timeout + 1)
                    await previous.aclose()

                task = asyncio.create_task(retire(), name="retire client")
                self._retired[task] = previous
                task.add_done_callback(lambda t: self._retired.pop(t, None))
            self._init_metrics(new)
            self._reloaded(True)
            gc_tuning.after_reload()
            for warning in config_warnings(new):
                log.warning("%s", warning)
            try:  # a fixed key must not wait for the backoff of what it held back
                await self.store.retry_now(self.clock.now())
            except StoreError as exc:
                log.warning("after reload, could not reschedule pending messages: %s", exc)
            self.dispatcher.wake()
            log.info("config reloaded from %s", self.config_path)
            return []
