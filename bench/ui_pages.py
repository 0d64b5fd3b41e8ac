"""How long the history page's queries take with a million stored messages (issue 19: each page
of results within 100 ms).

    python bench/ui_pages.py [--messages 1000000] [--dir DIR] [--postgresql URL] [--runs 5]

Fills an outbox (a new SQLite file in DIR, or the empty PostgreSQL database at URL) with that
many messages spread over the last 7 days (the default retention): 12 groups, one of them rare,
mostly sent with some failed, held, bundled and dead, about 1.5 recipients each, and a rare word
in one text in ten thousand. Then times ``Store.history`` for each filter the page offers, a
first page and a page deep into the results (following the cursor), and ``Store.group_counts``
for the groups page: the median and the worst of ``--runs`` runs, in milliseconds. The fill is
written with plain SQL in big transactions (the receiver's own intake is measured by bench/run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
from dataclasses import replace
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from receiver.config import parse_config  # noqa: E402
from receiver.store import HistoryQuery, Store, open_store  # noqa: E402

DAY = 86400.0
GROUPS = [f"team-{i}" for i in range(11)] + ["rare"]
STATES = ["sent"] * 90 + ["partial"] * 2 + ["failed"] * 2 + ["held", "bundled", "bundled", "dead",
                                                                "collapsed", "suppressed"]
LEVELS = ["critical", "warning", "warning", "info"]
NAMES = ["DiskFull", "HighLatency", "NodeDown", "CertExpiry", "QueueBacklog", "ErrorRate"]
RECIPIENT_STATE = {"sent": "delivered", "partial": "failed", "failed": "failed", "held": "held",
                   "bundled": "bundled", "dead": "failed", "collapsed": "collapsed",
                   "suppressed": "suppressed"}


def rows(n: int, now: float, seed: int = 19) -> Any:
    """(message row, recipient rows) for n messages, oldest first."""
    rnd = random.Random(seed)
    step = 7 * DAY / n
    for i in range(n):
        at = now - 7 * DAY + i * step
        mid = f"{int(at * 1000):011x}{rnd.getrandbits(64):016x}{rnd.getrandbits(32):08x}"
        group = "rare" if rnd.random() < 0.002 else rnd.choice(GROUPS[:-1])
        state = rnd.choice(STATES)
        level = rnd.choice(LEVELS)
        name = rnd.choice(NAMES)
        word = " zebra" if rnd.random() < 0.0001 else ""
        text = f"[{level.upper()}] FIRING 1: {name} db-{rnd.randrange(400)}{word} value {rnd.random():.3f}"
        items = json.dumps([[mid[:16], f"{name} db-1", level, LEVELS.index(level), "firing"]])
        message = (mid, at, "alertmanager", group, level, LEVELS.index(level), "firing", text, "GSM-7",
                   1, 1, state, 1, at, at, at, items)
        numbers = ["+886911960999", "+886911960998"][: 1 + (i % 2)]
        yield message, [(mid, num, RECIPIENT_STATE[state], at, f"api{i}" if state != "held" else None)
                        for num in numbers]


INSERT_M = ("INSERT INTO messages(id, created_at, source, group_id, level, priority, status, text, encoding, "
            "parts, alert_count, state, attempts, next_attempt_at, updated_at, accepted_at, items) VALUES "
            "({})")
INSERT_R = "INSERT INTO recipients(message_id, number, state, updated_at, api_message_id) VALUES ({})"


def fill_sqlite(path: str, n: int, now: float) -> None:
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    batch_m: list[Any] = []
    batch_r: list[Any] = []

    def flush() -> None:
        conn.execute("BEGIN")
        conn.executemany(INSERT_M.format(",".join("?" * 17)), batch_m)
        conn.executemany(INSERT_R.format(",".join("?" * 5)), batch_r)
        conn.execute("COMMIT")
        batch_m.clear()
        batch_r.clear()

    for message, recipients in rows(n, now):
        batch_m.append(message)
        batch_r.extend(recipients)
        if len(batch_m) >= 50_000:
            flush()
    if batch_m:
        flush()
    conn.execute("ANALYZE")
    conn.close()


async def fill_postgresql(url: str, n: int, now: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        batch_m: list[Any] = []
        batch_r: list[Any] = []

        async def flush() -> None:
            await conn.copy_records_to_table(
                "messages", records=batch_m,
                columns=["id", "created_at", "source", "group_id", "level", "priority", "status", "text",
                         "encoding", "parts", "alert_count", "state", "attempts", "next_attempt_at",
                         "updated_at", "accepted_at", "items"])
            await conn.copy_records_to_table(
                "recipients", records=batch_r,
                columns=["message_id", "number", "state", "updated_at", "api_message_id"])
            batch_m.clear()
            batch_r.clear()

        for message, recipients in rows(n, now):
            batch_m.append(message)
            batch_r.extend(recipients)
            if len(batch_m) >= 50_000:
                await flush()
        if batch_m:
            await flush()
        await conn.execute("VACUUM ANALYZE messages")
        await conn.execute("VACUUM ANALYZE recipients")
    finally:
        await conn.close()


def queries(now: float) -> list[tuple[str, HistoryQuery]]:
    return [
        ("newest", HistoryQuery()),
        ("group", HistoryQuery(group="team-3")),
        ("rare group", HistoryQuery(group="rare")),
        ("state failed", HistoryQuery(state="failed")),
        ("state held", HistoryQuery(state="held")),
        ("group + state", HistoryQuery(group="team-3", state="failed")),
        ("level", HistoryQuery(level="critical")),
        ("last night", HistoryQuery(since=now - DAY, until=now - DAY + 8 * 3600)),
        ("text common", HistoryQuery(text="NodeDown db-12")),
        ("text rare", HistoryQuery(text="zebra")),
        ("everything", HistoryQuery(group="team-3", level="critical", state="sent", text="DiskFull",
                                    since=now - 3 * DAY)),
    ]


async def timed(store: Store, q: HistoryQuery, runs: int) -> tuple[list[float], int, bool]:
    took = []
    page = None
    for _ in range(runs):
        start = time.perf_counter()
        page = await store.message_history(q)
        took.append((time.perf_counter() - start) * 1000)
    assert page is not None
    return took, len(page.messages), page.next is not None


async def measure(store: Store, now: float, runs: int) -> list[dict[str, Any]]:
    results = []
    for name, q in queries(now):
        took, shown, more = await timed(store, q, runs)
        results.append({"filter": name, "page": 1, "rows": shown, "more": more,
                        "median_ms": statistics.median(took), "max_ms": max(took)})
        page, deep = await store.message_history(q), 1  # follow the cursor 20 pages down
        while page.next is not None and deep < 20:
            q = _with_cursor(q, page.next)
            page, deep = await store.message_history(q), deep + 1
        took, shown, more = await timed(store, q, runs)
        results.append({"filter": name, "page": deep, "rows": shown, "more": more,
                        "median_ms": statistics.median(took), "max_ms": max(took)})
    for name, since in (("groups 24h", now - DAY), ("groups 7d", now - 7 * DAY)):
        took = []
        for _ in range(runs):
            start = time.perf_counter()
            await store.group_counts(since)
            took.append((time.perf_counter() - start) * 1000)
        results.append({"filter": name, "page": 0, "rows": 0, "more": False,
                        "median_ms": statistics.median(took), "max_ms": max(took)})
    return results


def _with_cursor(q: HistoryQuery, cursor: tuple[float, str]) -> HistoryQuery:
    return replace(q, before=cursor)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None, help="where the SQLite file goes (default: a temporary directory)")
    ap.add_argument("--postgresql", default=None, metavar="URL", help="an empty database to fill instead")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    now = time.time()
    scratch = tempfile.TemporaryDirectory(prefix="ui-bench-", dir=args.dir)
    try:
        storage = args.postgresql or f"sqlite://{scratch.name}/outbox.db"
        cfg = parse_config(json.dumps({"storage": storage, "groups": [], "routes": []}), env={},
                           base_dir=Path.cwd())
        store = open_store(cfg.storage)
        await store.open()  # the schema
        try:
            start = time.perf_counter()
            if args.postgresql:
                await fill_postgresql(args.postgresql, args.messages, now)
            else:
                await store.close()
                fill_sqlite(cfg.storage.path, args.messages, now)
                store = open_store(cfg.storage)
                await store.open()
            print(f"filled {args.messages:,} messages ({cfg.storage.kind}) in {time.perf_counter() - start:.0f} s")
            results = await measure(store, now, args.runs)
        finally:
            await store.close()
    finally:
        scratch.cleanup()
    print(f"{'filter':<16}{'page':>5}{'rows':>6}{'more':>6}{'median ms':>11}{'max ms':>9}")
    for r in results:
        print(f"{r['filter']:<16}{r['page']:>5}{r['rows']:>6}{str(r['more']):>6}"
              f"{r['median_ms']:>11.1f}{r['max_ms']:>9.1f}")
    worst = max(r["max_ms"] for r in results if r["page"])
    print(f"worst page: {worst:.1f} ms (budget 100 ms): {'ok' if worst <= 100 else 'OVER'}")
    return 0 if worst <= 100 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
