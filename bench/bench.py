"""The receiver's benchmark: accept throughput and latency, end-to-end latency, drain rate, memory,
and latency against a large outbox. What each row measures and why: docs/PERFORMANCE.md.

    python bench/bench.py [--smoke] [--out FILE] [--no-wrk] [--keep]   (or: bench/run …)

Everything runs as subprocesses on free 127.0.0.1 ports: the fake Clickatell, the receiver (fresh
outbox per phase), bench/bare.py (the ceiling), wrk or bench/loadgen.py (the load).

Exit status: 0 all good; 1 a target was missed (never with --smoke); 2 something is broken (a
process did not start, a request failed, an SMS went missing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
MEMBERS = [f"+1415555010{i}" for i in range(5)]  # one group, five phones: 1 webhook = 5 SMS
WEBHOOK = "/webhook/alertmanager"
# The fake's answer delay during the accept phases: about Clickatell's round trip, so the
# dispatcher sends at the pace it would in production (16 in flight / 0.1 s) instead of taking
# as much CPU as a zero-latency fake lets it. End-to-end and drain use no delay.
CLICKATELL_DELAY = 0.1


class Broken(Exception):
    """Something did not work (as opposed to: it worked, slower than the target)."""


# ---------------------------------------------------------------------------------------------
# Plan: the full run and the smoke run take the same code paths with different sizes.


@dataclass(frozen=True)
class Plan:
    smoke: bool
    throughput_s: float  # per closed-loop load (wrk: whole seconds, at least 1)
    connections: tuple[int, ...]  # closed-loop loads at each: a server's throughput is its best
    latency_s: float  # per fixed rate
    latency_rates: tuple[int, ...]
    e2e_rate: int
    e2e_s: float
    drain_webhooks: int
    rss_webhooks: int
    rows: tuple[int, int]  # stored messages: small, large
    rows_rate: int
    rows_s: float
    warmup_s: float  # open loop: sent at the rate first, not measured

    @classmethod
    def make(cls, smoke: bool) -> Plan:
        if smoke:
            return cls(True, 0.5, (128, 32), 0.5, (100, 1000), 200, 0.5, 100, 1_000, (1_000, 10_000), 200, 0.5, 0.2)
        return cls(False, 5.0, (256, 128, 64, 32), 5.0, (100, 1000), 200, 5.0, 2_000, 100_000,
                   (10_000, 1_000_000), 200, 3.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Processes and HTTP


_live: list[Proc] = []


class Proc:
    """A child process whose output goes to a log file (never a pipe: a full pipe blocks it)."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=REPO)
        _live.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (the receiver finishes requests and sends in flight), then SIGKILL."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self in _live:
            _live.remove(self)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def stop_all() -> None:
    for proc in list(reversed(_live)):
        proc.stop(grace=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str, timeout: float = 30.0) -> Any:
    status, body = http("GET", url, timeout=timeout)
    if status != 200:
        raise Broken(f"GET {url}: HTTP {status}")
    return json.loads(body)


def wait_until(what: str, check: Callable[[], bool], timeout: float, proc: Proc | None = None,
               interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise Broken(f"{proc.name} exited (status {proc.popen.returncode}) while waiting for "
                         f"{what}; its log ends:\n{proc.tail()}")
        try:
            if check():
                return
        except (OSError, ValueError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise Broken(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f"; {proc.name}'s log ends:\n{proc.tail()}" if proc else ""))
        time.sleep(interval)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name)] not in "{ ":
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


# ---------------------------------------------------------------------------------------------
# The system under test


class Fake:
    """The fake Clickatell (one for the whole run; reset between phases)."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc("fake-clickatell", [PYTHON, "-m", "receiver", "fake-clickatell",
                                             "--listen", f"127.0.0.1:{self.port}"], work / "fake.log")
        try:
            wait_until("the fake Clickatell",
                       lambda: http("GET", self.url + "/_fake/requests", timeout=1)[0] == 200, 30, self.proc)
        except BaseException:
            self.proc.stop()
            raise

    def reset(self, delay: float = 0.0) -> None:
        if http("POST", self.url + "/_fake/reset")[0] != 200:
            raise Broken("the fake Clickatell did not reset")
        if delay and http("POST", self.url + "/_fake/mode", json.dumps({"delay": delay}).encode())[0] != 200:
            raise Broken("the fake Clickatell did not take its delay mode")

    def accepted_requests(self) -> int:
        return int(get_json(self.url + "/_fake/requests").get("rest 202", 0))

    def messages(self) -> list[dict[str, Any]]:
        return list(get_json(self.url + "/_fake/messages", timeout=60))


def receiver_config(port: int, db: Path, clickatell_url: str, **dispatch: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "storage": f"sqlite://{db}",  # db is absolute: sqlite:///tmp/…
        "log_format": "text",
        "clickatell": {"api_key": "bench-key", "base_url": clickatell_url},
        "paging": {"throttle": []},  # flood control would hold back repeated pages to one phone
        "groups": [{"id": "oncall", "name": "Bench on-call", "level": "info", "members": MEMBERS}],
        "default_groups": ["oncall"],
        "dispatch": dict(dispatch),  # its defaults (concurrency 8) unless a phase sets one
    }


class Receiver:
    """``python -m receiver run`` on a config of its own (JSON is YAML)."""

    def __init__(self, work: Path, name: str, db: Path, clickatell_url: str, **dispatch: Any) -> None:
        self.name, self.db, self.port = name, db, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_s, self.stop_s = 0.0, 0.0  # start-up and shut-down times, for the record
        self.config = work / f"{name}.yaml"
        self.write_config(clickatell_url, **dispatch)
        started = time.monotonic()
        self.proc = Proc(f"receiver ({name})", [PYTHON, "-m", "receiver", "run", "--config", str(self.config)],
                         work / f"{name}.log")
        try:
            wait_until(f"receiver {name} /-/ready",
                       lambda: http("GET", self.url + "/-/ready", timeout=2)[0] == 200, 30, self.proc, interval=0.05)
        except BaseException:
            self.proc.stop()
            raise
        self.ready_s = time.monotonic() - started

    def write_config(self, clickatell_url: str, **dispatch: Any) -> None:
        cfg = receiver_config(self.port, self.db, clickatell_url, **dispatch)
        self.config.write_text(json.dumps(cfg, indent=2))

    def metrics(self) -> str:
        status, body = http("GET", self.url + "/metrics", timeout=30)
        if status != 200:
            raise Broken(f"{self.name}: /metrics answered {status}")
        return body.decode()

    def accepted(self) -> int:
        return int(metric(self.metrics(), "sms_receiver_webhooks_received_total", outcome="accepted"))

    def status(self) -> dict[str, Any]:
        return dict(get_json(self.url + "/api/v1/status"))

    def peak_rss_mb(self) -> tuple[float, float]:
        """(VmHWM, VmRSS) in MiB, from /proc: the peak and the current resident set."""
        fields = {"VmHWM": 0.0, "VmRSS": 0.0}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                fields[key] = int(value.split()[0]) / 1024  # kB
        return fields["VmHWM"], fields["VmRSS"]

    def stop(self) -> None:
        started = time.monotonic()
        self.proc.stop()
        self.stop_s = time.monotonic() - started

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Payloads


def alertmanager_body(alerts: int, name: str = "Bench__N__") -> str:
    """An Alertmanager v4 webhook (shape of tests/fixtures/alertmanager-0.25-firing.json) whose
    groupKey, alert labels and fingerprints carry __N__, so every request is a new notification.
    The alertname also carries it: the default template puts it into the SMS text (end-to-end)."""
    items = [
        {
            "status": "firing",
            "labels": {"alertname": name, "instance": f"web-{k}:9100", "job": "node", "severity": "critical"},
            "annotations": {"summary": "p99 latency above 2s", "description": f"web-{k} p99 latency 2.4s for 5m"},
            "startsAt": "2026-11-22T20:34:59.493714281Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://127.0.0.1:9090/graph",
            "fingerprint": f"{k:02d}__N__",
        }
        for k in range(alerts)
    ]
    return json.dumps({
        "receiver": "sms", "status": "firing", "alerts": items,
        "groupLabels": {"alertname": name},
        "commonLabels": {"alertname": name, "job": "node", "severity": "critical"},
        "commonAnnotations": {"summary": "p99 latency above 2s"},
        "externalURL": "http://127.0.0.1:9093", "version": "4",
        "groupKey": '{}:{alertname="' + name + '"}', "truncatedAlerts": 0,
    })


TOKEN = re.compile(r"Bench([0-9a-z]+)")


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Load:
    """What one load run came to (wrk or loadgen)."""

    tool: str
    requests: int
    ok: int
    errors: int  # non-2xx answers + socket errors
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


class Loader:
    def __init__(self, work: Path, use_wrk: bool) -> None:
        self.work = work
        self.wrk = shutil.which("wrk") if use_wrk else None
        self.bodies = {n: self._body_file(n) for n in (1, 10)}
        self._nonces = 0

    def _body_file(self, alerts: int) -> Path:
        path = self.work / f"body-{alerts}.json"
        path.write_text(alertmanager_body(alerts))
        return path

    def nonce(self) -> str:
        """Unique per run, so no two runs of the whole benchmark or of a phase share a notification."""
        self._nonces += 1
        return f"{os.getpid() % 10000:04d}{int(time.time()) % 100000:05d}{self._nonces:03d}"

    def closed(self, url: str, alerts: int, seconds: float, connections: int = 32) -> Load:
        """As many requests as ``connections`` connections get answered in ``seconds``."""
        if self.wrk:
            return self._wrk(url, alerts, max(1, round(seconds)), connections)  # wrk: whole seconds
        return self._loadgen_load(["--url", url, "--body", str(self.bodies[alerts]), "--nonce", self.nonce(),
                                   "--connections", str(connections), "--duration", str(seconds)], seconds)

    def closed_count(self, url: str, count: int, connections: int = 32) -> Load:
        """Exactly ``count`` requests, as fast as ``connections`` connections get them answered."""
        return self._loadgen_load(["--url", url, "--body", str(self.bodies[1]), "--nonce", self.nonce(),
                                   "--connections", str(connections), "--count", str(count)],
                                  count / 50)  # time budget: a receiver slower than 50/s is broken

    def open(self, url: str, rate: int, seconds: float, warmup: float = 0.0,
             records: Path | None = None) -> Load:
        args = ["--url", url, "--body", str(self.bodies[1]), "--nonce", self.nonce(), "--rate", str(rate),
                "--duration", str(seconds), "--warmup", str(warmup)]
        if records is not None:
            args += ["--records", str(records)]
        return self._loadgen_load(args, seconds)

    def _wrk(self, url: str, alerts: int, seconds: int, connections: int) -> Load:
        assert self.wrk
        argv = [self.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                "-s", str(BENCH / "unique.lua"), url, "--", str(self.bodies[alerts]), self.nonce()]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                             cwd=REPO, check=False)
        found = re.search(r"^BENCH (.*)$", run.stdout, re.MULTILINE)
        if run.returncode != 0 or not found:
            raise Broken(f"wrk failed ({run.returncode}): {run.stdout[-500:]} {run.stderr[-500:]}")
        raw: dict[str, Any] = {k: int(v) for k, v in (kv.split("=") for kv in found.group(1).split())}
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", run.stdout)
        raw["errors_socket"] = sum(int(n) for n in sock.groups()) if sock else 0
        raw["errors_read_write"] = int(sock.group(2)) + int(sock.group(3)) if sock else 0
        errors = raw["errors_status"] + raw["errors_socket"]
        return Load("wrk", raw["requests"], raw["requests"] - raw["errors_status"], errors,
                    raw["duration_us"] / 1e6, raw["p50_us"] / 1000, raw["p99_us"] / 1000, raw)

    def _loadgen_load(self, args: list[str], seconds: float) -> Load:
        raw = self._loadgen(args, seconds)
        elapsed = raw.get("elapsed_s") or raw.get("duration_s") or seconds
        return Load("loadgen", raw["requests"], raw["ok"], raw["errors_status"] + raw["errors_socket"],
                    float(elapsed), raw["p50_ms"], raw["p99_ms"], raw)

    def _loadgen(self, args: list[str], seconds: float) -> dict[str, Any]:
        run = subprocess.run([PYTHON, str(BENCH / "loadgen.py"), *args], capture_output=True, text=True,
                             timeout=seconds + 300, cwd=REPO, check=False)
        if run.returncode != 0:
            raise Broken(f"loadgen failed ({run.returncode}): {run.stderr[-800:]}")
        return dict(json.loads(run.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    measure: str
    value: str
    target: str
    met: bool | None  # None: informational, or the phase failed
    data: dict[str, Any] = field(default_factory=dict)


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.problems: list[str] = []  # what is broken
        self.phases: dict[str, Any] = {}
        self.start = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {text}", file=sys.stderr, flush=True)

    def row(self, row: Row) -> None:
        self.rows.append(row)
        self.log(f"{row.measure}: {row.value} (target {row.target}: {_met(row.met)})")

    def broken(self, phase: str, problem: str) -> None:
        self.problems.append(f"{phase}: {problem}")
        self.rows.append(Row(phase, "FAILED", "works", False, {"error": problem}))
        self.log(f"{phase}: FAILED: {problem}")

    def table(self) -> str:
        lines = ["| measure | value | target | met |", "|---|---|---|---|"]
        lines += [f"| {r.measure} | {r.value} | {r.target} | {_met(r.met)} |" for r in self.rows]
        return "\n".join(lines)


def _met(met: bool | None) -> str:
    return "—" if met is None else "yes" if met else "no"


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def fmt_lat(load: Load) -> str:
    return f"p50 {fmt_ms(load.p50_ms)}, p99 {fmt_ms(load.p99_ms)}"


def check_errors(load: Load) -> None:
    if load.errors:
        first = load.raw.get("first_error") or ""
        raise Broken(f"{load.errors} of {load.requests} requests failed (non-2xx or socket) {first}".strip())


# ---------------------------------------------------------------------------------------------
# Phases


class Bench:
    def __init__(self, plan: Plan, work: Path, use_wrk: bool) -> None:
        self.plan, self.work = plan, work
        self.report = Report()
        self.load = Loader(work, use_wrk)
        self.fake: Fake | None = None
        self._dbs = 0
        self.empty_outbox: Path | None = None  # an outbox the receiver created, emptied (phase f)

    def db(self) -> Path:
        self._dbs += 1
        return self.work / f"outbox-{self._dbs}.db"

    def receiver(self, name: str, *, db: Path | None = None, clickatell_url: str | None = None,
                 **dispatch: Any) -> Receiver:
        assert self.fake is not None
        return Receiver(self.work, name, db or self.db(), clickatell_url or self.fake.url, **dispatch)

    def phase(self, name: str, fn: Callable[[], None]) -> None:
        """Run one phase; a broken phase is reported and the others still run."""
        self.report.log(f"--- {name}")
        try:
            fn()
        except Broken as exc:
            self.report.broken(name, str(exc))
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, sqlite3.Error) as exc:
            self.report.broken(name, f"{type(exc).__name__}: {exc}")

    PHASES = ("accept", "end_to_end", "drain", "rss", "stored_rows")

    def run(self, only: tuple[str, ...] = PHASES) -> None:
        self.fake = Fake(self.work)
        for name in self.PHASES:
            if name in only:
                self.phase(name.replace("_", " "), getattr(self, name))

    # -- a, b: accept throughput vs the ceiling, then latency at fixed rates ----------------------

    def accept(self) -> None:
        """Each load against the ceiling and then against a fresh receiver, one after the other,
        so that both see the same machine: a shared machine's speed drifts by tens of percent
        over a few minutes, which measuring all of one and then all of the other would count."""
        p = self.plan
        assert self.fake is not None
        self.fake.reset(delay=CLICKATELL_DELAY)
        port = free_port()
        bare = Proc("bare.py", [PYTHON, str(BENCH / "bare.py"), str(port)], self.work / "bare.log")
        bare_url = f"http://127.0.0.1:{port}{WEBHOOK}"
        try:
            wait_until("bare.py", lambda: http("POST", bare_url, b"{}", timeout=1)[0] == 200, 30, bare)
            for alerts in (1, 10):
                ceiling: dict[int, Load] = {}
                got: dict[int, Load] = {}
                for c in p.connections:
                    ceiling[c] = self.load.closed(bare_url, alerts, p.throughput_s, c)
                    check_errors(ceiling[c])
                    # a fresh receiver each: no load plans the one before's backlog
                    r = self.receiver(f"accept-{alerts}-c{c}")
                    try:
                        got[c] = self.load.closed(r.url + WEBHOOK, alerts, p.throughput_s, c)
                        check_errors(got[c])
                        if c == p.connections[-1]:
                            self._throughput_row(alerts, got, ceiling)
                            if alerts == 10:  # the latency rows: on this receiver, planning its backlog
                                bare.stop()
                                self._latency_rows(r.url + WEBHOOK)
                    finally:
                        r.stop()
        finally:
            bare.stop()

    def _throughput_row(self, alerts: int, got: dict[int, Load], ceiling: dict[int, Load]) -> None:
        """Best rate against best rate: a durable receiver answers after an fdatasync, so at
        few connections it waits on the disk with CPU to spare; the ceiling never does."""
        best = max(got, key=lambda c: got[c].rate)
        best_ceiling = max(ceiling, key=lambda c: ceiling[c].rate)
        ratio = got[best].rate / ceiling[best_ceiling].rate * 100
        at = {c: got[c].rate / ceiling[c].rate * 100 for c in got}
        errors = sum(load.errors for load in got.values())
        self.report.phases[f"throughput_{alerts}"] = {
            "receiver": {c: asdict(load) for c, load in got.items()},
            "ceiling": {c: asdict(load) for c, load in ceiling.items()},
        }
        each = ", ".join(f"c{c} {at[c]:.0f} %" for c in sorted(at))
        self.report.row(Row(
            f"accept throughput, {alerts} alert{'s' if alerts > 1 else ''}/webhook "
            f"({got[best].tool}, best of {min(got)}–{max(got)} connections)",
            f"{got[best].rate:,.0f}/s (c{best}) = {ratio:.0f} % of ceiling {ceiling[best_ceiling].rate:,.0f}/s "
            f"(c{best_ceiling}); same connections: {each}; {errors} errors",
            "≥ 35 %, 0 errors", ratio >= 35 and errors == 0,
            {"rate": got[best].rate, "connections": best, "ceiling": ceiling[best_ceiling].rate,
             "ceiling_connections": best_ceiling, "ratio_pct": ratio, "errors": errors,
             "ratio_pct_at": at},
        ))

    def _latency_rows(self, url: str) -> None:
        p, rep = self.plan, self.report
        for rate in p.latency_rates:
            load = self.load.open(url, rate, p.latency_s, warmup=p.warmup_s)
            rep.phases[f"latency_{rate}"] = asdict(load)
            rep.row(Row(
                f"accept latency at {rate:,}/s (open loop)",
                f"{fmt_lat(load)}{self._generator_note(load, rate)}",
                "p99 ≤ 25 ms", load.p99_ms is not None and load.p99_ms <= 25,
                {"p50_ms": load.p50_ms, "p99_ms": load.p99_ms, **_gen(load)},
            ))
            check_errors(load)

    @staticmethod
    def _generator_note(load: Load, rate: int) -> str:
        """Say so when the generator could not keep its schedule: the latency then includes
        the generator's own (or the shared CPU's) delay."""
        achieved = load.raw.get("rate_achieved") or 0
        lag = load.raw.get("lag_p99_ms") or 0
        notes = []
        if achieved < 0.95 * rate:
            notes.append(f"sent {achieved:,.0f}/s")
        if lag > 5:
            notes.append(f"sender late by up to {lag:.0f} ms (p99)")
        return f" ({'; '.join(notes)})" if notes else ""

    # -- c: end-to-end latency ---------------------------------------------------------------------

    def end_to_end(self) -> None:
        p, rep = self.plan, self.report
        assert self.fake is not None
        self.fake.reset()
        records_file = self.work / "e2e-records.json"
        db = self.db()
        with self.receiver("e2e", db=db) as r:
            load = self.load.open(r.url + WEBHOOK, p.e2e_rate, p.e2e_s, records=records_file)
            check_errors(load)
            records = json.loads(records_file.read_text())
            fake = self.fake
            wait_until("the fake to receive every SMS", lambda: fake.accepted_requests() >= load.requests, 60,
                       r.proc, interval=0.1)
            received: dict[str, float] = {}
            sms: dict[str, int] = {}
            for m in fake.messages():
                found = TOKEN.search(m["content"])
                if found:
                    token = found.group(1)
                    # the last of its five recipients: the page is out once all five are
                    received[token] = max(received.get(token, 0.0), float(m["received_at"]))
                    sms[token] = sms.get(token, 0) + 1
        self.empty_outbox = self.work / "empty.db"  # for phase f; the receiver has stopped now
        empty_copy(db, self.empty_outbox)
        latencies = [(received[t] - answered) * 1000 for t, _status, answered in records if t in received]
        missing = [t for t, _s, _a in records if sms.get(t) != len(MEMBERS)]
        if missing:
            raise Broken(f"{len(missing)} of {len(records)} webhooks did not reach the fake as "
                         f"{len(MEMBERS)} SMS (first: {missing[0]})")
        p50, p99 = _pct(latencies, 50), _pct(latencies, 99)
        negative = sum(1 for v in latencies if v < 0)
        rep.phases["e2e"] = {"accept": asdict(load), "webhooks": len(records), "p50_ms": p50, "p99_ms": p99,
                             "max_ms": max(latencies), "min_ms": min(latencies), "negative": negative}
        rep.row(Row(
            f"end-to-end latency at {p.e2e_rate}/s (answered → at fake)",
            f"p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)} ({len(records)} webhooks, accept {fmt_lat(load)})",
            "p99 ≤ 100 ms", p99 <= 100, {"p50_ms": p50, "p99_ms": p99, **_gen(load)},
        ))

    # -- d: drain rate -----------------------------------------------------------------------------

    def drain(self) -> None:
        """Fill the outbox while Clickatell is unreachable (each message fails once and is put
        back an hour later), then reload the config pointing at the fake: the reload makes every
        pending message due at once, and the clock runs from the reload to the last SMS."""
        p, rep = self.plan, self.report
        assert self.fake is not None
        self.fake.reset()
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
        n = p.drain_webhooks
        with self.receiver("drain", clickatell_url=dead, retry_initial="1h", retry_max="1h") as r:
            fill = self.load.closed_count(r.url + WEBHOOK, n)
            check_errors(fill)

            def quiet() -> bool:  # every message tried once and back to pending
                tried = metric(r.metrics(), "sms_receiver_clickatell_requests_total")
                by_state = r.status()["outbox"]["byState"]
                return tried >= n and by_state.get("pending", 0) == n and not by_state.get("sending")

            wait_until("every message to fail once against the unreachable Clickatell", quiet, 120,
                       r.proc, interval=0.2)
            r.write_config(self.fake.url)
            start = time.time()
            status, body = http("POST", r.url + "/-/reload")
            if status != 200:
                raise Broken(f"/-/reload answered {status}: {body[:300]!r}")
            fake = self.fake
            wait_until(f"{n} requests at the fake", lambda: fake.accepted_requests() >= n, 120, r.proc,
                       interval=0.05)
            messages = fake.messages()
            # the receiver counts a send once it has Clickatell's answer, a moment after the fake
            # recorded it: give its count a few seconds to catch up (a mismatch is reported below)
            deadline = time.monotonic() + 10
            while (sent := metric(r.metrics(), "sms_receiver_sms_sent_total")) < len(messages) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
        last = max(float(m["received_at"]) for m in messages)
        seconds = last - start
        rate = len(messages) / seconds
        if len(messages) != n * len(MEMBERS) or sent != len(messages):
            raise Broken(f"expected {n * len(MEMBERS)} SMS, the fake has {len(messages)}, "
                         f"the receiver counted {sent:.0f}")
        rep.phases["drain"] = {"webhooks": n, "sms": len(messages), "seconds": seconds, "sms_per_s": rate,
                               "fill": asdict(fill)}
        rep.row(Row(
            "drain rate (backlog → fake, 5 recipients/request)",
            f"{rate:,.0f} SMS/s ({len(messages):,} SMS in {seconds:.2f} s)",
            "≥ 1,000 SMS/s", rate >= 1000, {"sms_per_s": rate},
        ))

    # -- e: peak RSS -------------------------------------------------------------------------------

    def rss(self) -> None:
        p, rep = self.plan, self.report
        assert self.fake is not None
        self.fake.reset(delay=CLICKATELL_DELAY)
        with self.receiver("rss") as r:
            # loadgen rather than wrk: an exact count (wrk only runs for a time)
            load = self.load.closed_count(r.url + WEBHOOK, p.rss_webhooks)
            check_errors(load)
            accepted = r.accepted()
            hwm, now = r.peak_rss_mb()
        if accepted != p.rss_webhooks:
            raise Broken(f"sent {p.rss_webhooks} webhooks, the receiver counted {accepted} accepted")
        rep.phases["rss"] = {"webhooks": accepted, "load": asdict(load), "vm_hwm_mb": hwm, "vm_rss_mb": now}
        rep.row(Row(
            f"peak RSS after {accepted:,} webhooks",
            f"{hwm:.0f} MB (VmHWM; now {now:.0f} MB; sent at {load.rate:,.0f}/s)",
            "≤ 100 MB", hwm <= 100, {"vm_hwm_mb": hwm},
        ))

    # -- f: latency with a small vs a large outbox ------------------------------------------------

    def stored_rows(self) -> None:
        p, rep = self.plan, self.report
        assert self.fake is not None
        # Each size starts from an empty outbox with the schema the receiver itself created (its
        # real migration path): the end-to-end phase's, emptied, or a fresh one made here.
        template = self.empty_outbox
        if template is None:
            template = self.db()
            with self.receiver("schema", db=template):
                pass
        results: dict[int, Load] = {}
        scrapes: dict[int, list[float]] = {}
        for rows in p.rows:
            db = self.db()
            shutil.copyfile(template, db)
            started = time.monotonic()
            prefill(db, rows)
            filled = time.monotonic()
            os.sync()  # the prefill's dirty pages written back now, not under the measured fsyncs
            self.report.log(f"pre-filled {rows:,} messages in {filled - started:.1f}s "
                            f"({db.stat().st_size / 1e6:,.0f} MB; written back in {time.monotonic() - filled:.1f}s)")
            self.fake.reset(delay=CLICKATELL_DELAY)
            try:
                with self.receiver(f"rows-{rows}", db=db) as r:
                    load = self.load.open(r.url + WEBHOOK, p.rows_rate, p.rows_s, warmup=p.warmup_s)
                    check_errors(load)
                    results[rows] = load
                    scrapes[rows] = scrape_times(r.url + "/metrics", 20)
                    counted = metric(r.metrics(), "sms_receiver_outbox_messages", state="sent")
                    if counted < rows:  # the gauges must count what is stored, not be fast and wrong
                        raise Broken(f"{rows:,} sent messages stored, /metrics counts {counted:,.0f}")
                load.raw["receiver_ready_s"], load.raw["receiver_stop_s"] = r.ready_s, r.stop_s
            finally:
                for suffix in ("", "-wal", "-shm", ".lock"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
        small, large = (results[n] for n in p.rows)
        ratio99 = (large.p99_ms or 0) / (small.p99_ms or 1e-9)
        ratio50 = (large.p50_ms or 0) / (small.p50_ms or 1e-9)
        rep.phases["rows"] = {str(n): asdict(load) for n, load in results.items()}
        for n, load in results.items():
            rep.row(Row(f"accept latency at {p.rows_rate}/s, {n:,} messages stored",
                        fmt_lat(load) + self._generator_note(load, p.rows_rate), "(next row)", None,
                        {"p50_ms": load.p50_ms, "p99_ms": load.p99_ms, **_gen(load)}))
        worst = scrapes[p.rows[1]]
        rep.phases["metrics_scrape_ms"] = {str(n): t for n, t in scrapes.items()}
        rep.row(Row(
            f"/metrics scrape, {p.rows[1]:,} messages stored",
            f"p50 {fmt_ms(_pct(worst, 50))}, max {fmt_ms(max(worst))} ({len(worst)} scrapes; "
            f"{p.rows[0]:,} stored: max {fmt_ms(max(scrapes[p.rows[0]]))})",
            "≤ 50 ms", max(worst) <= 50, {"max_ms": max(worst), "p50_ms": _pct(worst, 50)},
        ))
        rep.row(Row(
            f"latency growth {p.rows[0]:,} → {p.rows[1]:,} stored",
            f"p99 ×{ratio99:.2f}, p50 ×{ratio50:.2f}", "p99 ×≤ 1.5", ratio99 <= 1.5,
            {"p99_ratio": ratio99, "p50_ratio": ratio50},
        ))


def _pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile, as bench/loadgen.py computes it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else math.nan


def scrape_times(url: str, count: int) -> list[float]:
    """Milliseconds each of ``count`` sequential ``GET url`` took, answer read."""
    out = []
    for _ in range(count):
        started = time.perf_counter()
        status, _ = http("GET", url, timeout=30)
        out.append((time.perf_counter() - started) * 1000)
        if status != 200:
            raise Broken(f"GET {url}: HTTP {status}")
    return out


def _gen(load: Load) -> dict[str, Any]:
    """The generator's own health, to judge whether it limited the measurement."""
    return {k: load.raw.get(k) for k in ("rate_achieved", "lag_p99_ms", "generator_cpu", "connections_peak")}


# ---------------------------------------------------------------------------------------------
# Pre-filling an outbox offline


def empty_copy(src: Path, dst: Path) -> None:
    """A copy of the outbox ``src`` (stopped) with every table emptied: same schema, no rows."""
    with closing(sqlite3.connect(src)) as source, closing(sqlite3.connect(dst)) as copy:
        source.backup(copy)
    conn = sqlite3.connect(dst, isolation_level=None)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        for table in tables:
            if table == "message_states":  # the counts the triggers keep: zero, not gone
                conn.execute("UPDATE message_states SET n=0")
            else:
                conn.execute(f'DELETE FROM "{table}"')
        conn.execute("VACUUM")
    finally:
        conn.close()


def prefill(db: Path, messages: int, recipients: tuple[str, ...] = tuple(MEMBERS)) -> None:
    """Add ``messages`` finished (state 'sent') messages with their recipients to a closed outbox,
    as the receiver would have written them, created over the last 6 days (inside the default
    7-day retention, so pruning leaves them alone during the run).

    Rows are generated inside SQLite (a recursive CTE) rather than in Python, and the tables'
    indexes are dropped and rebuilt around the insert: 1M messages take ~30 s instead of minutes.
    Only the columns named here are written; the others keep their defaults."""
    now, span = time.time(), 6 * 86400.0
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # offline, nothing to protect
        conn.execute("PRAGMA cache_size=-500000")
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL "
            "AND tbl_name IN ('messages','recipients')"
        ).fetchall()
        for name, _sql in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute("BEGIN")
        conn.execute(
            """
            WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < :n - 1),
            t(i, ts) AS (SELECT i, :now - :span + :span * i / :n FROM seq)
            INSERT INTO messages(id, created_at, source, group_id, level, priority, status, text,
                encoding, parts, alert_count, state, attempts, next_attempt_at, updated_at,
                accepted_at, items)
            SELECT printf('%011x', CAST(ts * 1000 AS INTEGER)) || lower(hex(randomblob(8))), ts,
                'alertmanager', 'oncall', 'critical', 0, 'firing',
                printf('[CRITICAL] FIRING 1: Stored%09d web-1:9100 p99 latency above 2s', i),
                'GSM-7', 1, 1, 'sent', 1, ts + 0.2, ts + 0.2, ts + 0.2,
                printf('[["s%09d", "Stored%09d web-1:9100", "critical", 0, "firing"]]', i, i)
            FROM t
            """,
            {"n": messages, "now": now, "span": span},
        )
        numbers = ", ".join(f"('{n}')" for n in recipients)
        conn.execute(
            f"""
            INSERT INTO recipients(message_id, number, state, api_message_id, updated_at)
            SELECT m.id, n.column1, 'accepted', lower(hex(randomblob(16))), m.updated_at
            FROM messages m CROSS JOIN (VALUES {numbers}) n
            """
        )
        conn.execute("COMMIT")
        for _name, sql in indexes:
            conn.execute(sql)
    finally:
        conn.close()
    # Written with synchronous=OFF, the file is still dirty in the page cache: the receiver's
    # first checkpoint would fsync all of it in the middle of the measurement. Flush it now.
    with open(db, "rb+") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Main


def machine_info(use_wrk: bool) -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    wrk = shutil.which("wrk") if use_wrk else None
    wrk_version = ""
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
        wrk_version = (out.stdout + out.stderr).splitlines()[0] if (out.stdout + out.stderr) else ""
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True, timeout=10, check=False).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "load_generator": wrk_version or ("bench/loadgen.py (--no-wrk)" if shutil.which("wrk")
                                          else "bench/loadgen.py (wrk not found)"),
        "git": commit,
        "loadavg_start": os.getloadavg(),
    }


def _interrupted(signum: int, frame: object) -> None:
    # SIGTERM (a CI timeout, a kill) must still stop the children: the finally blocks do that.
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the receiver (see docs/PERFORMANCE.md).")
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds of every phase: checks the benchmark works, never fails on targets")
    parser.add_argument("--out", type=Path, help="JSON results (default: bench/results/latest.json, "
                        "with --smoke bench/results/smoke.json, so a smoke run never replaces a real one)")
    parser.add_argument("--no-wrk", action="store_true", help="use bench/loadgen.py even if wrk is installed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, outboxes)")
    parser.add_argument("--only", action="append", choices=Bench.PHASES,
                        help="run only this phase (repeatable; a partial run for development)")
    args = parser.parse_args()
    out: Path = args.out or BENCH / "results" / ("smoke.json" if args.smoke else "latest.json")

    signal.signal(signal.SIGTERM, _interrupted)
    plan = Plan.make(args.smoke)
    use_wrk = not args.no_wrk
    work = Path(tempfile.mkdtemp(prefix="sms-bench-"))
    info = machine_info(use_wrk)
    bench = Bench(plan, work, use_wrk)
    rep = bench.report
    rep.log(f"{'smoke' if plan.smoke else 'full'} run in {work}; {info['nproc']} CPUs, Python {info['python']}, "
            f"load: {info['load_generator']}; load average {info['loadavg_start'][0]:.2f}")
    try:
        bench.run(tuple(args.only or Bench.PHASES))
    except Broken as exc:  # the fake did not start: nothing else can run
        rep.broken("setup", str(exc))
    except KeyboardInterrupt:
        rep.broken("run", "interrupted")
    finally:
        stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    elapsed = time.monotonic() - rep.start

    missed = [r.measure for r in rep.rows if r.met is False and r.value != "FAILED"]
    print()
    print(rep.table())
    print()
    print(f"{'smoke' if plan.smoke else 'full'} run, {elapsed:.0f} s; nproc {info['nproc']} ({info['cpu']}), "
          f"Python {info['python']}, SQLite {info['sqlite']}, load: {info['load_generator']}, "
          f"load average {info['loadavg_start'][0]:.2f} → {info['loadavg_end'][0]:.2f}, git {info['git']}")
    if args.keep:
        print(f"logs and outboxes kept in {work}")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "mode": "smoke" if plan.smoke else "full",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(elapsed, 1),
        "machine": info,
        "plan": asdict(plan),
        "rows": [asdict(r) for r in rep.rows],
        "phases": rep.phases,
        "problems": rep.problems,
        "targets_missed": missed,
    }, indent=2, default=str) + "\n")
    print(f"results: {out}")

    if rep.problems:
        print("BROKEN:\n  " + "\n  ".join(rep.problems), file=sys.stderr)
        return 2
    if missed and not plan.smoke:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
