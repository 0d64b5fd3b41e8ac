from datetime import datetime, timezone

import pytest

from receiver.matchers import parse_matcher
from receiver.models import Alert, AlertStatus, Notification
from receiver.routing import alert_level, route
from tests.helpers import make_config


def alert(status: str = "firing", **labels: str) -> Alert:
    return Alert(AlertStatus(status), labels, {}, datetime(2026, 1, 1, tzinfo=timezone.utc), None,
                 fingerprint="f" + "".join(sorted(labels.values())))


def note(*alerts: Alert) -> Notification:
    return Notification(source="alertmanager", alerts=alerts)


@pytest.mark.parametrize("text,labels,expected", [
    ('team="db"', {"team": "db"}, True),
    ('team="db"', {"team": "dba"}, False),
    ("team=db", {"team": "db"}, True),  # unquoted, as Alertmanager >= 0.22 allows
    ('team!="db"', {}, True),
    ('team!=""', {}, False),  # an absent label is the empty string
    ('team!=""', {"team": "x"}, True),
    ('service=~"postgres|mysql"', {"service": "mysql"}, True),
    ('service=~"postgres|mysql"', {"service": "mysql2"}, False),  # anchored
    ('service=~"sql"', {"service": "mysql"}, False),  # anchored: no substring match
    ('service!~"post.*"', {"service": "mysql"}, True),
    ('msg="say \\"hi\\""', {"msg": 'say "hi"'}, True),
    ('x=~".*"', {}, True),
])
def test_matchers(text, labels, expected):
    assert parse_matcher(text).matches(labels) is expected


@pytest.mark.parametrize("bad", ["", "team", '="x"', 'team=~"("', 'team="unterminated', 'a="x\\q"', "1abc=x"])
def test_bad_matchers(bad):
    with pytest.raises(ValueError):
        parse_matcher(bad)


def test_levels_case_insensitive_and_default():
    cfg = make_config()
    assert alert_level(alert(severity="CRITICAL"), cfg) == "critical"
    assert alert_level(alert(severity="p2"), cfg) == "warning"
    assert alert_level(alert(severity="weird"), cfg) == "warning"  # default_level
    assert alert_level(alert(), cfg) == "warning"


def test_first_match_wins_and_continue():
    cfg = make_config()
    # team=db matches the first route and stops there, even though job=node would match later
    r = route(note(alert(team="db", job="node", severity="critical")), cfg)
    assert [d.group_id for d in r.deliveries] == ["db"]
    # Disk* continues: db and web
    r = route(note(alert(alertname="DiskFull", job="node", severity="critical")), cfg)
    assert [d.group_id for d in r.deliveries] == ["db", "web"]


def test_default_groups_and_unrouted():
    r = route(note(alert(alertname="X", severity="info")), make_config())
    assert [d.group_id for d in r.deliveries] == ["info"]
    r = route(note(alert(alertname="X")), make_config(default_groups=[]))
    assert r.deliveries == () and len(r.unrouted) == 1


def test_group_level_filters_less_urgent_alerts():
    cfg = make_config()
    # web takes only critical
    r = route(note(alert(job="node", severity="warning")), cfg)
    assert r.deliveries == () and len(r.filtered) == 1
    r = route(note(alert(job="node", severity="critical")), cfg)
    assert [d.group_id for d in r.deliveries] == ["web"]


def test_each_alert_routed_on_its_own_labels_and_grouped_per_group():
    cfg = make_config()
    n = note(
        alert(team="db", severity="warning", alertname="A"),
        alert(team="db", severity="critical", alertname="B"),
        alert(job="node", severity="critical", alertname="C"),
        alert(job="node", severity="info", alertname="D"),  # web takes critical only
    )
    r = route(n, cfg)
    by_group = {d.group_id: d for d in r.deliveries}
    assert [a.labels["alertname"] for a in by_group["db"].alerts] == ["A", "B"]
    assert by_group["db"].level == "critical"  # the most urgent of its alerts
    assert [a.labels["alertname"] for a in by_group["web"].alerts] == ["C"]
    assert [a.labels["alertname"] for a in r.filtered] == ["D"]


def test_send_resolved_per_group_and_status():
    cfg = make_config()
    r = route(note(alert("resolved", alertname="X", severity="info")), cfg)
    assert r.deliveries == () and len(r.filtered) == 1  # group "info" has send_resolved: false
    r = route(note(alert("resolved", team="db"), alert("firing", team="db", alertname="Y")), cfg)
    assert r.deliveries[0].status is AlertStatus.FIRING
    r = route(note(alert("resolved", team="db")), cfg)
    assert r.deliveries[0].status is AlertStatus.RESOLVED
