"""HTTP load generator for bench.py, run as its own process so that its CPU is not the receiver's.

    python bench/loadgen.py --url URL --body FILE --nonce X --rate R --duration S [--warmup S]
    python bench/loadgen.py --url URL --body FILE --nonce X --connections C (--duration S | --count N)

Every request is a different notification: "__N__" in the body becomes NONCE + a 9-digit counter,
exactly as bench/unique.lua does for wrk. Prints one JSON summary line on stdout.

Open loop (--rate): request i is due at t0 + i/rate whatever happened to the earlier ones, on a
connection of its own if all are busy, and its latency is counted from that due time. A server
that stalls therefore shows as latency instead of silently lowering the rate (no "coordinated
omission", the reason wrk2 exists). ``lag`` is how late the generator itself was in sending:
if it is large, the generator (or the CPU it shares) was the bottleneck, not the server.

Closed loop (--connections): C connections each send the next request as soon as the previous
one is answered: the most the server can take.

It speaks raw HTTP/1.1 keep-alive over asyncio streams instead of using aiohttp's client: a
fraction of the CPU per request, which matters on a 2-core machine shared with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# Every timestamp: perf_counter, never the loop's cached time.
clock = time.perf_counter

# What a request can fail with on the wire (counted as socket errors, the connection is dropped).
_WIRE_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError)


class Target:
    """Where requests go and how each one's bytes are made."""

    def __init__(self, url: str, template: bytes, nonce: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise SystemExit(f"--url: expected http://HOST:PORT/path, got {url!r}")
        self.host, self.port = parts.hostname, parts.port
        self.path = parts.path or "/"
        self.template = template
        self.nonce = nonce

    def token(self, i: int) -> str:
        return f"{self.nonce}{i + 1:09d}"  # unique.lua counts from 1 too

    def request(self, i: int) -> bytes:
        body = self.template.replace(b"__N__", self.token(i).encode())
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class Conn:
    """One keep-alive connection; one request at a time (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, target: Target) -> Conn:
        reader, writer = await asyncio.open_connection(target.host, target.port, limit=1 << 20)
        return cls(reader, writer)

    async def roundtrip(self, data: bytes) -> tuple[int, bool]:
        """Send one request; return (HTTP status, whether the server keeps the connection)."""
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > 1 << 16:
            await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, keep = 0, True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                keep = value.strip().lower() != b"close"
            elif name == b"transfer-encoding":
                raise ValueError("chunked responses are not supported")
        if length:
            await self.reader.readexactly(length)
        return status, keep

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Idle connections; a new one when none is idle, up to ``limit`` (then requests wait)."""

    def __init__(self, target: Target, limit: int) -> None:
        self.target, self.limit = target, limit
        self.idle: list[Conn] = []
        self.opened = 0  # currently open
        self.peak = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def prefill(self, n: int) -> None:
        opened = await asyncio.gather(*(Conn.open(self.target) for _ in range(min(n, self.limit))),
                                      return_exceptions=True)
        # A refused connect is not fatal here: the requests will count it as their error.
        self.idle.extend(c for c in opened if isinstance(c, Conn))
        self.opened = self.peak = len(self.idle)

    async def get(self) -> Conn:
        while True:
            if self.idle:
                return self.idle.pop()
            if self.opened < self.limit:
                self.opened += 1
                self.peak = max(self.peak, self.opened)
                try:
                    return await Conn.open(self.target)
                except BaseException:
                    self._gone()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def put(self, conn: Conn) -> None:
        self.idle.append(conn)
        self._wake()

    def drop(self, conn: Conn) -> None:
        conn.close()
        self._gone()

    def _gone(self) -> None:
        self.opened -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in self.idle:
            conn.close()


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds, measured requests only
    lags: list[float] = field(default_factory=list)  # open loop: send time - due time
    sent_times: list[float] = field(default_factory=list)
    ok: int = 0
    errors_status: int = 0
    errors_socket: int = 0
    first_error: str | None = None
    records: list[tuple[str, int, float]] = field(default_factory=list)  # token, status, answered (wall)

    def error(self, what: str) -> None:
        if self.first_error is None:
            self.first_error = what


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of unsorted ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def _exchange(pool: Pool, target: Target, i: int, timeout: float, stats: Stats) -> tuple[int, float, float] | None:
    """One request on a pooled connection: (status, send time, answer time) or None on a wire error."""
    data = target.request(i)
    try:
        conn = await pool.get()
    except _WIRE_ERRORS as exc:
        stats.errors_socket += 1
        stats.error(f"connect: {type(exc).__name__}: {exc}")
        return None
    sent = clock()
    try:
        async with asyncio.timeout(timeout):
            status, keep = await conn.roundtrip(data)
    except _WIRE_ERRORS as exc:
        pool.drop(conn)
        stats.errors_socket += 1
        stats.error(f"request: {type(exc).__name__}: {exc}")
        return None
    answered = clock()
    if keep:
        pool.put(conn)
    else:
        pool.drop(conn)
    return status, sent, answered


def _count(stats: Stats, status: int) -> None:
    if 200 <= status < 300:
        stats.ok += 1
    else:
        stats.errors_status += 1
        stats.error(f"HTTP {status}")


async def open_loop(target: Target, rate: float, duration: float, warmup: float, timeout: float,
                    max_connections: int, keep_records: bool) -> tuple[dict[str, Any], list[Any]]:
    loop = asyncio.get_running_loop()
    pool = Pool(target, max_connections)
    # Enough connections for ~20 ms of requests, so the first ones do not pay for a connect.
    await pool.prefill(max(4, int(rate * 0.02)))
    stats = Stats()
    skip = int(warmup * rate)  # warm-up requests are sent but not measured
    total = skip + int(duration * rate)

    async def one(i: int, due: float) -> None:
        result = await _exchange(pool, target, i, timeout, stats)
        if result is None:
            return
        status, sent, answered = result
        _count(stats, status)  # warm-up included: an error is an error
        if i < skip:
            return
        stats.latencies.append(answered - due)
        stats.lags.append(sent - due)
        stats.sent_times.append(sent)
        if keep_records:
            stats.records.append((target.token(i), status, time.time()))

    tasks: set[asyncio.Task[None]] = set()
    t0 = clock() + 0.01
    i = 0
    while i < total:
        now = clock()
        due = t0 + i / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        # Everything that is due goes now: a late wake-up must not lower the rate.
        while i < total and t0 + i / rate <= now:
            task = loop.create_task(one(i, t0 + i / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
    if tasks:
        await asyncio.gather(*tasks)
    pool.close()
    sent = sorted(stats.sent_times)
    achieved = (len(sent) - 1) / (sent[-1] - sent[0]) if len(sent) > 1 and sent[-1] > sent[0] else None
    return {
        "mode": "open",
        "rate_target": rate,
        "rate_achieved": None if achieved is None else round(achieved, 1),
        "duration_s": duration,
        "lag_p50_ms": ms(percentile(stats.lags, 50)),
        "lag_p99_ms": ms(percentile(stats.lags, 99)),
        "lag_max_ms": ms(max(stats.lags, default=None)),
        "connections_peak": pool.peak,
        "measured": len(stats.latencies),
        **_common(stats, total),
    }, stats.records


async def closed_loop(target: Target, connections: int, duration: float | None, count: int | None,
                      timeout: float) -> dict[str, Any]:
    pool = Pool(target, connections)
    await pool.prefill(connections)
    stats = Stats()
    counter = 0
    start = clock()
    deadline = start + duration if duration else math.inf

    async def worker() -> None:
        nonlocal counter
        while clock() < deadline and (count is None or counter < count):
            i, counter = counter, counter + 1
            result = await _exchange(pool, target, i, timeout, stats)
            if result is None:
                await asyncio.sleep(0.01)  # a refused connect must not spin
                continue
            status, sent, answered = result
            _count(stats, status)
            stats.latencies.append(answered - sent)

    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = clock() - start
    pool.close()
    return {
        "mode": "closed",
        "connections": connections,
        "elapsed_s": round(elapsed, 3),
        "rate_ok": round(stats.ok / elapsed, 1) if elapsed > 0 else None,
        **_common(stats, counter),
    }


def _common(stats: Stats, attempted: int) -> dict[str, Any]:
    return {
        "attempted": attempted,
        "requests": stats.ok + stats.errors_status,  # answered, warm-up included
        "ok": stats.ok,
        "errors_status": stats.errors_status,
        "errors_socket": stats.errors_socket,
        "first_error": stats.first_error,
        "p50_ms": ms(percentile(stats.latencies, 50)),
        "p99_ms": ms(percentile(stats.latencies, 99)),
        "max_ms": ms(max(stats.latencies, default=None)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="body template; __N__ becomes a unique token")
    parser.add_argument("--nonce", required=True, help="prefix of the tokens ([0-9a-z])")
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--warmup", type=float, default=0.0, help="open loop: seconds sent, not measured")
    parser.add_argument("--connections", type=int, help="closed loop: connections")
    parser.add_argument("--duration", type=float, help="seconds")
    parser.add_argument("--count", type=int, help="closed loop: stop after this many requests")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--max-connections", type=int, default=512, help="open loop: connection cap")
    parser.add_argument("--records", help="open loop: write [token, status, answered_unix_time] here")
    args = parser.parse_args()
    with open(args.body, "rb") as f:
        target = Target(args.url, f.read(), args.nonce)

    # No collector pauses in the middle of a schedule: this process lives for seconds only.
    gc.disable()
    wall, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    records: list[Any] = []
    if args.rate:
        if not args.duration:
            parser.error("--rate needs --duration")
        out, records = asyncio.run(open_loop(target, args.rate, args.duration, args.warmup,
                                             args.timeout, args.max_connections, args.records is not None))
    elif args.connections:
        if not (args.duration or args.count):
            parser.error("--connections needs --duration or --count")
        out = asyncio.run(closed_loop(target, args.connections, args.duration, args.count, args.timeout))
    else:
        parser.error("give --rate (open loop) or --connections (closed loop)")
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    # Share of one core the generator used: near 1.0 means it may have been the bottleneck.
    out["generator_cpu"] = round(cpu / max(1e-9, time.monotonic() - wall), 3)
    if args.records is not None:
        with open(args.records, "w") as f:
            json.dump(records, f)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
