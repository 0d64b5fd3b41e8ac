"""Paging policy as pure functions: throttle rules (property tests), quiet hours across midnight
and DST, digest windows, the policy a level gets, and the text of summaries."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st

from receiver.config import ConfigError, ThrottleRule
from receiver.encoding import count_parts
from receiver.models import Item
from receiver.paging import Throttle, digest_until, next_allowed, policy_for, quiet_until
from receiver.summary import Entry, bundle, digest
from tests.helpers import make_config

BERLIN = ZoneInfo("Europe/Berlin")
GOALERT = [ThrottleRule(count=1, window=60), ThrottleRule(count=5, window=900),
           ThrottleRule(count=11, window=3600), ThrottleRule(count=21, window=10800)]


def berlin(*args: int) -> float:
    return datetime(*args, tzinfo=BERLIN).timestamp()


# -- throttle --------------------------------------------------------------------------------

rules_st = st.lists(
    st.builds(ThrottleRule, count=st.integers(1, 6), window=st.integers(1, 4000).map(float)),
    min_size=1, max_size=4,
)
# Whole seconds: with arbitrary floats, t + window - window can round below t (a boundary error
# of 1e-16 s that says nothing about the rules).
arrivals_st = st.lists(st.integers(0, 20_000).map(float), min_size=1, max_size=80)


def _simulate(rules: list[ThrottleRule], arrivals: list[float]) -> list[float]:
    """Every arrival is sent at the first moment the rules allow (a queue drained in order)."""
    sent: list[float] = []
    for t in sorted(arrivals):
        at = next_allowed(sent, rules, max(t, sent[-1] if sent else t))
        sent.append(at)
    return sent


@settings(max_examples=300, deadline=None)
@given(rules_st, arrivals_st)
def test_sends_never_break_any_rule(rules, arrivals):
    sent = _simulate(rules, arrivals)
    for rule in rules:
        for end in sent:  # a window holds the most sends when it ends at one
            inside = [t for t in sent if end - rule.window < t <= end]
            assert len(inside) <= rule.count, (rule, end, inside)


@settings(max_examples=300, deadline=None)
@given(rules_st, arrivals_st)
def test_nothing_waits_longer_than_the_rules_force(rules, arrivals):
    """Liveness: a send is never put off past the earliest time that keeps every rule."""
    sent = _simulate(rules, arrivals)
    for i, t in enumerate(sent):
        earlier = sent[:i]
        at = next_allowed(earlier, rules, t)
        assert at == t  # the moment chosen is allowed …
        # … and one instant sooner (after the arrival) would break a rule
        if t > sorted(arrivals)[i] and t - 1e-6 > (earlier[-1] if earlier else -1):
            assert next_allowed(earlier, rules, t - 1e-6) > t - 1e-6


@given(st.lists(st.floats(0, 10_000, allow_nan=False), max_size=40), st.floats(0, 20_000))
def test_next_allowed_is_never_before_now(history, now):
    assert next_allowed([h for h in history if h <= now], GOALERT, now) >= now


def test_goalert_defaults_allow_1_a_minute_then_space_out():
    sent = _simulate(GOALERT, [0.0] * 30)
    assert sent[:5] == [0, 60, 120, 180, 240]
    assert sent[5] == 900  # the 6th waits for the 15-minute window
    assert len([t for t in sent if t < 3 * 3600]) == 21


def test_urgent_messages_wait_at_most_the_bound():
    t = Throttle(tuple(GOALERT), urgent_rank=0, urgent_max_delay=60)
    history = [0.0, 60.0, 120.0, 180.0, 240.0]  # 5 in 15 minutes: the next is due at 900
    assert t.admit(history, False, priority=1, created_at=250, now=250) == 900
    assert t.admit(history, False, priority=0, created_at=250, now=250) == 310
    assert t.admit(history, False, priority=0, created_at=250, now=310) is None  # overdue: send
    assert t.admit([], True, priority=1, created_at=0, now=5) == 5  # joins what is held
    assert Throttle((), 0, 60).admit(history, True, 3, 0, 0) is None  # no rules: no throttle


URGENT_T = Throttle(tuple(GOALERT), urgent_rank=0, urgent_max_delay=60,
                   ceiling=(ThrottleRule(count=3, window=3600),))


def test_a_firing_urgent_page_passes_the_rules_while_under_the_ceiling():
    history = [100.0]  # the resolved SMS of an earlier alert: 1 a minute is spent until 160
    assert URGENT_T.admit(history, False, 0, 130, 130, "firing", [100.0]) is None  # the reported case
    assert URGENT_T.admit(history, False, 0, 130, 130, "resolved") == 160  # resolved: the rules
    assert URGENT_T.admit(history, False, 1, 130, 130, "firing") == 160  # a warning: the rules
    assert URGENT_T.admit(history, True, 0, 130, 130, "firing") == 130  # takes the held ones now


def test_past_the_ceiling_an_urgent_page_is_throttled_but_bounded():
    urgent = [0.0, 10.0, 20.0]  # 3 urgent SMS in the hour: the ceiling is reached
    history = [*urgent, 100.0]
    assert URGENT_T.admit(history, False, 0, 130, 130, "firing", urgent) == 160  # the rules allow sooner
    five = [0.0, 10.0, 20.0, 30.0, 40.0]  # 5 in 15 minutes: the rules say 900
    assert URGENT_T.admit(five, False, 0, 130, 130, "firing", five[:3]) == 190  # urgent_max_delay
    # the ceiling frees a slot at 3600 (its oldest send leaves the window): sooner than the bound
    later = [*five[:3], 3300.0, 3350.0, 3400.0, 3450.0, 3500.0]  # the rules say 4200
    assert URGENT_T.admit(later, False, 0, 3590, 3595, "firing", five[:3]) == 3600
    assert Throttle(tuple(GOALERT), 0, 60).admit(five, False, 0, 130, 130, "firing", five) is None  # no ceiling


def test_the_urgent_ceiling_setting():
    assert Throttle.from_config(make_config()).ceiling == (ThrottleRule(count=10, window=3600),)
    assert Throttle.from_config(make_config(paging={"urgent_ceiling": None})).ceiling == ()
    with pytest.raises(ConfigError) as bad:
        make_config(paging={"urgent_ceiling": {"count": 0, "window": "1h"}})
    assert "paging.urgent_ceiling.count: Input should be greater than or equal to 1" in str(bad.value)


times_st = st.lists(st.integers(0, 4000).map(float), max_size=30)


@settings(max_examples=300, deadline=None)
@given(times_st, st.lists(st.booleans(), max_size=30), st.integers(0, 5000).map(float), st.booleans())
def test_only_urgent_sends_count_against_the_ceiling(times, marks, now, holding):
    """What a non-urgent page gets never depends on the urgent history; a firing urgent page is
    let through exactly when fewer than ``count`` urgent sends are in the ceiling's window, and
    waits no longer than the bound otherwise."""
    history = sorted(t for t in times if t <= now)
    urgent = [t for t, u in zip(history, marks) if u]
    for prio, status in ((1, "firing"), (0, "resolved"), (2, "resolved")):
        assert URGENT_T.admit(history, holding, prio, now, now, status, urgent) == \
            URGENT_T.admit(history, holding, prio, now, now, status, [])
    got = URGENT_T.admit(history, holding, 0, now, now, "firing", urgent)
    under = sum(1 for t in urgent if t > now - 3600) < 3
    if under:
        assert got == (now if holding else None)
    elif got is None:  # past the ceiling: only the rules let it through now
        assert not holding and next_allowed(history, GOALERT, now) == now
    else:
        assert now <= got <= now + 60


# -- quiet hours and digests -------------------------------------------------------------------

def _quiet(**kw):
    cfg = make_config(groups=[{
        "id": "g", "level": "info", "members": ["+14155550123"],
        "quiet_hours": {"timezone": "Europe/Berlin", "start": "22:00", "end": "07:00", **kw},
    }], routes=[], default_groups=["g"])
    return cfg, cfg.groups[0].quiet_hours


def test_quiet_hours_cross_midnight():
    _, qh = _quiet()
    assert quiet_until(qh, berlin(2026, 6, 10, 21, 59)) is None
    assert quiet_until(qh, berlin(2026, 6, 10, 22, 0)) == berlin(2026, 6, 11, 7, 0)
    assert quiet_until(qh, berlin(2026, 6, 11, 3, 0)) == berlin(2026, 6, 11, 7, 0)
    assert quiet_until(qh, berlin(2026, 6, 11, 7, 0)) is None


def test_quiet_hours_days_are_the_days_a_period_starts():
    _, qh = _quiet(days=["fri", "sat"])  # weekend nights only
    assert quiet_until(qh, berlin(2026, 6, 12, 23, 0)) == berlin(2026, 6, 13, 7, 0)  # Fri night
    assert quiet_until(qh, berlin(2026, 6, 14, 6, 0)) == berlin(2026, 6, 14, 7, 0)  # Sat night
    assert quiet_until(qh, berlin(2026, 6, 14, 23, 0)) is None  # Sunday night: a work night


def test_quiet_hours_across_dst_changes_end_at_local_time():
    _, qh = _quiet()
    # 2026-03-29 02:00 → 03:00 (spring forward): that night is 8 hours long
    end = quiet_until(qh, berlin(2026, 3, 28, 23, 0))
    assert end == berlin(2026, 3, 29, 7, 0)
    assert end - berlin(2026, 3, 28, 23, 0) == 7 * 3600
    # 2026-10-25 03:00 → 02:00 (fall back): 10 hours, still ending at 07:00 local
    start = berlin(2026, 10, 24, 22, 0)
    assert quiet_until(qh, start) == berlin(2026, 10, 25, 7, 0)
    assert berlin(2026, 10, 25, 7, 0) - start == 10 * 3600
    assert quiet_until(qh, berlin(2026, 10, 25, 6, 59)) is not None


def test_digest_windows_are_aligned():
    assert digest_until(900, 1_800_000_000.0) == 1_800_000_900.0
    assert digest_until(900, 1_800_000_899.0) == 1_800_000_900.0
    assert digest_until(900, 1_800_000_900.0) == 1_800_001_800.0


def test_policy_per_level_and_quiet_hours():
    cfg = make_config(
        levels=[{"name": "critical", "severities": ["critical"]},
                {"name": "warning", "severities": ["warning"], "delivery": {"digest": "15m"}},
                {"name": "info", "severities": ["info"], "delivery": "none"}],
        groups=[{"id": "g", "level": "info", "members": ["+14155550123"],
                 "quiet_hours": {"timezone": "Europe/Berlin", "start": "22:00", "end": "07:00"}}],
        routes=[], default_groups=["g"],
    )
    g = cfg.groups[0]
    day, night = berlin(2026, 6, 10, 12, 1), berlin(2026, 6, 10, 23, 0)
    assert policy_for(cfg, g, "critical", night).kind == "immediate"  # min_level: critical
    assert policy_for(cfg, g, "warning", night).until == berlin(2026, 6, 11, 7, 0)
    assert policy_for(cfg, g, "warning", day).kind == "digest"
    assert policy_for(cfg, g, "warning", day).until == berlin(2026, 6, 10, 12, 15)
    assert policy_for(cfg, g, "info", day).kind == "none"


# -- summaries ------------------------------------------------------------------------------

def entry(n: int, level: str = "warning", prio: int = 1, status: str = "firing", at: float = 0,
          key: str | None = None) -> Entry:
    item = Item(key or f"fp{n}", f"Alert{n} db-{n}", level, prio, status)
    text = f"[{level.upper()}] {status.upper()} 1: Alert{n} db-{n} disk almost full"
    return Entry(f"m{n}-{status}", at or float(n), prio, level, status, text, (item,))


def test_bundle_leads_with_the_most_urgent_and_counts_the_rest():
    entries = [entry(i) for i in range(1, 40)] + [entry(99, "critical", 0, at=50)]
    s = bundle(entries, max_parts=3)
    assert s is not None and s.alerts == 40
    assert s.sms.text.startswith("[CRITICAL] FIRING 1: Alert99")
    assert "\n+39 more: Alert1 db-1 (warning), Alert2 db-2 (warning)" in s.sms.text
    assert s.sms.text.endswith("...") and s.sms.parts <= 3
    assert count_parts(s.sms.text)[1] <= 3


def test_bundle_of_one_is_the_message_itself():
    s = bundle([entry(1)], max_parts=3)
    assert s is not None and s.sms.text == entry(1).text


def test_bundle_cuts_a_long_lead_to_keep_the_count():
    long = Entry("x", 0, 0, "critical", "firing", "x" * 1000, (Item("k", "Big", "critical", 0, "firing"),))
    s = bundle([long, entry(1), entry(2)], max_parts=2)
    assert s is not None and s.sms.parts <= 2
    assert "\n+2 more: Alert1 db-1 (warning)" in s.sms.text


def test_resolve_while_held_collapses_to_one_line_or_nothing():
    fired, resolved = entry(1, at=1), entry(1, status="resolved", at=2)
    assert bundle([fired, resolved], max_parts=3) is None  # nothing left worth a page
    s = bundle([fired, resolved, entry(2, at=3)], max_parts=3)
    assert s is not None and s.collapsed == 1
    assert s.sms.text.startswith("[WARNING] FIRING 1: Alert2")  # never the stale firing text
    assert "+1 more: Alert1 db-1 (warning, fired+resolved)" in s.sms.text


def test_digest_names_everything_most_urgent_first():
    s = digest([entry(1), entry(2, "critical", 0), entry(3, status="resolved")], "digest 15m", 3)
    assert s is not None
    assert s.sms.text == ("[digest 15m] 3 alerts (2 firing): Alert2 db-2 (critical), "
                          "Alert1 db-1 (warning), Alert3 db-3 (warning, resolved)")
    assert digest([entry(1, at=1), entry(1, status="resolved", at=2)], "quiet hours", 3) is None


def test_a_summary_held_again_is_named_not_nested():
    """A bundle that could not be sent before the throttle held it again: its alerts are named
    in the next bundle, never its text as a lead (which would nest "+N more" lines)."""
    items = (Item("fp1", "Alert1 db-1", "warning", 1, "firing"), Item("fp2", "Alert2 db-2", "warning", 1, "firing"))
    earlier = Entry("b1", 0.5, 1, "warning", "firing",
                    "[WARNING] FIRING 1: Alert1 db-1 disk almost full\n+1 more: Alert2 db-2 (warning)",
                    items, summary=True)
    s = bundle([earlier, entry(3)], max_parts=3)
    assert s is not None and s.alerts == 3
    assert s.sms.text == ("[WARNING] FIRING 1: Alert3 db-3 disk almost full\n"
                          "+2 more: Alert1 db-1 (warning), Alert2 db-2 (warning)")
    alone = bundle([earlier, entry(1, status="resolved", at=2)], max_parts=3)
    assert alone is not None and alone.sms.text.startswith("2 held: Alert1 db-1 (warning, fired+resolved)")
