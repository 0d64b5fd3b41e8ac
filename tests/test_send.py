"""``/send`` as the seed meant it (issue 19 item 1): send templates in the seed's ``{name}`` syntax
or Jinja2, a group's ``send_template``, a missing variable refused by name, and ``render --send``
previewing exactly what the endpoint stores. Through the receiver as a real HTTP server on
127.0.0.1 sending to the fake Clickatell, and the command line as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from receiver.config import ConfigError, load_config
from receiver.ingest import parse_send
from receiver.pipeline import Snapshot
from receiver.render import MAX_OUTPUT
from receiver.send import plan_item
from tests.conftest import eventually
from tests.helpers import BASE, make_config

ROOT = Path(__file__).resolve().parent.parent
ADMIN = {"Authorization": "Bearer admin", "Content-Type": "application/json"}

SEND_TEMPLATES = {
    "page": "[PAGE] {name} needs you: {what}",
    "strict": {"syntax": "jinja2",
               "text": "[{{ level | upper }}] {{ name }} on {{ group.name }}"
                       "{% if link is defined %} {{ link }}{% endif %} ({{ variables.count }})"},
}
GROUPS = [{**BASE["groups"][0], "send_template": "page"}, *BASE["groups"][1:]]  # db has one, web not


async def send(http, rx, items) -> tuple[int, dict]:
    async with http.post(f"{rx.url}/send", data=json.dumps(items), headers=ADMIN) as r:
        return r.status, await r.json()


async def start(start_receiver, **overrides):
    return await start_receiver(admin_auth={"bearer_tokens": ["admin"]}, send_templates=SEND_TEMPLATES,
                                groups=GROUPS, **overrides)


async def test_use_template_renders_the_groups_send_template_with_the_seeds_placeholders(
        start_receiver, fake, http):
    rx = await start(start_receiver)
    status, body = await send(http, rx, [
        {"groupId": "db", "useTemplate": True, "variables": {"name": "Steven", "what": "disk full", "extra": 1}},
    ])
    assert status == 202, body
    await eventually(lambda: _count(fake, http, 2))
    assert {m["content"] for m in await fake.messages(http)} == {"[PAGE] Steven needs you: disk full"}


async def _count(fake, http, n: int) -> bool:
    return len(await fake.messages(http)) == n


async def test_use_template_never_renders_an_alert_template(start_receiver, fake, http):
    """The bug of issue 19: useTemplate on a group with only an alert template paged both
    numbers with "[WARNING] FIRING 0:". Now it is a 422 for that item saying what to do."""
    rx = await start(start_receiver)
    status, body = await send(http, rx, [{"groupId": "web", "useTemplate": True, "variables": {"name": "A"}}])
    assert status == 422
    (result,) = body["results"]
    assert result["status"] == "rejected" and "group 'web' has no send_template" in result["error"]
    # an alert template named by the item is not a send template either
    status, body = await send(http, rx, [{"groupId": "db", "useTemplate": True, "template": "default",
                                          "variables": {"name": "A", "what": "x"}}])
    assert status == 422 and "unknown send template 'default' (send_templates: page, strict)" in \
        body["results"][0]["error"]
    async with http.get(f"{rx.url}/api/v1/messages", headers=ADMIN) as r:
        assert (await r.json())["messages"] == []
    assert await fake.messages(http) == []


async def test_a_missing_variable_refuses_that_item_by_name(start_receiver, fake, http):
    rx = await start(start_receiver)
    status, body = await send(http, rx, [
        {"groupId": "db", "useTemplate": True, "variables": {"name": "Bob"}},  # no "what"
        {"groupId": "db", "useTemplate": True, "variables": {"name": "Bob", "what": None}},  # null: missing too
        {"groupId": "web", "useTemplate": True, "template": "strict", "variables": {"count": 3}},
        {"groupId": "web", "useTemplate": True, "template": "strict", "variables": {"name": "Ann", "count": 2}},
    ])
    assert status == 207, body
    errors = [r.get("error") for r in body["results"]]
    assert errors[0] == ("send template 'page' needs variable(s) 'what', missing from \"variables\" "
                         "(given: 'name')")
    assert "needs variable(s) 'what'" in errors[1]
    assert "send template 'strict' needs variable(s) 'name'" in errors[2]
    assert errors[3] is None and body["results"][3]["status"] == "accepted"
    await eventually(lambda: _count(fake, http, 1))
    # Jinja2: strict, with "is defined" for what is optional
    assert [m["content"] for m in await fake.messages(http)] == ["[CRITICAL] Ann on Web on-call (2)"]


async def test_a_message_with_variables_fills_its_placeholders(start_receiver, fake, http):
    rx = await start(start_receiver)
    status, body = await send(http, rx, [
        {"groupId": "web", "message": "{who}: {n} disks, {{ raw }}", "variables": {"who": "Jo", "n": 2}},
        {"groupId": "web", "message": "literal {name} without variables"},
        {"groupId": "web", "message": "Hi {name}", "variables": {"other": "x"}},
    ])
    assert status == 207
    assert body["results"][2]["error"] == "message uses {name}, missing from \"variables\" (given: 'other')"
    await eventually(lambda: _count(fake, http, 2))
    assert {m["content"] for m in await fake.messages(http)} == {
        "Jo: 2 disks, {{ raw }}", "literal {name} without variables"}


async def test_send_templates_run_under_the_render_budget(start_receiver, fake, http):
    """A Jinja2 send template that loops too long, and a seed one that would grow past
    MAX_OUTPUT: each gets the fallback text, with templateError saying why (the page goes out,
    as with alert templates)."""
    templates = {
        "slow": {"syntax": "jinja2",
                 "text": "{% for a in items %}{% for b in items %}{% for c in items %}"
                         "{% endfor %}{% endfor %}{% endfor %}{{ name }}"},
        "big": "{x}{x}{x}",
    }
    rx = await start_receiver(send_templates=templates)
    status, body = await send(http, rx, [
        {"groupId": "web", "useTemplate": True, "template": "slow",
         "variables": {"name": "n", "items": list(range(1000))}},
        {"groupId": "web", "useTemplate": True, "template": "big", "variables": {"x": "y" * (MAX_OUTPUT // 2)}},
    ])
    assert status == 202, body
    slow, big = body["results"]
    assert "send template 'slow' stopped: rendering took longer than" in slow["templateError"]
    assert f"more than {MAX_OUTPUT} characters" in big["templateError"]


def _config_errors(**overrides) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        make_config(**overrides)
    return exc.value.errors


def test_config_refuses_send_templates_that_cannot_work():
    errors = _config_errors(
        groups=[{**BASE["groups"][0], "send_template": "nope"}, {**BASE["groups"][1], "send_template": "default"},
                BASE["groups"][2]],
        send_templates={"jinja_in_seed": "Hi {{ name }}",
                        "broken": {"syntax": "jinja2", "text": "Hi {{ name"},
                        "loop": {"syntax": "jinja2",
                                 "text": "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}"},
                        "odd": {"syntax": "mustache", "text": "x"}},
    )
    text = "\n".join(errors)
    assert "groups.0.send_template: unknown send template 'nope' (send_templates: broken, jinja_in_seed, " \
           "loop, odd)" in text
    assert "groups.1.send_template: unknown send template 'default'" in text
    assert "'default' is an alert template" in text
    assert "send_templates.jinja_in_seed: looks like Jinja2" in text and "syntax: jinja2" in text
    assert "send_templates.broken.text: template syntax error at line 1" in text
    assert "send_templates.loop.text: rendering took longer than" in text
    assert any(e.startswith("send_templates.odd.syntax:") for e in errors)


def test_the_shipped_config_pages_the_seeds_example():
    """The seed's own /send body, against config.yaml as shipped: every group has a working
    send template."""
    cfg = load_config(ROOT / "config.yaml", env={})
    snap = Snapshot.build(cfg)
    for group in cfg.groups:
        (item,) = parse_send(json.dumps([{"groupId": group.id, "useTemplate": True,
                                          "variables": {"name": "Steven"}}]).encode())
        message = plan_item(item, snap, 0.0, "m")
        assert not isinstance(message, str), message
        assert "Steven" in message.sms.text and "FIRING" not in message.sms.text
        assert message.template_error is None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "receiver", "render", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_render_previews_send_items(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "groups": GROUPS, "send_templates": SEND_TEMPLATES}))
    items = [{"groupId": "db", "useTemplate": True, "variables": {"name": "Steven", "what": "backup"}},
             {"groupId": "web", "message": "é {x}", "variables": {"x": 1}}]
    run = _cli("--config", str(cfg), "--send", json.dumps(items), "--now", "2026-01-15T21:55:00Z")
    assert run.returncode == 0, run.stderr
    assert "item 0: group db (DB on-call): level warning, send template page" in run.stdout
    assert "recipients: +886911960999, +886911960998" in run.stdout
    assert "GSM-7, 1 part(s), 31 characters" in run.stdout
    assert "    | [PAGE] Steven needs you: backup" in run.stdout
    assert "item 1: group web (Web on-call): level critical, message with variables" in run.stdout

    (tmp_path / "items.json").write_text(json.dumps([*items, {"groupId": "web", "useTemplate": True}]))
    run = _cli("--config", str(cfg), "--send-file", str(tmp_path / "items.json"), "--json")
    assert run.returncode == 1  # one item would be refused
    out = json.loads(run.stdout)
    assert [(m["index"], m["text"], m["encoding"], m["parts"]) for m in out["messages"]] == [
        (0, "[PAGE] Steven needs you: backup", "GSM-7", 1), (1, "é 1", "GSM-7", 1)]
    assert out["messages"][0]["template"] == "page" and out["messages"][1]["template"] is None
    assert out["rejected"] == [{"index": 2, "groupId": "web",
                                "error": "group 'web' has no send_template: send a \"message\", name a send "
                                         "template with \"template\", or set groups[].send_template in the config"}]
    bad = _cli("--config", str(cfg), "--send", "[")
    assert bad.returncode == 1 and bad.stderr.startswith("--send: body is not valid JSON")
    both = _cli("--config", str(cfg), "--send", "[]", "--payload", "x.json")
    assert both.returncode == 2 and "not allowed with" in both.stderr


async def test_render_shows_exactly_what_send_stores(start_receiver, fake, http, tmp_path):
    items = [{"groupId": "db", "useTemplate": True, "variables": {"name": "Zoë", "what": "ünïcode ✓"}}]
    rx = await start(start_receiver)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "groups": GROUPS, "send_templates": SEND_TEMPLATES}))
    preview = json.loads(_cli("--config", str(cfg), "--send", json.dumps(items), "--json").stdout)["messages"][0]
    status, body = await send(http, rx, items)
    assert status == 202
    async with http.get(f"{rx.url}/api/v1/messages/{body['results'][0]['messageId']}", headers=ADMIN) as r:
        stored = await r.json()
    assert (stored["text"], stored["encoding"], stored["parts"]) == \
        (preview["text"], preview["encoding"], preview["parts"]) == ("[PAGE] Zoë needs you: ünïcode ✓", "UCS-2", 1)
    assert sorted(rc["number"] for rc in stored["recipients"]) == sorted(preview["recipients"])


async def test_one_send_request_is_bounded_in_items_and_in_cpu(start_receiver, http):
    """Each render has its budget; a request of many slow items must not hold the loop for
    minutes: past SEND_CPU_BUDGET the remaining items are refused, naming why."""
    from receiver.web import SEND_MAX_ITEMS

    # passes check-config (rendered with no variables), slow with the caller's
    slow = ("{% if n is defined %}{% for i in range(n|int) %}{% for j in range(10000) %}{% endfor %}"
            "{% endfor %}{% endif %}x")
    rx = await start_receiver(send_templates={"slow": {"syntax": "jinja2", "text": slow}})
    async with http.post(f"{rx.url}/send", json=[{"groupId": "db", "message": "x"}] * (SEND_MAX_ITEMS + 1)) as r:
        assert r.status == 422 and "at most" in (await r.json())["error"]
    items = [{"groupId": "db", "useTemplate": True, "template": "slow", "variables": {"n": 10000}}
             for _ in range(40)]
    async with http.post(f"{rx.url}/send", json=items) as r:
        answer = await r.json()
    refused = [a for a in answer["results"] if a["status"] == "rejected"]
    assert refused and all("rendering took over" in a["error"] for a in refused), answer
    assert len(refused) < 40


def test_a_null_variable_is_missing_in_jinja2_send_templates_too():
    from receiver.ingest import parse_send
    from receiver.pipeline import Snapshot
    from receiver.send import plan_item
    from tests.helpers import make_config

    cfg = make_config(send_templates={"incident": {"syntax": "jinja2", "text": "{{ name }}: {{ what }}"}})
    (item,) = parse_send(b'[{"groupId": "db", "useTemplate": true, "template": "incident",'
                         b' "variables": {"name": "n", "what": null}}]')
    refused = plan_item(item, Snapshot.build(cfg), 1000.0, "m1")
    assert isinstance(refused, str) and "'what'" in refused, refused
