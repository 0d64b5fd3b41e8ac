from datetime import datetime, timezone

import pytest

from receiver.config import DEFAULT_TEMPLATE
from receiver.ingest import parse_webhook
from receiver.models import GroupDelivery
from receiver.render import Renderer, build_context, fallback_text, template_error
from tests.helpers import fixture, make_config

NOW = datetime(2026, 11, 22, 20, 40, tzinfo=timezone.utc).timestamp()


def context_for(name: str, **kw):
    n = parse_webhook(fixture(name), "alertmanager")
    cfg = make_config()
    d = GroupDelivery("db", kw.get("level", "warning"), n.status, kw.get("alerts", n.alerts))
    return build_context(n, d, cfg.groups_by_id["db"], NOW)


def render(src: str, ctx, max_parts=3):
    return Renderer({"t": src}).render("t", ctx, max_parts)


def test_default_template_on_grouped_fixture():
    r = render(DEFAULT_TEMPLATE, context_for("alertmanager-0.25-grouped-firing.json"))
    assert r.error is None
    assert r.sms.text == ("[WARNING] FIRING 2: DiskFull db-1:9100 Disk / above 90%; "
                          "DiskFull db-2:9100 Disk / above 90%")


def test_context_keys_and_common_labels_recomputed_for_subset():
    n = parse_webhook(fixture("alertmanager-0.25-grouped-firing.json"), "alertmanager")
    ctx = context_for("alertmanager-0.25-grouped-firing.json", alerts=n.alerts[:1])
    assert ctx["common_labels"]["instance"] == "db-1:9100"  # one alert: all its labels are common
    assert ctx["common_annotations"]["description"].startswith("db-1")
    full = context_for("alertmanager-0.25-grouped-firing.json")
    assert "instance" not in full["common_labels"]
    assert full["group"] == {"id": "db", "name": "DB on-call", "level": "warning", "timezone": "UTC"}
    assert full["external_url"] == "http://127.0.0.1:9093"
    assert full["alerts"][0]["ends_at"] is None and full["alerts"][0]["status"] == "firing"
    for key in ("status", "level", "group_labels", "source", "truncated_alerts", "now"):
        assert key in full


def test_send_variables_at_top_level_without_shadowing():
    from receiver.render import send_context

    cfg = make_config()
    ctx = send_context({"name": "Steven", "level": "hijack"}, cfg.groups_by_id["db"], "warning", NOW)
    assert render("Hi {{ name }} {{ level }} {{ variables.level }}", ctx).sms.text == "Hi Steven warning hijack"


def test_filters():
    ctx = context_for("alertmanager-0.25-firing.json")
    src = ("{% set a = alerts[0] %}{{ a.starts_at | hhmm }} {{ a.starts_at | hhmm('Asia/Taipei') }} "
           "{{ a.starts_at | since }} {{ 3725 | duration }} {{ 90061 | duration }} "
           "{{ 'abcdefghij' | sms_truncate(5) }} {{ a.labels | join_labels(['job', 'severity']) }} "
           "{{ a.ends_at | hhmm }}|{{ a.starts_at | short_time('%Y-%m-%d') }}")
    r = render(src, ctx)
    assert r.error is None
    assert r.sms.text == "20:34 UTC 04:34 CST 5m 1h2m 1d1h abcd… job=node severity=critical |2026-11-22"


@pytest.mark.parametrize("src", [
    "{{ 1 / 0 }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the sandbox refuses
    "{{ alerts[0].labels.nope.deeper() }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "   ",
])
def test_runtime_failures_fall_back_and_never_raise(src):
    ctx = context_for("alertmanager-0.25-firing.json", level="critical")
    r = render(src, ctx)
    assert r.error
    assert r.sms.text == "[CRITICAL] FIRING 1: HighLatency web-1:9100 p99 latency above 2s"


def test_missing_label_renders_empty_not_error():
    r = render("x{{ alerts[0].labels.missing }}y", context_for("alertmanager-0.25-firing.json"))
    assert (r.sms.text, r.error) == ("xy", None)


def test_long_text_is_cut_to_max_parts():
    ctx = context_for("alertmanager-0.25-grouped-firing.json")
    r = render("{% for i in range(100) %}{{ alerts[0].annotations.description }} {% endfor %}", ctx, 2)
    assert r.sms.parts == 2 and r.sms.truncated and r.sms.encoding == "UCS-2"


def test_template_error_names_line():
    assert template_error("ok {{ x }}") is None
    assert template_error("line1\n{% if %}") .startswith("template syntax error at line 2")


def test_fallback_text_shapes():
    assert fallback_text({}) == "[ALERT] message for group ?"
    assert fallback_text({"message": "hello"}) == "hello"
    ctx = context_for("alertmanager-0.25-grouped-firing.json")
    ctx["truncated_alerts"] = 3
    assert fallback_text(ctx).startswith("[WARNING] FIRING 2 (+3 not shown): DiskFull db-1:9100")
    assert fallback_text({"alerts": [None]}) == "[ALERT] a notification arrived but could not be rendered"


# -- time zones (#21): times say their zone, in the group's zone by default ---------------------


def context_in(zone: str | None, now: float = NOW):
    n = parse_webhook(fixture("alertmanager-0.25-firing.json"), "alertmanager")
    cfg = make_config()
    d = GroupDelivery("db", "warning", n.status, n.alerts)
    return build_context(n, d, cfg.groups_by_id["db"], now, zone=zone)


@pytest.mark.parametrize("zone, expected", [
    (None, "20:34 UTC"),
    ("UTC", "20:34 UTC"),
    ("Europe/Berlin", "21:34 CET"),  # November: standard time
    ("America/Sao_Paulo", "17:34 UTC-03"),  # a zone without an abbreviation says its offset
])
def test_hhmm_says_the_zone_of_the_group(zone, expected):
    r = render("{{ alerts[0].starts_at | hhmm }}", context_in(zone))
    assert (r.sms.text, r.error) == (expected, None)


def test_hhmm_summer_time_and_explicit_zone_and_zone_false():
    july = datetime(2026, 7, 1, 20, 0, tzinfo=timezone.utc).timestamp()
    ctx = context_in("Europe/Berlin", july)
    src = "{{ now | hhmm }}|{{ now | hhmm('UTC') }}|{{ now | hhmm(zone=false) }}|{{ now | hhmm('Asia/Taipei', false) }}"
    assert render(src, ctx).sms.text == "22:00 CEST|20:00 UTC|22:00|04:00"


def test_short_time_in_group_zone_with_zone_by_default():
    ctx = context_in("Europe/Berlin")
    src = ("{{ alerts[0].starts_at | short_time }}|{{ alerts[0].starts_at | short_time('%H:%M') }}|"
           "{{ alerts[0].starts_at | short_time('%H:%M %Z', 'UTC') }}|{{ now | short_time('100%% %Z') }}")
    assert render(src, ctx).sms.text == "22 Nov 21:34 CET|21:34|20:34 UTC|100% CET"


def test_shipped_config_default_template_says_the_zone():
    """config.yaml's default template is unchanged; its "since" time now says UTC."""
    from pathlib import Path

    import yaml

    shipped = yaml.safe_load((Path(__file__).parent.parent / "config.yaml").read_text())
    r = render(shipped["templates"]["default"], context_in(None))
    assert r.error is None and "since 20:34 UTC" in r.sms.text


def test_pipeline_uses_group_zone_else_config_zone():
    from receiver.pipeline import Snapshot, plan_notification

    base = make_config()
    groups = [dict(g.model_dump(exclude={"api_key"}, exclude_none=True)) for g in base.groups]
    for g in groups:
        g["template"] = "t"
        if g["id"] == "web":
            g["timezone"] = "Asia/Taipei"
    cfg = make_config(groups=groups, timezone="Europe/Berlin",
                      templates={"t": "{{ alerts[0].starts_at | hhmm }} {{ group.timezone }}"})
    n = parse_webhook(fixture("alertmanager-0.25-firing.json"), "alertmanager")  # routed to web
    plan = plan_notification(n, "n1", Snapshot.build(cfg), NOW)
    assert [m.sms.text for m in plan.messages] == ["04:34 CST Asia/Taipei"]
    del groups[1]["timezone"]
    cfg = make_config(groups=groups, timezone="Europe/Berlin", templates=cfg.templates)
    plan = plan_notification(n, "n1", Snapshot.build(cfg), NOW)
    assert [m.sms.text for m in plan.messages] == ["21:34 CET Europe/Berlin"]


def test_timezone_keys_are_validated():
    with pytest.raises(Exception, match="'Mars/Base' is not an IANA time zone"):
        make_config(timezone="Mars/Base")
    groups = [{"id": "db", "members": ["+886911960999"], "timezone": "Nowhere/Land"}]
    with pytest.raises(Exception, match="'Nowhere/Land' is not an IANA time zone"):
        make_config(groups=groups, routes=[], default_groups=[])
