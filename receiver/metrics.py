"""The receiver's own Prometheus metrics (prefix ``sms_receiver_``).

Every collector lives on a registry owned by one :class:`Metrics` instance (no process-global
state, so tests can run several receivers). Label sets are bounded — group ids from the config,
fixed outcome and code tables, never a phone number or an alertname — and every known label value
is initialised at start and on reload, so dashboards show 0 rather than "no data".
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from receiver import __version__
from receiver.models import MESSAGE_STATES, NewMessage
from receiver.paging import hold_kind
from receiver.routing import RoutingResult

log = logging.getLogger("sms_receiver")

SOURCES = ("alertmanager", "grafana", "send")
WEBHOOK_OUTCOMES = (
    "accepted", "duplicate", "invalid", "unauthorized", "too_large", "store_error",
)
ALERT_STATUSES = ("firing", "resolved")
CLICKATELL_APIS = ("rest", "http", "one_api")
REQUEST_OUTCOMES = ("ok", "transient", "config", "permanent")
COMMON_HTTP_STATUSES = ("200", "202", "207", "400", "401", "402", "429", "500", "503", "none")
# Error codes worth their own series; anything else is counted as "other".
KNOWN_ERROR_CODES = (
    "001", "007", "100", "101", "105", "106", "108", "113", "114", "121", "122", "123",
    "130", "301", "901", "1", "2", "3", "7", "18", "19", "20", "21", "22", "23", "24", "25",
    "26", "43", "45", "http", "network", "other",
)
FAIL_REASONS = ("rejected", "permanent", "dead")
DELIVERY_STATUSES = ("delivered", "undelivered", "in_progress", "unknown",
                     "invalid", "too_large", "unauthorized")  # the last three: requests refused
REPLY_ACTIONS = ("recorded", "unknown_message",  # two-way paging (receiver.acks):
                 "ack", "unack", "esc", "help", "unknown", "invalid", "unknown_page", "refused",
                 "duplicate", "malformed")
SILENCE_OUTCOMES = ("created", "failed", "none", "expired", "expire_failed")
HTTP_CLOSE_REASONS = ("header_timeout", "body_timeout", "idle_timeout", "limit")

# SMS latencies: a Clickatell request takes 100 ms to a few seconds; a page from webhook to
# Clickatell should take well under a second and must be visible when it takes minutes.
REQUEST_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SUMMARY_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
SUMMARY_KINDS = ("bundle", "digest", "quiet_hours")
HOLD_REASONS = ("digest", "quiet_hours")
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        # process_* (resident memory, open fds, CPU seconds, start time), as every exporter has;
        # on this registry, not the library's global one
        ProcessCollector(registry=self.registry)
        self._children: dict[tuple[Counter, tuple[str, ...]], Any] = {}
        r = self.registry
        p = "sms_receiver_"
        self.webhooks = Counter(
            p + "webhooks_received_total", "Webhook and /send requests by source and outcome.",
            ["source", "outcome"], registry=r,
        )
        self.alerts = Counter(
            p + "alerts_received_total", "Alerts received, by source and status.",
            ["source", "status"], registry=r,
        )
        self.alerts_unrouted = Counter(
            p + "alerts_unrouted_total",
            "Alerts that matched no route and no default group, or that no matched group takes.",
            ["source", "reason"], registry=r,
        )
        self.routed = Counter(
            p + "notifications_routed_total", "Group messages created from notifications.",
            ["group", "level"], registry=r,
        )
        self.template_failures = Counter(
            p + "template_failures_total",
            "Template renderings that failed and fell back to the plain text.",
            ["group"], registry=r,
        )
        self.sms_sent = Counter(
            p + "sms_sent_total", "SMS accepted by Clickatell, one per recipient.", ["group"], registry=r,
        )
        self.sms_parts = Counter(
            p + "sms_parts_sent_total", "SMS parts accepted by Clickatell (what is billed).",
            ["group"], registry=r,
        )
        self.sms_failed = Counter(
            p + "sms_failed_total", "SMS that will not be sent, one per recipient, by reason.",
            ["group", "reason"], registry=r,
        )
        self.sms_deduplicated = Counter(
            p + "sms_deduplicated_total",
            "Group messages not created because their notification was a replay.",
            ["group"], registry=r,
        )
        self.sms_throttled = Counter(
            p + "sms_throttled_total", "SMS to one number held back by the per-number throttle (they go out in a bundle).", ["group"], registry=r,
        )
        self.held = Counter(
            p + "messages_held_total",
            "Group messages held at accept, to go out in one summary later, by reason.",
            ["group", "reason"], registry=r,
        )
        self.suppressed = Counter(
            p + "messages_suppressed_total",
            "Group messages recorded but never sent (their level's delivery is none).",
            ["group"], registry=r,
        )
        self.summaries = Counter(
            p + "summaries_total",
            "Summary SMS made from held messages: bundle (throttle, per number), digest, "
            "quiet_hours (per group).", ["kind"], registry=r,
        )
        self.summary_size = Histogram(
            p + "summary_alerts", "Alerts a summary SMS accounts for (named or counted).",
            ["kind"], buckets=SUMMARY_BUCKETS, registry=r,
        )
        self.collapsed = Counter(
            p + "alerts_collapsed_total",
            "Held alerts that fired and resolved before they went out: one line, or nothing.",
            ["kind"], registry=r,
        )
        self.held_recipients = Gauge(
            p + "outbox_held_recipients", "Recipients of messages held by the throttle right now.",
            registry=r,
        )
        self.sms_dry_run = Counter(
            p + "sms_dry_run_total", "SMS recorded but not sent because no API key is set.",
            ["group"], registry=r,
        )
        self.dead_letters = Counter(
            p + "dead_letters_total",
            "Messages given up after dispatch.max_age without being accepted.",
            ["group"], registry=r,
        )
        self.requests = Counter(
            p + "clickatell_requests_total", "Requests to Clickatell by API, outcome and HTTP status.",
            ["api", "outcome", "status_code"], registry=r,
        )
        self.clickatell_errors = Counter(
            p + "clickatell_errors_total",
            "Errors reported by Clickatell (global or per recipient) by code.",
            ["code"], registry=r,
        )
        self.request_duration = Histogram(
            p + "clickatell_request_duration_seconds", "Duration of requests to Clickatell.",
            ["api"], buckets=REQUEST_BUCKETS, registry=r,
        )
        self.delivery_latency = Histogram(
            p + "delivery_latency_seconds",
            "Time from the webhook being accepted to Clickatell accepting the SMS.",
            buckets=DELIVERY_BUCKETS, registry=r,
        )
        self.outbox_pending = Gauge(
            p + "outbox_pending_messages", "Messages waiting to be sent (pending or in flight).",
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            p + "outbox_oldest_pending_age_seconds", "Age of the oldest message waiting to be sent.",
            registry=r,
        )
        self.outbox_messages = Gauge(
            p + "outbox_messages", "Messages in the outbox by state.", ["state"], registry=r,
        )
        self.delivery_reports = Counter(
            p + "delivery_reports_total", "Clickatell delivery reports by status.",
            ["status"], registry=r,
        )
        self.replies = Counter(
            p + "replies_total", "Inbound SMS replies by action taken.", ["action"], registry=r,
        )
        self.acks = Counter(p + "acks_total", "Pages acknowledged by SMS reply, by paged group.",
                            ["group"], registry=r)
        self.escalations = Counter(p + "escalations_total", "Escalation rounds sent, by paged group.",
                                   ["group"], registry=r)
        self.ack_seconds = Histogram(p + "ack_seconds", "Time from a page to its acknowledgement.",
                                     buckets=(30, 60, 120, 300, 600, 900, 1800, 3600, 7200), registry=r)
        self.silences = Counter(p + "silences_total", "Alertmanager silences made or expired by SMS replies, "
                                "by outcome (none: no Alertmanager configured for the page).",
                                ["outcome"], registry=r)
        for outcome in SILENCE_OUTCOMES:
            self.silences.labels(outcome)
        self.balance = Gauge(
            p + "clickatell_balance", "Clickatell account balance, by account and currency.",
            ["account", "currency"], registry=r,
        )
        self.balance_failures = Counter(
            p + "clickatell_balance_poll_failures_total", "Balance polls that failed.",
            ["account"], registry=r,
        )
        self.reload_ok = Gauge(
            p + "config_last_reload_successful", "Whether the last configuration reload succeeded.",
            registry=r,
        )
        self.reload_ts = Gauge(
            p + "config_last_reload_success_timestamp_seconds",
            "Timestamp of the last successful configuration reload.", registry=r,
        )
        self.dry_run = Gauge(
            p + "dry_run", "1 when no Clickatell API key is configured and nothing is sent.",
            registry=r,
        )
        self.planning_failures = Counter(
            p + "planning_failures_total",
            "Received notifications that could not be turned into messages (kept, with their error).",
            registry=r,
        )
        self.unplanned = Gauge(
            p + "notifications_unplanned",
            "Notifications received (answered 2xx) and not yet turned into messages.", registry=r,
        )
        self.planning_failed = Gauge(
            p + "notifications_planning_failed",
            "Notifications received that could not be turned into messages (a bug): kept, with "
            "their error, and tried again at the next start.", registry=r,
        )
        self.dispatcher_last_run = Gauge(
            p + "dispatcher_last_run_timestamp_seconds", "When the dispatcher loop last ran.",
            registry=r,
        )
        self.http_closed = Counter(
            p + "http_connections_closed_total",
            "HTTP connections the listener closed: a phase timed out (header_timeout, body_timeout, "
            "idle_timeout) or server.max_connections was reached (limit).", ["reason"], registry=r,
        )
        for reason in HTTP_CLOSE_REASONS:
            self.http_closed.labels(reason)
        self.http_connections = Gauge(
            p + "http_connections", "HTTP connections open on the listener.", registry=r,
        )
        self.store = _StoreCollector()
        r.register(self.store)
        self.build = Info(p + "build", "Build information.", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version()})
        self._init_static()

    def child(self, counter: Counter, *labels: str) -> Any:
        """``counter.labels(*labels)``, memoised: the answer path counts every webhook, and
        ``labels()`` takes a lock and checks its arguments each time (3x the cost of ``inc``).
        Label values are bounded (sources, outcomes, configured groups and levels)."""
        key = (counter, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = counter.labels(*labels)
        return found

    def _init_static(self) -> None:
        for source in SOURCES:
            for outcome in WEBHOOK_OUTCOMES:
                self.webhooks.labels(source, outcome)
            for status in ALERT_STATUSES:
                self.alerts.labels(source, status)
            for reason in ("no_route", "filtered"):
                self.alerts_unrouted.labels(source, reason)
        for api in CLICKATELL_APIS:
            self.request_duration.labels(api)
            for outcome in REQUEST_OUTCOMES:
                self.requests.labels(api, outcome, "202" if outcome == "ok" else "none")
        for code in KNOWN_ERROR_CODES:
            self.clickatell_errors.labels(code)
        for status in DELIVERY_STATUSES:
            self.delivery_reports.labels(status)
        for action in REPLY_ACTIONS:
            self.replies.labels(action)
        for state in MESSAGE_STATES:
            self.outbox_messages.labels(state)
        for kind in SUMMARY_KINDS:
            self.summaries.labels(kind)
            self.summary_size.labels(kind)
            self.collapsed.labels(kind)

    def init_groups(self, group_ids: Iterable[str], level_names: Iterable[str]) -> None:
        """Create the zero series of every configured group (at start and after a reload)."""
        levels = tuple(level_names)
        for gid in group_ids:
            for level in levels:
                self.routed.labels(gid, level)
            for c in (self.template_failures, self.sms_sent, self.sms_parts, self.sms_deduplicated,
                      self.sms_throttled, self.sms_dry_run, self.dead_letters, self.suppressed):
                c.labels(gid)
            for reason in HOLD_REASONS:
                self.held.labels(gid, reason)
            self.acks.labels(gid)
            self.escalations.labels(gid)
            for reason in FAIL_REASONS:
                self.sms_failed.labels(gid, reason)

    def count_replay(self, routing: RoutingResult) -> None:
        """A replayed notification: count the message each of its groups did not get again."""
        for d in routing.deliveries:
            self.child(self.sms_deduplicated, d.group_id).inc()

    def count_planned(self, messages: Iterable[NewMessage]) -> None:
        """Count each new message (routed to its group and level) and what planning decided
        for it: held, suppressed, template failed."""
        for msg in messages:
            self.child(self.routed, msg.group_id, msg.level).inc()
            if msg.suppressed:
                self.suppressed.labels(msg.group_id).inc()
            elif msg.hold_reason:
                self.held.labels(msg.group_id, hold_kind(msg.hold_reason)).inc()
            if msg.template_error:
                self.template_failures.labels(msg.group_id).inc()
                log.warning("template of group %s failed, fallback text used: %s",
                            msg.group_id, msg.template_error)

    def init_accounts(self, accounts: Iterable[str]) -> None:
        for account in accounts:
            self.balance_failures.labels(account)

    def error_code(self, code: str | None) -> str:
        """The bounded label value for a Clickatell error code."""
        return code if code in KNOWN_ERROR_CODES else "other"

    def status_code(self, status: int | None) -> str:
        return "none" if status is None else str(status) if 100 <= status <= 599 else "other"


class _StoreCollector(Collector):
    """The outbox's connections and claims, read from the store at each scrape (its own
    counters: the store keeps them as plain numbers, and a scrape reads them whole)."""

    def __init__(self) -> None:
        self.usage: Callable[[], Any] | None = None  # the store's usage(), once it exists

    def collect(self) -> Iterator[Metric]:
        u = self.usage() if self.usage is not None else None
        p = "sms_receiver_store_"
        info = GaugeMetricFamily(p + "backend", "The outbox's backend (1 for the one in use).",
                                 labels=["backend"])
        for backend in ("sqlite", "postgresql"):
            info.add_metric([backend], float(u is not None and u.backend == backend))
        yield info
        conns = GaugeMetricFamily(p + "connections", "Database connections of the outbox's pool "
                                  "(PostgreSQL), by state.", labels=["state"])
        conns.add_metric(["in_use"], u.connections_in_use if u else 0)
        conns.add_metric(["idle"], u.connections_idle if u else 0)
        yield conns
        yield GaugeMetricFamily(p + "waiting", "Operations waiting for a pooled database connection.",
                                value=u.waiting if u else 0)
        yield CounterMetricFamily(p + "errors", "Outbox operations that failed on the database or its "
                                  "connection (PostgreSQL: down, restarting, unreachable).",
                                  value=u.errors if u else 0)
        yield CounterMetricFamily("sms_receiver_claims_taken_over", "Messages this process claimed "
                                  "after another claim on them ran out (a replica died or lost the "
                                  "database; SQLite: claims released at start): sent again.",
                                  value=u.claims_taken_over if u else 0)
