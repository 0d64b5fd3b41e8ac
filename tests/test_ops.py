"""What an SRE runs the receiver with: metrics, dashboard, rules, deploy files, logs, reload."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from receiver.logs import JsonFormatter
from tests.conftest import eventually
from tests.helpers import BASE, fixture
from tests.tools import ReceiverProcess, free_port, need

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = ROOT / "grafana-dashboards" / "sms-receiver.json"


async def test_every_dashboard_metric_exists_in_live_metrics(start_receiver, fake, http):
    rx = await start_receiver(clickatell={"balance_interval": "50ms"})
    async with http.post(f"{rx.url}/webhook/alertmanager", data=fixture("alertmanager-0.25-firing.json"),
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200

    async def live() -> str:
        async with http.get(f"{rx.url}/metrics") as r:
            return await r.text()

    async def sent_and_polled() -> bool:
        text = await live()
        return 'sms_receiver_sms_sent_total{group="web"} 1.0' in text and "sms_receiver_clickatell_balance{" in text

    await eventually(sent_and_polled)
    exposed = {line.split("{")[0].split(" ")[0] for line in (await live()).splitlines()
               if line.startswith("sms_receiver_")}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queried = {m for e in exprs for m in re.findall(r"sms_receiver_[a-z_]+", e)}
    assert len(queried) >= 20
    missing = sorted(m for m in queried if m not in exposed)
    assert missing == [], f"dashboard queries metrics the receiver does not expose: {missing}"
    # the outbox's storage (SQLite or the PostgreSQL pool) has its own row
    store = {m for m in exposed if m.startswith("sms_receiver_store_")} | {"sms_receiver_claims_taken_over_total"}
    assert store <= queried, f"outbox storage metrics not on the dashboard: {sorted(store - queried)}"
    # the datasource is a variable, so the dashboard imports anywhere
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])


def test_dashboard_json_is_what_the_generator_writes(tmp_path: Path):
    fresh = tmp_path / "sms-receiver.json"
    r = subprocess.run([sys.executable, str(ROOT / "grafana-dashboards" / "generate.py"), str(fresh)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert fresh.read_text() == DASHBOARD.read_text()  # the committed file is the generator's


async def test_metric_names_follow_conventions(start_receiver, http):
    rx = await start_receiver()
    async with http.get(f"{rx.url}/metrics") as r:
        text = await r.text()
    types = dict(re.findall(r"^# TYPE (sms_receiver_\S+) (\S+)$", text, re.M))
    for name, kind in types.items():
        if name.endswith("_created"):
            continue  # prometheus-client's creation-time twins (the CLI turns them off)
        if kind == "counter":
            assert not name.endswith("_total_total")
        if "seconds" in name or "duration" in name or "latency" in name:
            assert name.endswith(("_seconds", "_seconds_total")), name
    # bounded labels: no phone number, no alertname anywhere
    assert "+886" not in text and "886911960999" not in text and "alertname" not in text
    assert "sms_receiver_build_info{" in text


def test_promtool_rules_and_unit_tests():
    promtool = need("promtool")
    rules = DEPLOY / "prometheus" / "sms-receiver-rules.yml"
    for args in (["check", "rules", str(rules)],
                 ["test", "rules", str(DEPLOY / "prometheus" / "sms-receiver-rules.test.yml")],
                 ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    # the Kubernetes PrometheusRule carries exactly the same rules
    k8s = yaml.safe_load((DEPLOY / "kubernetes" / "prometheusrule.yaml").read_text())
    assert k8s["spec"] == yaml.safe_load(rules.read_text())
    names = {r["alert"] for g in k8s["spec"]["groups"] for r in g["rules"]}
    assert {"SmsReceiverDown", "SmsReceiverWebhooksFailing", "SmsReceiverSmsFailing",
            "SmsReceiverOutboxBacklog", "SmsReceiverDeadLetters", "SmsReceiverBalanceLow",
            "SmsReceiverConfigReloadFailed", "SmsReceiverStoreErrors", "SmsReceiverStorePoolSaturated",
            "SmsReceiverClaimsTakenOver", "SmsReceiverPlanningFailed", "SmsReceiverPlanningStalled",
            "SmsReceiverOutboxStuck"} <= names


def test_amtool_checks_the_alertmanager_example():
    amtool = need("amtool")
    r = subprocess.run([amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    hook = cfg["receivers"][1]["webhook_configs"][0]
    assert hook["url"].endswith("/webhook/alertmanager")
    assert hook["http_config"]["authorization"]["type"] == "Bearer"


def test_deploy_files_are_complete_and_configs_valid(tmp_path: Path):
    kinds = {}
    for f in (DEPLOY / "kubernetes").glob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and "kind" in doc:
                kinds[doc["kind"]] = doc
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceMonitor",
            "PodDisruptionBudget", "PrometheusRule"} <= set(kinds)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    # every config under deploy/ passes check-config with the secrets its deployment gives it:
    # tests/test_deploy.py::test_every_deploy_config_passes_check_config_with_its_secrets
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    assert {"sms-receiver", "fake-clickatell", "alertmanager", "prometheus", "grafana"} <= set(compose["services"])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile and "VOLUME" in dockerfile
    assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]  # pyproject's
    assert "data/" in (ROOT / ".gitignore").read_text().splitlines()  # the default storage directory
    contact = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "alerting" / "sms-receiver-contact-point.yml").read_text())
    assert contact["contactPoints"][0]["receivers"][0]["settings"]["url"].endswith("/webhook/grafana")
    unit = (DEPLOY / "systemd" / "sms-receiver.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_json_logs_and_masked_numbers(caplog):
    from receiver.logs import RedactKeys
    from receiver.phone import mask

    leak = logging.makeLogRecord({"msg": "GET /messages/http/send?apiKey=%s&to=1", "args": ("k%3D%3D",)})
    RedactKeys().filter(leak)
    assert leak.getMessage() == "GET /messages/http/send?apiKey=REDACTED&to=1"

    assert mask("+886911960999") == "+********0999"
    record = logging.makeLogRecord({"name": "x", "levelname": "INFO", "msg": "sent to %s", "args": (mask("+886911960999"),)})
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "sent to +********0999" and line["level"] == "info"


async def test_logs_never_hold_secrets_or_full_numbers(start_receiver, fake, http, caplog):
    caplog.set_level(logging.DEBUG)
    rx = await start_receiver(clickatell={"api": "http", "balance_interval": "50ms"},
                              webhook_auth={"bearer_tokens": ["hook-secret"]})
    async with http.post(f"{rx.url}/webhook/alertmanager", data=fixture("alertmanager-0.25-grouped-firing.json"),
                         headers={"Authorization": "Bearer hook-secret", "Content-Type": "application/json"}) as r:
        assert r.status == 200

    def ours() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("sms_receiver")]

    async def sent_and_logged():  # the fake has both SMS before the dispatcher logs its result
        return len(await fake.messages(http)) == 2 and any(
            line.startswith("message ") and "state=sent" in line for line in ours())

    await eventually(sent_and_logged)
    text = "\n".join(ours())
    key = rx.receiver.config.clickatell.api_key.get_secret_value()
    assert key not in text and key.replace("=", "%3D") not in text and "hook-secret" not in text
    assert "886911960999" not in text
    assert "webhook source=alertmanager outcome=accepted" in text


async def test_balance_poll_failure_is_counted_not_fatal(start_receiver, fake, http):
    fake.state.api_keys = {"other-key": "rest"}  # our key is now refused
    rx = await start_receiver(clickatell={"balance_interval": "50ms"})

    async def counted():
        async with http.get(f"{rx.url}/metrics") as r:
            text = await r.text()
        m = re.search(r'sms_receiver_clickatell_balance_poll_failures_total\{account="default"\} (\S+)', text)
        return m is not None and float(m.group(1)) >= 2

    await eventually(counted)
    async with http.get(f"{rx.url}/-/healthy") as r:
        assert r.status == 200


async def test_sighup_reloads_and_bad_file_keeps_running(tmp_path: Path, http):
    config = tmp_path / "config.yaml"
    base = {**BASE, "storage": f"sqlite://{tmp_path}/outbox.db"}
    config.write_text(yaml.safe_dump(base))
    proc = ReceiverProcess(config, free_port(), tmp_path / "receiver.log")
    try:
        await proc.start(http)

        async def groups() -> list[str]:
            async with http.get(f"{proc.url}/api/v1/groups") as r:
                return [g["id"] for g in (await r.json())["groups"]]

        config.write_text(yaml.safe_dump({**base, "groups": [*BASE["groups"], {"id": "added", "members": ["+886911960999"]}]}))
        proc.proc.send_signal(signal.SIGHUP)

        async def has_added():
            return "added" in await groups()

        await eventually(has_added)
        config.write_text("groups: [[[")
        proc.proc.send_signal(signal.SIGHUP)

        async def reload_failed():
            async with http.get(f"{proc.url}/metrics") as r:
                return "sms_receiver_config_last_reload_successful 0.0" in await r.text()

        await eventually(reload_failed)
        assert "added" in await groups()  # still serving the last good config
        assert "config reload failed" in proc.log.read_text()
    finally:
        proc.stop()


async def test_a_running_receivers_log_holds_no_key_number_or_token(tmp_path: Path, fake, http):
    """The real process's log, libraries included (httpx logs every request URL at INFO, and the
    HTTP API's URLs carry the key, the number and the text)."""
    config = tmp_path / "receiver.yaml"
    config.write_text(yaml.safe_dump({
        **BASE, "storage": f"sqlite://{tmp_path}/outbox.db",
        "clickatell": {"api": "http", "api_key": "lPe91jCqTwGbErZ6OFeXjQ==", "base_url": fake.url},
        "webhook_auth": {"bearer_tokens": ["hook-secret"]},
    }))
    proc = ReceiverProcess(config, free_port(), tmp_path / "receiver.log")
    try:
        await proc.start(http)
        async with http.post(f"{proc.url}/webhook/alertmanager", data=fixture("alertmanager-0.25-firing.json"),
                             headers={"Authorization": "Bearer hook-secret", "Content-Type": "application/json"}) as r:
            assert r.status == 200

        async def logged_sent() -> bool:
            return "state=sent" in proc.log.read_text()

        await eventually(logged_sent, timeout=10)
    finally:
        proc.stop()
    text = proc.log.read_text()
    assert len(fake.state.messages) == 1 and fake.state.messages[0]["to"] == "14155550123"
    for secret in ("14155550123", "lPe91jCqTwGbErZ6OFeXjQ", "hook-secret"):
        assert secret not in text, secret


async def test_process_metrics_are_exposed(start_receiver, http):
    """process_* as every Prometheus exporter has them, on the receiver's own registry."""
    rx = await start_receiver()
    async with http.get(f"{rx.url}/metrics") as r:
        text = await r.text()
    values = dict(re.findall(r"^(process_[a-z_]+) (\S+)$", text, re.M))
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total",
                 "process_start_time_seconds", "process_max_fds", "process_virtual_memory_bytes"):
        assert name in values, f"{name} missing from /metrics"
    assert float(values["process_resident_memory_bytes"]) > 0
    assert float(values["process_open_fds"]) > 0


async def test_dropped_alerts_are_logged_with_group_and_reason(start_receiver, http, caplog):
    """An alert every matched group excludes (its level, send_resolved) is named in one info line
    per notification, with the group and the rule that dropped it."""
    caplog.set_level(logging.INFO, logger="sms_receiver")
    rx = await start_receiver()
    body = json.loads(fixture("alertmanager-0.25-firing.json"))
    firing = dict(body["alerts"][0], labels={"alertname": "SlowWeb", "job": "node", "severity": "warning"})
    resolved = dict(body["alerts"][0], status="resolved",
                    labels={"alertname": "InfoGone", "severity": "info"})  # default group "info"
    body.update(alerts=[firing, resolved], status="firing", groupKey='{}:{alertname="SlowWeb"}')
    async with http.post(f"{rx.url}/webhook/alertmanager", json=body) as r:
        assert r.status == 200, await r.text()

    def dropped() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "sms_receiver.planner" and "dropped" in r.getMessage()]

    async def logged() -> bool:
        return bool(dropped())

    await eventually(logged)
    (record,) = dropped()  # once per notification
    assert record.levelno == logging.INFO
    msg = record.getMessage()
    assert "SlowWeb (firing; web: level warning is below the group's critical)" in msg
    assert "InfoGone (resolved; info: resolved, and the group has send_resolved off)" in msg


def test_dashboard_shows_rare_events_as_counts_and_no_bucket_bound_as_a_max():
    """histogram_quantile(1, …) is the upper bound of a bucket, not the max; a per-second rate of
    a rare event with unit "short" reads as 0.004: counts per interval instead, each event in
    one bar (an increase over $__rate_interval counts it in several overlapping bars)."""
    dashboard = json.loads(DASHBOARD.read_text())
    rate_units = {"reqps", "ops", "cps", "wps", "rps"}
    for p in dashboard["panels"]:
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        for t in p["targets"]:
            expr = t["expr"]
            assert "histogram_quantile(1," not in expr.replace(" ", ""), (p["title"], expr)
            assert not re.search(r"increase\([^\[]*\[\$__rate_interval\]", expr), (p["title"], expr)
            if "increase(" in expr and "$__interval" in expr:
                assert p.get("interval"), f"{p['title']}: counts per interval need a minimum step"
            ratio = " / " in expr or expr.startswith("histogram_quantile(")  # no longer per second
            if "rate(" in expr and not ratio:
                assert unit in rate_units, f"{p['title']}: a per-second rate shown with unit {unit!r}"
    titles = [p["title"] for p in dashboard["panels"]]
    assert "Alerts per summary SMS (p50, mean)" in titles
