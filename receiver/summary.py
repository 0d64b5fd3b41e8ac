"""Summaries: the one SMS that stands for several held messages. Pure functions.

A *bundle* (held by the throttle, per number) leads with the most urgent held text and names
the rest: ``<text>\\n+37 more: DiskFull db-1 (warning), …``. A *digest* or *quiet-hours summary*
(per group) names them all: ``[digest 15m] 12 alerts: …``. Names go most urgent first and stop,
with "...", where ``max_parts`` ends; the count always covers every alert, so nothing held is
ever unaccounted for.

Alerts are followed by identity (fingerprint) across the held messages, so an alert that fired
and resolved while held becomes one line, ``(warning, fired+resolved)``; when every held alert
did that, there is nothing worth a page and no summary is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from receiver.encoding import count_parts, fit
from receiver.ingest import label_fingerprint
from receiver.models import Alert, Item, SmsText

_MORE = "..."  # GSM-7: "…" would turn the whole text into UCS-2 and halve its room


def alert_item(alert: Alert, level: str, priority: int) -> Item:
    labels = alert.labels
    where = labels.get("instance") or labels.get("job") or labels.get("service") or ""
    name = " ".join(p for p in (labels.get("alertname", ""), where) if p) or "alert"
    key = alert.fingerprint or label_fingerprint(labels)  # ingest sets it; /send has none
    return Item(key, name, level, priority, str(alert.status), tuple(sorted(labels.items())))


@dataclass(frozen=True, slots=True)
class Entry:
    """One held message, as the store hands it over."""

    message_id: str
    created_at: float
    priority: int
    level: str
    status: str
    text: str
    items: tuple[Item, ...]
    summary: bool = False  # itself a summary (one that could not be sent before it was held)

    def keyed_items(self) -> tuple[Item, ...]:
        """Its alerts; a message without alerts (``/send``) stands for itself."""
        if self.items:
            return self.items
        return (Item(self.message_id, _first_words(self.text), self.level, self.priority, self.status),)


def _first_words(text: str, limit: int = 40) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + _MORE


@dataclass(frozen=True, slots=True)
class _Fate:
    item: Item  # the most urgent sighting
    fired: bool
    resolved_last: bool

    @property
    def collapsed(self) -> bool:
        return self.fired and self.resolved_last

    @property
    def firing(self) -> bool:
        return not self.resolved_last

    def label(self) -> str:
        i = self.item
        if self.collapsed:
            return f"{i.name} ({i.level}, fired+resolved)"
        if self.resolved_last:
            return f"{i.name} ({i.level}, resolved)"
        return f"{i.name} ({i.level})"


def _fates(entries: Sequence[Entry]) -> dict[str, _Fate]:
    """Each alert's story across the held messages, in the order they were created."""
    out: dict[str, _Fate] = {}
    for entry in sorted(entries, key=lambda e: e.created_at):
        for item in entry.keyed_items():
            old = out.get(item.key)
            best = item if old is None or item.priority < old.item.priority else old.item
            fired = (old.fired if old else False) or item.status == "firing"
            out[item.key] = _Fate(best, fired, item.status == "resolved")
    return out


def count_alerts(entries: Sequence[Entry]) -> int:
    """Distinct alerts among held messages: what a summary of them accounts for."""
    return len({i.key for e in entries for i in e.keyed_items()})


@dataclass(frozen=True, slots=True)
class Summary:
    sms: SmsText
    alerts: int  # alerts it accounts for (named or counted)
    collapsed: int  # of those, fired and resolved while held


def _ordered(entries: Sequence[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.priority, e.created_at))


def bundle(entries: Sequence[Entry], max_parts: int) -> Summary | None:
    """One SMS for a number's throttled messages, or None when all of it resolved meanwhile."""
    fates = _fates(entries)
    collapsed = sum(f.collapsed for f in fates.values())
    if all(f.collapsed for f in fates.values()):
        return None
    ordered = _ordered(entries)
    if len(ordered) == 1 and not collapsed:
        return Summary(fit(ordered[0].text, max_parts), len(fates), 0)
    # Lead with the most urgent text whose alerts all still fire: never a stale "firing" page,
    # and never a summary's text (its alerts are named one by one instead, not nested).
    top = next(
        (e for e in ordered if not e.summary and all(fates[i.key].firing for i in e.keyed_items())),
        None,
    )
    shown = {i.key for i in top.keyed_items()} if top else set()
    rest = sorted((f for k, f in fates.items() if k not in shown), key=lambda f: f.item.priority)
    if top is not None and not rest:
        return Summary(fit(top.text, max_parts), len(fates), collapsed)
    head = f"+{len(rest)} more: " if top else f"{len(rest)} held: "
    text = _compose(top.text if top else "", head, [f.label() for f in rest], max_parts)
    return Summary(text, len(fates), collapsed)


def digest(entries: Sequence[Entry], reason: str, max_parts: int) -> Summary | None:
    """One SMS for a group's messages held by a digest window or quiet hours."""
    fates = _fates(entries)
    if all(f.collapsed for f in fates.values()):
        return None
    ordered = sorted(fates.values(), key=lambda f: (f.item.priority, f.collapsed))
    firing = sum(f.firing for f in ordered)
    head = f"[{reason}] {len(ordered)} alert{'s' if len(ordered) != 1 else ''}"
    head += f" ({firing} firing): " if firing != len(ordered) else ": "
    text = _compose("", head, [f.label() for f in ordered], max_parts)
    return Summary(text, len(fates), sum(f.collapsed for f in ordered))


def _fits(text: str, max_parts: int) -> bool:
    return count_parts(text)[1] <= max_parts


def _compose(lead: str, head: str, names: Sequence[str], max_parts: int) -> SmsText:
    """``lead`` + newline + ``head`` + as many ``names`` as fit; ``lead`` is cut first if even
    one name would not fit after it."""
    first = head + (names[0] if names else "") + (", " + _MORE if len(names) > 1 else "")
    if lead and not _fits(lead + "\n" + first, max_parts):
        lo, hi = 0, len(lead)  # the longest prefix of lead that still leaves room
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fits(lead[:mid].rstrip() + _MORE + "\n" + first, max_parts):
                lo = mid
            else:
                hi = mid - 1
        lead = lead[:lo].rstrip() + _MORE if lo else ""
    out = (lead + "\n" if lead else "") + head
    for i, name in enumerate(names):
        candidate = out + (", " if i else "") + name
        tail = ", " + _MORE if i < len(names) - 1 else ""
        if not _fits(candidate + tail, max_parts):
            out += (", " if i else "") + _MORE
            break
        out = candidate
    return fit(out, max_parts)
