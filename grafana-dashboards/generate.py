"""Writes sms-receiver.json, the importable dashboard. Run: python grafana-dashboards/generate.py"""

import json
import sys
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
GSEL = 'instance=~"$instance", group=~"$group"'


def target(expr: str, legend: str = "", ref: str = "A") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(pid, title, targets, x, y, w=12, h=8, kind="timeseries", unit="short", description="", **extra):
    p = {
        "id": pid, "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [target(e, lg, chr(65 + i)) for i, (e, lg) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    p.update(extra)
    return p


def stat(pid, title, expr, x, y, unit="short", mappings=None, thresholds=None, w=4, description=""):
    p = panel(pid, title, [(expr, "")], x, y, w=w, h=4, kind="stat", unit=unit, description=description)
    p["fieldConfig"]["defaults"]["mappings"] = mappings or []
    if thresholds:
        p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": thresholds}
    p["options"] = {"colorMode": "background", "reduceOptions": {"calcs": ["lastNotNull"]}}
    return p


def row(pid, title, y, description=""):
    """A (non-collapsed) row: the panels below it, down to the next row, belong to it."""
    return {"id": pid, "type": "row", "title": title, "description": description, "datasource": DS,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "collapsed": False, "panels": [], "targets": []}


RATE = "$__rate_interval"
# Rare events (failures, dead letters, holds, ...) are counts per bar, not per-second rates: an
# increase over the panel's step ($__interval, at least COUNT_STEP so that each window holds two
# scrapes), drawn as bars. An increase over $__rate_interval would count each event in several bars.
IV = "$__interval"
COUNT_STEP = "2m"


def counts(p: dict) -> dict:
    """The panel as counts per interval: bars, a minimum step, and the unit said in the title."""
    p["interval"] = COUNT_STEP
    p["title"] += " (count per interval)"
    p["fieldConfig"]["defaults"].update(unit="short", decimals=0,
                                        custom={"drawStyle": "bars", "fillOpacity": 60, "lineWidth": 1})
    return p


panels = [
    stat(1, "Pending pages", f"sum(sms_receiver_outbox_pending_messages{{{SEL}}})", 0, 0,
         thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 10}, {"color": "red", "value": 100}]),
    stat(2, "Oldest pending", f"max(sms_receiver_outbox_oldest_pending_age_seconds{{{SEL}}})", 4, 0, unit="s",
         thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 60}, {"color": "red", "value": 300}]),
    stat(3, "Dead letters (24h)", f"sum(increase(sms_receiver_dead_letters_total{{{SEL}}}[24h]))", 8, 0,
         thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}]),
    stat(4, "Last reload", f"min(sms_receiver_config_last_reload_successful{{{SEL}}})", 12, 0,
         mappings=[{"type": "value", "options": {"0": {"text": "FAILED", "color": "red"}, "1": {"text": "OK", "color": "green"}}}]),
    stat(5, "Mode", f"max(sms_receiver_dry_run{{{SEL}}})", 16, 0,
         mappings=[{"type": "value", "options": {"0": {"text": "sending", "color": "green"}, "1": {"text": "DRY-RUN", "color": "orange"}}}]),
    stat(6, "Balance", f"min by (account, currency) (sms_receiver_clickatell_balance{{{SEL}}})", 20, 0,
         thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 100}, {"color": "green", "value": 500}]),
    panel(10, "Webhooks by source and outcome",
          [(f"sum by (source, outcome) (rate(sms_receiver_webhooks_received_total{{{SEL}}}[{RATE}]))", "{{source}} {{outcome}}")],
          0, 4, unit="reqps"),
    counts(panel(11, "Alerts received",
          [(f"sum by (source, status) (increase(sms_receiver_alerts_received_total{{{SEL}}}[{IV}]))", "{{source}} {{status}}"),
           (f"sum by (reason) (increase(sms_receiver_alerts_unrouted_total{{{SEL}}}[{IV}]))", "unrouted: {{reason}}")],
          12, 4)),
    counts(panel(12, "SMS by group: sent, failed, deduplicated, throttled",
          [(f"sum by (group) (increase(sms_receiver_sms_sent_total{{{GSEL}}}[{IV}]))", "sent {{group}}"),
           (f"sum by (group, reason) (increase(sms_receiver_sms_failed_total{{{GSEL}}}[{IV}]))", "failed {{group}} ({{reason}})"),
           (f"sum by (group) (increase(sms_receiver_sms_deduplicated_total{{{GSEL}}}[{IV}]))", "deduplicated {{group}}"),
           (f"sum by (group) (increase(sms_receiver_sms_throttled_total{{{GSEL}}}[{IV}]))", "throttled {{group}}")],
          0, 12, w=24)),
    panel(13, "Delivery latency (webhook accepted → Clickatell accepted)",
          [(f"histogram_quantile({q}, sum by (le) (rate(sms_receiver_delivery_latency_seconds_bucket{{{SEL}}}[{RATE}])))", f"p{int(q * 100)}")
           for q in (0.5, 0.9, 0.99)],
          0, 20, unit="s"),
    panel(14, "Clickatell request duration p99",
          [(f"histogram_quantile(0.99, sum by (le, api) (rate(sms_receiver_clickatell_request_duration_seconds_bucket{{{SEL}}}[{RATE}])))", "{{api}}")],
          12, 20, unit="s"),
    panel(15, "Clickatell requests by outcome and HTTP status",
          [(f"sum by (api, outcome, status_code) (rate(sms_receiver_clickatell_requests_total{{{SEL}}}[{RATE}]))", "{{api}} {{outcome}} {{status_code}}")],
          0, 28, unit="reqps"),
    counts(panel(16, "Clickatell errors by code",
          [(f"sum by (code) (increase(sms_receiver_clickatell_errors_total{{{SEL}}}[{IV}])) > 0", "{{code}}")],
          12, 28)),
    panel(17, "Outbox: pending and oldest age",
          [(f"sum(sms_receiver_outbox_pending_messages{{{SEL}}})", "pending"),
           (f"max(sms_receiver_outbox_oldest_pending_age_seconds{{{SEL}}})", "oldest age (s)")],
          0, 36),
    panel(18, "Outbox by state",
          [(f"sum by (state) (sms_receiver_outbox_messages{{{SEL}}})", "{{state}}")], 12, 36),
    counts(panel(19, "Dead letters and template failures",
          [(f"sum by (group) (increase(sms_receiver_dead_letters_total{{{GSEL}}}[{IV}]))", "dead {{group}}"),
           (f"sum by (group) (increase(sms_receiver_template_failures_total{{{GSEL}}}[{IV}]))", "template failed {{group}}")],
          0, 44)),
    counts(panel(20, "Delivery reports by status",
          [(f"sum by (status) (increase(sms_receiver_delivery_reports_total{{{SEL}}}[{IV}]))", "{{status}}")], 12, 44)),
    panel(21, "Clickatell balance",
          [(f"sms_receiver_clickatell_balance{{{SEL}}}", "{{account}} ({{currency}})"),
           (f"sum by (account) (increase(sms_receiver_clickatell_balance_poll_failures_total{{{SEL}}}[{IV}]))", "poll failures per interval {{account}}")],
          0, 52, interval=COUNT_STEP),
    counts(panel(22, "SMS parts sent (billed) by group",
          [(f"sum by (group) (increase(sms_receiver_sms_parts_sent_total{{{GSEL}}}[{IV}]))", "{{group}}")], 12, 52)),
    panel(23, "Config reloads and dispatcher",
          [(f"sms_receiver_config_last_reload_successful{{{SEL}}}", "reload ok {{instance}}"),
           (f"time() - sms_receiver_dispatcher_last_run_timestamp_seconds{{{SEL}}}", "dispatcher idle (s) {{instance}}")],
          0, 60),
    panel(25, "Flood control: held and summaries",
          [(f"sum(sms_receiver_outbox_held_recipients{{{SEL}}})", "held by throttle now"),
           (f"sum by (group, reason) (increase(sms_receiver_messages_held_total{{{GSEL}}}[{IV}]))", "held per interval {{group}} ({{reason}})"),
           (f"sum by (group) (increase(sms_receiver_messages_suppressed_total{{{GSEL}}}[{IV}]))", "suppressed per interval {{group}}"),
           (f"sum by (kind) (increase(sms_receiver_summaries_total{{{SEL}}}[{IV}]))", "summaries per interval: {{kind}}"),
           (f"sum by (kind) (increase(sms_receiver_alerts_collapsed_total{{{SEL}}}[{IV}]))", "collapsed per interval: {{kind}}")],
          0, 68, interval=COUNT_STEP),
    # the mean from the histogram's _sum and _count: histogram_quantile(1, ...) is a bucket bound
    panel(26, "Alerts per summary SMS (p50, mean)",
          [(f"histogram_quantile(0.5, sum by (le, kind) (rate(sms_receiver_summary_alerts_bucket{{{SEL}}}[{RATE}])))", "p50 {{kind}}"),
           (f"sum by (kind) (rate(sms_receiver_summary_alerts_sum{{{SEL}}}[{RATE}]))"
            f" / sum by (kind) (rate(sms_receiver_summary_alerts_count{{{SEL}}}[{RATE}]))", "mean {{kind}}")],
          12, 68),
    panel(24, "Versions", [(f"sms_receiver_build_info{{{SEL}}}", "{{instance}} {{version}} python {{python}}")], 12, 60,
          kind="table"),
]

# Outbox storage: SQLite (one replica) or PostgreSQL (several replicas, one pool each).
backend = stat(28, "Outbox backend", f"count by (backend) (sms_receiver_store_backend{{{SEL}}} == 1)", 0, 77,
               description="The outbox's database and how many instances use it "
                           "(SQLite: one; PostgreSQL: the replicas).")
backend["gridPos"]["h"] = 8
backend["targets"][0]["legendFormat"] = "{{backend}}"
backend["fieldConfig"]["defaults"]["color"] = {"mode": "fixed", "fixedColor": "blue"}
backend["options"] = {"colorMode": "background", "textMode": "value_and_name",
                      "reduceOptions": {"calcs": ["lastNotNull"]}}
panels += [
    row(27, "Outbox storage", 76),
    backend,
    panel(29, "Database connections (PostgreSQL pool)",
          [(f"sum by (instance, state) (sms_receiver_store_connections{{{SEL}}})", "{{instance}} {{state}}")],
          4, 77, w=10, description="Pooled connections in use and idle, per replica (0 on SQLite)."),
    panel(30, "Waiting for a database connection",
          [(f"sum by (instance) (sms_receiver_store_waiting{{{SEL}}})", "{{instance}}")],
          14, 77, w=10, description="Outbox operations waiting for a pooled connection: lasting waits mean "
                                    "the pool is too small or queries are slow (alert SmsReceiverStorePoolSaturated)."),
    counts(panel(31, "Outbox database errors",
          [(f"sum by (instance) (increase(sms_receiver_store_errors_total{{{SEL}}}[{IV}]))", "{{instance}}")],
          0, 85, description="Outbox operations that failed on the database or its connection "
                             "(PostgreSQL down, restarting, unreachable): webhooks get 503 meanwhile.")),
    counts(panel(32, "Claims taken over (possible duplicate SMS)",
          [(f"sum by (instance) (increase(sms_receiver_claims_taken_over_total{{{SEL}}}[{IV}]))", "{{instance}}")],
          12, 85, description="Messages claimed after another claim on them ran out (a replica died or lost the "
                              "database mid-send; SQLite: released at start): each may have been sent twice.")),
]

dashboard = {
    "uid": "sms-receiver",
    "title": "sms-receiver",
    "description": "SMS paging receiver: webhooks, SMS per group, Clickatell, outbox, balance, outbox storage.",
    "tags": ["sms-receiver", "alerting"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
         "query": {"query": "label_values(sms_receiver_build_info, instance)", "refId": "instance"},
         "definition": "label_values(sms_receiver_build_info, instance)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
        {"name": "group", "label": "SMS group", "type": "query", "datasource": DS,
         "query": {"query": "label_values(sms_receiver_sms_sent_total, group)", "refId": "group"},
         "definition": "label_values(sms_receiver_sms_sent_total, group)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}

if __name__ == "__main__":
    # `generate.py [OUT]`: writes sms-receiver.json next to this file unless told otherwise
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("sms-receiver.json")
    out.write_text(json.dumps(dashboard, indent=2) + "\n")
    print(f"wrote {out} ({len(panels)} panels)")
