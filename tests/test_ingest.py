import json
import pytest

from receiver.callbacks import parse_form, parse_status_callback
from receiver.ingest import InvalidPayload, SendItem, dedup_key, parse_send, parse_webhook, validate_webhook
from receiver.models import AlertStatus
from tests.helpers import fixture


def test_alertmanager_fixture():
    n = parse_webhook(fixture("alertmanager-0.25-firing.json"), "alertmanager")
    a = n.alerts[0]
    assert n.group_key == '{}:{alertname="HighLatency"}'
    assert a.status is AlertStatus.FIRING
    assert a.ends_at is None  # Go zero time
    assert a.starts_at.isoformat() == "2026-11-22T20:34:59.493714+00:00"  # nanoseconds accepted
    assert a.fingerprint == "c626d2275ab0f610"


def test_resolved_fixture_status_from_alert_not_ends_at():
    n = parse_webhook(fixture("alertmanager-0.25-resolved.json"), "alertmanager")
    assert [a.status for a in n.alerts] == [AlertStatus.RESOLVED] * 2
    assert n.alerts[0].ends_at is not None


def test_status_never_inferred_from_ends_at():
    body = json.loads(fixture("alertmanager-0.25-firing.json"))
    body["alerts"][0]["endsAt"] = "2099-01-01T00:00:00Z"  # old senders put a future time there
    assert parse_webhook(json.dumps(body).encode(), "alertmanager").alerts[0].status is AlertStatus.FIRING


def test_old_sender_without_fingerprint_and_truncated_and_unknown_keys():
    body = json.loads(fixture("alertmanager-0.25-firing.json"))
    del body["alerts"][0]["fingerprint"], body["truncatedAlerts"]
    body["notification_reason"] = "new"
    body["routeLabels"] = {"x": "y"}
    n = parse_webhook(json.dumps(body).encode(), "alertmanager")
    assert len(n.alerts[0].fingerprint) == 16
    assert n.truncated_alerts == 0


def test_grafana_fixture():
    n = parse_webhook(fixture("grafana-webhook-firing.json"), "grafana")
    assert n.title == "[FIRING:2]  (blue)"
    assert n.alerts[0].values == {"B": 44.23943737541908, "C": 1}
    assert n.alerts[0].silence_url.startswith("https://play.grafana.org/alerting/silence")


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[]", 422, "JSON object"),
    (b'{"alerts": []}', 422, "alerts"),
    (b'{"alerts": [{"status": "burning", "labels": {}}]}', 422, "alerts.0.status"),
    (b'{"alerts": [{"status": "firing", "labels": {"a": 1}}]}', 422, "alerts.0.labels.a"),
    (b'{"alerts": [{"status": "firing"}]}', 422, "alerts.0.labels: required"),
    (b'{"alerts": "x"}', 422, "alerts"),
    (b'{"alerts": [{"status": "firing", "labels": {"ok": "1", "bad": null}}]}', 422, "alerts.0.labels.bad:"),
    (b'{"alerts": [{"status": "firing", "labels": {}, "startsAt": "yesterday"}]}', 422,
     "alerts.0.startsAt: not an RFC 3339 time"),
    (b'{"alerts": [{"status": "firing", "labels": {}}], "truncatedAlerts": -1}', 422, "truncatedAlerts"),
])
def test_bad_inputs_name_the_problem(body, status, needle):
    with pytest.raises(InvalidPayload) as info:
        parse_webhook(body, "alertmanager")
    assert info.value.status == status
    assert needle in info.value.reason


def test_grafana_nulls_read_as_empty():
    body = json.loads(fixture("grafana-webhook-firing.json"))
    body.update(groupLabels=None, commonLabels=None, commonAnnotations=None)
    body["alerts"][0].update(silenceURL=None, dashboardURL=None, panelURL=None, imageURL=None,
                             generatorURL=None, annotations=None, values=None)
    n = parse_webhook(json.dumps(body).encode(), "grafana")
    a = n.alerts[0]
    assert (n.group_labels, n.common_labels, a.annotations, a.values) == ({}, {}, {}, None)
    assert (a.silence_url, a.dashboard_url, a.panel_url, a.image_url, a.generator_url) == ("",) * 5


def test_legacy_grafana_is_named():
    body = json.dumps({"title": "x", "ruleId": 1, "ruleName": "r", "state": "alerting",
                       "evalMatches": [], "message": "m"}).encode()
    with pytest.raises(InvalidPayload) as info:
        parse_webhook(body, "grafana")
    assert "legacy Grafana" in info.value.reason


def test_dedup_key_identity():
    def key(body: bytes, source: str = "alertmanager") -> str:
        return dedup_key(validate_webhook(body, source), source)

    a = key(fixture("alertmanager-0.25-grouped-firing.json"))
    body = json.loads(fixture("alertmanager-0.25-grouped-firing.json"))
    body["alerts"].reverse()  # order does not matter
    assert key(json.dumps(body).encode()) == a
    body["commonAnnotations"] = {"summary": "reworded"}  # neither do texts
    assert key(json.dumps(body).encode()) == a
    assert key(fixture("alertmanager-0.25-resolved.json")) != a
    body["alerts"][0]["startsAt"] = "2026-11-22T21:00:00Z"  # the alert fired again
    fired_again = key(json.dumps(body).encode())
    assert fired_again != a
    body["alerts"][0]["startsAt"] = "2026-11-22T23:00:00.000000000+02:00"  # the same instant
    assert key(json.dumps(body).encode()) == fired_again
    body["alerts"][0]["startsAt"] = "2026-11-22T21:00:00"  # no offset: UTC
    assert key(json.dumps(body).encode()) == fired_again
    body["alerts"][0]["startsAt"] = "0001-01-01T00:00:00Z"  # Go's zero time: not set
    assert key(json.dumps(body).encode()) != fired_again
    assert a != key(fixture("alertmanager-0.25-grouped-firing.json"), "grafana")
    # Alertmanager's nanoseconds and an HA peer's identical copy: the same key
    assert key(fixture("alertmanager-0.25-firing.json")) == key(fixture("alertmanager-0.25-firing.json"))


def test_parse_send_items_independently():
    items = parse_send(json.dumps([
        {"groupId": "a", "useTemplate": True, "variables": {"name": "Steven"}},
        {"groupId": "b", "message": "hello"},
        {"groupId": "c"},
        {"message": "no group"},
        {"groupId": "d", "message": "x", "useTemplate": True},
    ]).encode())
    assert [type(i).__name__ for i in items] == ["SendItem", "SendItem", "InvalidPayload", "InvalidPayload", "InvalidPayload"]
    assert "groupId" in items[3].reason
    with pytest.raises(InvalidPayload):
        parse_send(b"[]")


def test_status_callbacks_carry_our_message_id():
    rest = parse_status_callback({"messageId": "api1", "clientMessageId": "ours1", "statusCode": "4"})
    one_api = parse_status_callback(
        b'{"event":{"messageStatusUpdate":[{"messageId":"api2","clientMessageId":"ours2","statusCode":5}]}}'
    )
    bare = parse_status_callback({"apiMessageId": "api3", "statusCode": "3"})
    assert [(r.api_message_id, r.client_message_id, r.final_state) for r in rest + one_api + bare] == [
        ("api1", "ours1", "delivered"), ("api2", "ours2", "delivered"), ("api3", None, None)
    ]


@pytest.mark.parametrize("code", [1e999, "1e999", None, "four", [4]])
def test_a_status_code_that_is_no_number_is_a_clear_error(code):
    with pytest.raises(ValueError, match="statusCode"):
        parse_status_callback({"messageId": "api1", "statusCode": code})


@pytest.mark.parametrize("code", [True, 4.0, 4.5, float("nan"), "-4", "0x10", "٤", 10**30, -1, "1" * 5000])
def test_a_status_code_must_be_a_whole_number_in_range(code):
    """True is 1 and 4.0 is 4 to int(); neither is a Clickatell status code."""
    with pytest.raises(ValueError, match="statusCode"):
        parse_status_callback({"messageId": "api1", "statusCode": code})


@pytest.mark.parametrize("fields,needle", [
    ({"messageId": "a\ud800", "statusCode": "4"}, "messageId holds a control character or a lone surrogate"),
    ({"messageId": "a\x00", "statusCode": "4"}, "messageId holds"),
    ({"messageId": {"a": 1}, "statusCode": "4"}, "messageId must be a string"),
    ({"messageId": "a" * 201, "statusCode": "4"}, "messageId is longer than 200"),
    ({"messageId": "a", "clientMessageId": "b\udc80", "statusCode": "4"}, "clientMessageId holds"),
    ({"messageId": "a", "statusCode": "4", "status": "x\n"}, "status holds"),
])
def test_report_strings_are_safe_to_store(fields, needle):
    with pytest.raises(ValueError, match=needle):
        parse_status_callback(fields)


@pytest.mark.parametrize("body,needle", [
    (b"[" * 3000 + b"]" * 3000, "recursion limit"),  # json.loads: RecursionError
    (b'{"messageId": "a\\ud800", "statusCode": 4}', "not valid JSON"),
    (b'{"messageId": "a\xff", "statusCode": 4}', "not valid JSON"),
])
def test_callback_json_is_parsed_safely(body, needle):
    with pytest.raises(ValueError, match=needle):
        parse_status_callback(body)


def test_form_bodies_are_strict_utf8():
    assert parse_form(b"messageId=a%C3%A9&statusCode=4&x=") == {"messageId": "aé", "statusCode": "4", "x": ""}
    for bad in (b"messageId=a%ff", b"messageId=\xff", b"messageId=%ED%A0%80"):
        with pytest.raises(ValueError, match="not valid UTF-8"):
            parse_form(bad)


@pytest.mark.parametrize("item,needle", [
    ({"groupId": "db", "message": "a\x00b"}, "message: holds a control character (U+0000)"),
    ({"groupId": "db", "useTemplate": True, "variables": {"a": ["ok", "\x1b[2J"]}}, "variables.a.1: holds"),
    ({"groupId": "db", "useTemplate": True, "variables": {"k\x07": 1}}, "variables.k\x07: holds"),
])
def test_send_items_refuse_control_characters(item, needle):
    (parsed,) = parse_send(json.dumps(item).encode())
    assert isinstance(parsed, InvalidPayload) and needle in parsed.reason


def test_send_refuses_non_finite_numbers():
    (big,) = parse_send(b'{"groupId": "db", "useTemplate": true, "variables": {"a": [1e400]}}')
    assert isinstance(big, InvalidPayload) and big.reason == "variables.a.0: numbers must be finite"
    with pytest.raises(InvalidPayload, match="not valid JSON"):
        parse_send(b'{"groupId": "db", "useTemplate": true, "variables": {"a": NaN}}')
    (fine,) = parse_send(b'{"groupId": "db", "message": "tab\\tand\\nnewline", "variables": {"x": 2.5}}')
    assert isinstance(fine, SendItem)
