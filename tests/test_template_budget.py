"""A template can never stop paging (issue 20, item 5): every render runs under a budget of CPU
time and size that the sandbox enforces itself; a template over it gets the fallback text, and
``check-config``/reload refuse a template that overruns or fails on a sample notification."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from receiver.config import DEFAULT_TEMPLATE
from receiver.config.load import ConfigError
from receiver.ingest import parse_webhook
from receiver.models import GroupDelivery
from receiver.render import RENDER_BUDGET, Renderer, build_context, template_error
from tests.conftest import eventually
from tests.helpers import BASE, fixture, make_config

NOW = 1_795_000_000.0
FALLBACK = "[CRITICAL] FIRING 1: HighLatency web-1:9100 p99 latency above 2s"
SLACK = 1.0  # seconds: generous, the machine is shared; without the budget each took seconds to forever


def context():
    n = parse_webhook(fixture("alertmanager-0.25-firing.json"), "alertmanager")
    d = GroupDelivery("db", "critical", n.status, n.alerts)
    return build_context(n, d, make_config().groups_by_id["db"], NOW)


HOSTILE = {
    # time: loops, with and without output, with and without calls in the body
    "nested loops, no output": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "nested loops, a call": "{% for i in range(10000) %}{% for j in range(10000) %}"
                            "{% set x = alerts[0].labels.alertname | lower %}{% endfor %}{% endfor %}",
    "nested range(99999)": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "nested range(100000), output": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
                                    "{% endfor %}",
    "macro fan-out": "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "recursive loop": "{% for x in [1] recursive %}{{ loop([1, 1]) }}{% endfor %}",
    "large |list": "{% for i in range(10000) %}{{ (range(10000) | list) | length }}{% endfor %}",
    "slice into a billion": "{{ range(10) | slice(10**9) | list | length }}",
    # size: one step that would allocate a huge value
    "'x' * 10**9": "{{ 'x' * 10**9 }}",
    "lipsum(10**6)": "{{ lipsum(10**6) }}",
    "range * n": "{{ range(10000) | list * 10000 }}",
    "~ doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                  "{% endfor %}{{ ns.s | length }}",
    "+ doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                  "{% endfor %}{{ ns.s | length }}",
    "block-set doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set t %}{{ ns.s }}"
                          "{{ ns.s }}{% endset %}{% set ns.s = t %}{% endfor %}{{ ns.s | length }}",
    "macro output": "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% else %}xxxxxxxxxx{% endif %}"
                    "{% endmacro %}{{ f(40) }}",
    "list.extend doubling": "{% set l = [1] %}{% for i in range(60) %}{{ l.extend(l) }}{% endfor %}",
    "int squaring": "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                    "{% endfor %}{{ ns.n > 0 }}",
    "power": "{{ 2 ** (10**9) }}",
    "center": "{{ 'x' | center(10**9) }}",
    "center, literal": "{{ 'x' | center(1000000000) }}",
    "str.ljust": "{{ 'x'.ljust(10**9) }}",
    "format width": "{{ '%1000000000s' | format('x') }}",
    "format *": "{{ '%*s' | format(10**9, 'x') }}",
    "% width": "{{ '%1000000000s' % 'x' }}",
    "str.format width": "{{ '{:>1000000000}'.format('x') }}",
    "str.format nested width": "{{ '{:>{}}'.format('x', 10**9) }}",
    "indent": "{{ ('x\n' * 100000) | indent(100000) }}",
    "wordwrap": "{{ ('x ' * 100000) | wordwrap(1) }}",
    "join": "{{ (['x' * 200000] * 10000) | join }}",
    "str.replace": "{{ ('x' * 200000).replace('x', 'yyyyyyyyyy') }}",
    "sum of lists": "{{ ([[1] * 10000] * 10000) | sum(start=[]) }}",
    # size: a small list whose text is huge (100,000 references to one long string)
    "printed list": "{{ ['x' * 200000] * 100000 }}",
    # one filter call over a big list ran ~0.6 s in a single step (the clock was read every 16)
    "groupby over a big list": "{% set l = range(10000)|list * 10 %}" + "{{ l|groupby('real')|length }}" * 5,
    "many slow filter calls": "{% set l = range(10000)|list %}" + "{{ l|groupby('real')|length }}" * 200,
    "list | string": "{{ (['x' * 200000] * 100000) | string }}",
    "list | upper": "{{ (['x' * 200000] * 100000) | upper }}",
    "list ~": "{{ (['x' * 200000] * 100000) ~ '' }}",
    "list %": "{{ '%s' % ((['x' * 200000] * 100000),) }}",
    "list .format": "{{ '{}'.format(['x' * 200000] * 100000) }}",
    "nested lists": "{% set ns = namespace(l=[]) %}{% for i in range(30) %}{% set ns.l = [ns.l, ns.l] %}"
                    "{% endfor %}{{ ns.l }}",
    "output only": "{% for i in range(10000) %}{% for j in range(10000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
}


@pytest.fixture(scope="module")
def hostile_renderer() -> Renderer:
    return Renderer(HOSTILE)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_cut_off_within_budget_and_falls_back(hostile_renderer, name):
    wall, cpu = time.perf_counter(), time.thread_time()
    r = hostile_renderer.render(name, context(), 3)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert r.sms.text == FALLBACK
    assert r.error and r.error.startswith(f"template {name!r} ")
    assert cpu < RENDER_BUDGET + SLACK and wall < RENDER_BUDGET + 5 * SLACK


def test_budget_errors_say_what_happened(hostile_renderer):
    assert hostile_renderer.render("nested loops, no output", context(), 3).error == (
        "template 'nested loops, no output' stopped: rendering took longer than 100ms — a loop too large?")
    assert "stopped: a repeated string would be more than 262144 characters" in (
        hostile_renderer.render("'x' * 10**9", context(), 3).error)
    assert "stopped: rendering produced more than 32768 characters" in (
        hostile_renderer.render("output only", context(), 3).error)
    assert "'lipsum' is undefined" in hostile_renderer.render("lipsum(10**6)", context(), 3).error


def test_budget_is_cpu_time_of_the_injected_timer():
    """With a timer that moves 10 ms per read, the deadline passes after a few checks, whatever
    the real speed: the budget is a contract on the timer, not on the machine."""
    reads = []

    def timer() -> float:
        reads.append(1)
        return len(reads) * 0.010

    loop = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    r = Renderer({"t": loop}, budget=0.05, timer=timer).render("t", context(), 3)
    assert r.error == "template 't' stopped: rendering took longer than 50ms — a loop too large?"
    assert len(reads) == 7  # the start, then one read per 16 ticks until past 50 ms
    # and the budget is per render: the next one starts afresh
    r = Renderer({"t": "ok {{ range(3) | list | length }}"}, budget=0.05, timer=timer).render("t", context(), 3)
    assert (r.sms.text, r.error) == ("ok 3", None)


@pytest.mark.parametrize("src, text", [
    ("{{ '-' * 5 }}{{ 3 * 'ab' }}{{ [1, 2] * 2 }}", "-----ababab[1, 2, 1, 2]"),
    ("<{{ '%5s|%-3d|%.2f' % ('ab', 7, 2.5) }}", "<   ab|7  |2.50"),
    ("<{{ '{:>4}{}'.format('a', 'b') }} {{ '{x}'.format_map({'x': 1}) }}", "<   ab 1"),
    ("<{{ 'ab' | center(6) }}|{{ 'a-b' | replace('-', '+') }}|{{ ['a', 'b'] | join(',') }}", "<  ab  |a+b|a,b"),
    ("{% for i in range(3) %}{{ i ~ ':' ~ loop.length }}{% if not loop.last %},{% endif %}{% endfor %}",
     "0:3,1:3,2:3"),
    ("{{ 2 ** 10 }} {{ 10**12 * 3 }} {{ range(5) | sum }} {{ 'x'.zfill(3) }} {{ 'a b' | wordwrap(1) | length }}",
     "1024 3000000000000 10 00x 3"),
    ("{% set t %}{{ alerts | length }} alert{% endset %}{{ t | upper }} {{ alerts | map(attribute='status') "
     "| list | join }}", "1 ALERT firing"),
])
def test_ordinary_templates_render_as_before(src, text):
    r = Renderer({"t": src}).render("t", context(), 3)
    assert (r.sms.text, r.error) == (text, None)


def test_default_template_unchanged():
    r = Renderer({"t": DEFAULT_TEMPLATE}).render("t", context(), 3)
    assert (r.sms.text, r.error) == (FALLBACK, None)


# -- check-config and reload -------------------------------------------------------------------


def test_template_error_renders_a_sample_under_the_budget():
    shipped = yaml.safe_load((Path(__file__).parent.parent / "config.yaml").read_text())["templates"]
    for source in (DEFAULT_TEMPLATE, *shipped.values(), "Hi {{ name }} {{ variables.count + 1 }}"):
        assert template_error(source) is None, source
    assert template_error(HOSTILE["nested loops, no output"]) == (
        "rendering took longer than 100ms — a loop too large? (rendering a sample firing notification)")
    assert template_error(HOSTILE["'x' * 10**9"]).startswith("a repeated string would be more than")
    assert template_error("{% if status == 'resolved' %}{{ 1 / 0 }}{% endif %}") == (
        "rendering a sample resolved notification failed: ZeroDivisionError: division by zero")
    assert template_error("line1\n{% if %}").startswith("template syntax error at line 2")


def test_config_with_overrunning_template_is_refused():
    with pytest.raises(ConfigError) as err:
        make_config(templates={"x": HOSTILE["nested loops, a call"]})
    assert "templates.x: rendering took longer than 100ms — a loop too large?" in str(err.value)


def test_check_config_command_refuses_overrunning_template(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "templates": {"slow": HOSTILE["macro fan-out"]}}))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "receiver", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert done.returncode != 0
    assert "templates.slow: rendering took longer than 100ms — a loop too large?" in done.stdout + done.stderr
    assert time.perf_counter() - started < 30  # without the budget: 2**40 macro calls, forever


# -- a running receiver: one group's template does not stop the others' pages ------------------

# Passes the sample (which has no label "n"), overruns on real alerts that carry one.
DATA_DRIVEN = ("{% for i in range(alerts[0].labels.n | int) %}{% for j in range(1000) %}{% for k in range(1000) %}"
               "{% endfor %}{% endfor %}{% endfor %}never")


async def test_overrunning_template_falls_back_and_other_groups_are_paged(start_receiver, fake, http):
    groups = [dict(g, template="slow") if g["id"] == "db" else g for g in BASE["groups"]]
    running = await start_receiver(groups=groups, templates={"slow": DATA_DRIVEN})
    hostile = json.loads(fixture("alertmanager-0.25-firing.json"))
    hostile["alerts"][0]["labels"].update(team="db", n="1000", alertname="SlowTemplate")
    hostile["groupKey"] = "slow"
    normal = json.loads(fixture("alertmanager-0.25-firing.json"))  # job=node: to "web"

    started = time.perf_counter()
    for body in (hostile, normal):  # answered once planned (the test's settle middleware)
        async with http.post(f"{running.url}/webhook/alertmanager", json=body) as resp:
            assert resp.status == 200, await resp.text()
    assert time.perf_counter() - started < 5 * SLACK  # 10**9 loop iterations without the budget

    texts: dict[str, str] = {}

    async def both_sent() -> bool:
        texts.update({m["to"][0] if isinstance(m["to"], list) else m["to"]: m["content"]
                      for m in await fake.messages(http)})
        return {"886911960999", "14155550123"} <= {t.lstrip("+") for t in texts}

    await eventually(both_sent)
    by_number = {k.lstrip("+"): v for k, v in texts.items()}
    assert by_number["886911960999"] == "[CRITICAL] FIRING 1: SlowTemplate web-1:9100 p99 latency above 2s"
    assert by_number["14155550123"].startswith("[CRITICAL] FIRING 1: HighLatency")
    async with http.get(f"{running.url}/metrics") as resp:
        metrics = await resp.text()
    assert 'sms_receiver_template_failures_total{group="db"} 1.0' in metrics
