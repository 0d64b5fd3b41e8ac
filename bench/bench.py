"""The receiver's benchmark: accept throughput and latency, end-to-end latency, drain rate, memory,
and latency against a large outbox. What each row measures and why: docs/PERFORMANCE.md.

    python bench/bench.py [--smoke] [--out FILE] [--no-wrk] [--keep] [--backend sqlite|postgresql]
    (or: bench/run …)

Everything runs as subprocesses on free 127.0.0.1 ports: the fake Clickatell, the receiver (fresh
outbox per phase), bench/bare.py (the ceiling), wrk or bench/loadgen.py (the load). With
``--backend postgresql`` the outbox is a fresh database per phase on a PostgreSQL cluster the
benchmark starts for itself (tests/pg.py: its own directory, a free port, fsync on) and stops at
the end; the accept phase also runs two replicas side by side on one database.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Self

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
    backend: str = "sqlite"  # the outbox: sqlite, or postgresql (its own rates and targets)
    e2e_p99_ms: float = 100.0  # target of the end-to-end row

    @classmethod
    def make(cls, smoke: bool, backend: str = "sqlite") -> Plan:
        if smoke:
            plan = cls(True, 0.5, (128, 32), 0.5, (100, 1000), 200, 0.5, 100, 1_000, (1_000, 10_000), 200, 0.5, 0.2)
        else:
            plan = cls(False, 5.0, (256, 128, 64, 32), 5.0, (100, 1000), 200, 5.0, 2_000, 100_000,
                       (10_000, 1_000_000), 200, 3.0, 1.0)
        if backend == "postgresql":  # a network round trip per commit: its own rate and targets
            plan = replace(plan, backend=backend, latency_rates=(500,), e2e_p99_ms=200.0)
        return plan


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


def stop_all(keep: bool = False) -> None:
    """Every process the benchmark started: the receivers and loads first, the clusters (which
    the receivers use until they stop) last."""
    for proc in list(reversed(_live)):
        proc.stop(grace=5)
    for cluster in list(reversed(_clusters)):
        cluster.stop(keep)


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


class Cluster:
    """A PostgreSQL cluster of the benchmark's own, started by tests/pg.py (as the tests start
    theirs: initdb in a new directory, 127.0.0.1 on a free port, fsync and synchronous_commit on;
    as root it runs as the ``postgres`` user). Every phase gets a database of its own. Stopped
    by :meth:`stop` (the run's ``finally``: also on Ctrl-C and SIGTERM), whatever state the start
    got to."""

    def __init__(self) -> None:
        # only in PostgreSQL mode: tests/pg.py is what the tests start theirs with
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from tests import pg

        self.bin = pg.binaries()
        if self.bin is None:
            raise Broken("PostgreSQL is not installed (apt-get install postgresql): "
                         "--backend postgresql starts a cluster of its own")
        # Its own directory, not under the run's (mkdtemp's 0700 would keep the postgres user out)
        self.dir = Path(tempfile.mkdtemp(prefix="sms-bench-pg-"))
        # Known before the start, so that stop() works whatever point an interruption came at
        self.server = pg.Server(self.dir, free_port(), self.bin)
        _clusters.append(self)
        started = time.monotonic()
        try:
            self.server = pg.start(self.dir, self.server.port)
            self.version = self.server.psql("SHOW server_version").split()[0]
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            raise Broken(f"PostgreSQL did not start: {exc}") from None
        self.start_s = time.monotonic() - started

    def database(self) -> str:
        """A new, empty database: its URL."""
        try:
            url = self.server.database("bench")
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            raise Broken(f"PostgreSQL: cannot create a database: {exc}") from None
        return url

    def drop(self, url: str) -> None:
        """Drop a phase's database once its receivers have stopped: its tables' autovacuum
        does not run in the middle of a later phase."""
        name = url.rsplit("/", 1)[1]
        try:
            self.server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except (RuntimeError, OSError, subprocess.SubprocessError):
            pass  # only tidiness: the cluster goes at the end

    def stop(self, keep: bool = False) -> None:
        if self in _clusters:
            _clusters.remove(self)
        if (self.server.data / "postmaster.pid").exists():
            self.server.stop("fast")
            if self.server.running():
                self.server.stop("immediate")
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


_clusters: list[Cluster] = []


def receiver_config(port: int, storage: str, clickatell_url: str, **dispatch: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "storage": storage,  # sqlite:///tmp/… (an absolute path) or postgresql://…
        "log_format": "text",
        "webhook_auth": {"allow_unauthenticated": True},  # on 127.0.0.1, like the quickstart
        "clickatell": {"api_key": "bench-key", "base_url": clickatell_url},
        "paging": {"throttle": []},  # flood control would hold back repeated pages to one phone
        "groups": [{"id": "oncall", "name": "Bench on-call", "level": "info", "members": MEMBERS}],
        "default_groups": ["oncall"],
        "dispatch": dict(dispatch),  # its defaults (concurrency 8) unless a phase sets one
    }


class Receiver:
    """``python -m receiver run`` on a config of its own (JSON is YAML)."""

    def __init__(self, work: Path, name: str, storage: str, clickatell_url: str, **dispatch: Any) -> None:
        self.name, self.storage, self.port = name, storage, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_s, self.stop_s = 0.0, 0.0  # start-up and shut-down times, for the record
        self.faults: dict[str, float] | None = None  # its error counters, read just before it stops
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
        cfg = receiver_config(self.port, self.storage, clickatell_url, **dispatch)
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

    def read_faults(self) -> dict[str, float] | None:
        """What went wrong inside it that the load generator may not see (a failed planning or
        claim is retried, not answered): its outbox's failed operations, claims it took over
        from a lease that ran out, webhooks answered 503. None if it cannot be asked."""
        if self.faults is None and self.proc.alive():
            try:
                text = self.metrics()
            except (Broken, OSError, ValueError):
                return None
            self.faults = {
                "store_errors": metric(text, "sms_receiver_store_errors_total"),
                "claims_taken_over": metric(text, "sms_receiver_claims_taken_over_total"),
                "webhooks_store_error": metric(text, "sms_receiver_webhooks_received_total",
                                               outcome="store_error"),
            }
        return self.faults

    def stop(self) -> None:
        self.read_faults()
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


def summed(loads: list[Load]) -> Load:
    """Loads that ran at the same time against different servers, as one: their rates added
    (each over its own duration), their latency percentiles the worst of them."""
    rate = sum(load.rate for load in loads)
    ok = sum(load.ok for load in loads)
    p50 = [load.p50_ms for load in loads if load.p50_ms is not None]
    p99 = [load.p99_ms for load in loads if load.p99_ms is not None]
    return Load(f"{len(loads)} × {loads[0].tool}", sum(load.requests for load in loads), ok,
                sum(load.errors for load in loads), ok / rate if rate else 0.0,
                max(p50) if p50 else None, max(p99) if p99 else None)


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

    def closed_side_by_side(self, urls: list[str], alerts: int, seconds: float,
                            connections: list[int]) -> list[Load]:
        """One closed-loop load per URL, all at once (separate processes, started together):
        ``connections[i]`` connections to ``urls[i]`` for ``seconds``."""
        if self.wrk:
            secs = max(1, round(seconds))
            argvs = [self._wrk_argv(url, alerts, secs, c) for url, c in zip(urls, connections, strict=True)]
        else:
            secs = seconds
            argvs = [[PYTHON, str(BENCH / "loadgen.py"), "--url", url, "--body", str(self.bodies[alerts]),
                      "--nonce", self.nonce(), "--connections", str(c), "--duration", str(seconds)]
                     for url, c in zip(urls, connections, strict=True)]
        procs: list[subprocess.Popen[str]] = []
        try:
            for argv in argvs:
                procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              stdin=subprocess.DEVNULL, text=True, cwd=REPO))
            outs = [proc.communicate(timeout=secs + 300) for proc in procs]
        except BaseException:
            for proc in procs:
                proc.kill()
                proc.wait()
            raise
        loads = []
        for proc, (stdout, stderr) in zip(procs, outs, strict=True):
            if self.wrk:
                loads.append(self._wrk_result(proc.returncode, stdout, stderr))
            else:
                if proc.returncode != 0:
                    raise Broken(f"loadgen failed ({proc.returncode}): {stderr[-800:]}")
                loads.append(self._loadgen_result(dict(json.loads(stdout.strip().splitlines()[-1])), seconds))
        return loads

    def _wrk_argv(self, url: str, alerts: int, seconds: int, connections: int) -> list[str]:
        assert self.wrk
        return [self.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                "-s", str(BENCH / "unique.lua"), url, "--", str(self.bodies[alerts]), self.nonce()]

    def _wrk(self, url: str, alerts: int, seconds: int, connections: int) -> Load:
        run = subprocess.run(self._wrk_argv(url, alerts, seconds, connections), capture_output=True, text=True,
                             timeout=seconds + 60, cwd=REPO, check=False)
        return self._wrk_result(run.returncode, run.stdout, run.stderr)

    @staticmethod
    def _wrk_result(returncode: int, stdout: str, stderr: str) -> Load:
        found = re.search(r"^BENCH (.*)$", stdout, re.MULTILINE)
        if returncode != 0 or not found:
            raise Broken(f"wrk failed ({returncode}): {stdout[-500:]} {stderr[-500:]}")
        raw: dict[str, Any] = {k: int(v) for k, v in (kv.split("=") for kv in found.group(1).split())}
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout)
        raw["errors_socket"] = sum(int(n) for n in sock.groups()) if sock else 0
        raw["errors_read_write"] = int(sock.group(2)) + int(sock.group(3)) if sock else 0
        errors = raw["errors_status"] + raw["errors_socket"]
        return Load("wrk", raw["requests"], raw["requests"] - raw["errors_status"], errors,
                    raw["duration_us"] / 1e6, raw["p50_us"] / 1000, raw["p99_us"] / 1000, raw)

    def _loadgen_load(self, args: list[str], seconds: float) -> Load:
        return self._loadgen_result(self._loadgen(args, seconds), seconds)

    @staticmethod
    def _loadgen_result(raw: dict[str, Any], seconds: float) -> Load:
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
    def __init__(self, plan: Plan, work: Path, use_wrk: bool, keep: bool = False) -> None:
        self.plan, self.work, self.keep = plan, work, keep
        self.report = Report()
        self.load = Loader(work, use_wrk)
        self.fake: Fake | None = None
        self.cluster: Cluster | None = None  # --backend postgresql
        self.receivers: list[Receiver] = []  # every one started: their faults, for the errors row
        self.loads: list[Load] = []  # every load against a receiver: their errors, idem
        self._dbs = 0
        self.empty_outbox: Path | None = None  # an outbox the receiver created, emptied (phase f)

    @property
    def postgresql(self) -> bool:
        return self.plan.backend == "postgresql"

    def db(self) -> Path:
        self._dbs += 1
        return self.work / f"outbox-{self._dbs}.db"

    def outbox(self) -> str:
        """A fresh outbox's ``storage``: a new SQLite file, or a new database on the cluster."""
        if self.cluster is not None:
            return self.cluster.database()
        return f"sqlite://{self.db()}"  # absolute: sqlite:///tmp/…

    def done_with(self, storage: str) -> None:
        """A phase's outbox once its receivers have stopped (PostgreSQL: dropped, unless --keep)."""
        if self.cluster is not None and not self.keep:
            self.cluster.drop(storage)

    def receiver(self, name: str, *, db: Path | None = None, storage: str | None = None,
                 clickatell_url: str | None = None, **dispatch: Any) -> Receiver:
        assert self.fake is not None
        if db is not None:
            storage = f"sqlite://{db}"
        r = Receiver(self.work, name, storage or self.outbox(), clickatell_url or self.fake.url, **dispatch)
        self.receivers.append(r)
        return r

    def counted(self, load: Load) -> Load:
        """A load against a receiver, kept for the errors row."""
        self.loads.append(load)
        return load

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
    SQLITE_ONLY: ClassVar[dict[str, str]] = {
        "rss": "peak RSS", "stored_rows": "latency and /metrics against 1,000,000 stored messages"}

    def run(self, only: tuple[str, ...] = PHASES) -> None:
        self.fake = Fake(self.work)
        if self.postgresql:
            self.cluster = Cluster()
            self.report.log(f"PostgreSQL {self.cluster.version} on 127.0.0.1:{self.cluster.server.port} "
                            f"(started in {self.cluster.start_s:.1f}s, {self.cluster.dir})")
        skipped = []
        for name in self.PHASES:
            if name not in only:
                continue
            if self.postgresql and name in self.SQLITE_ONLY:
                skipped.append(self.SQLITE_ONLY[name])
                continue
            self.phase(name.replace("_", " "), getattr(self, name))
        if self.postgresql:
            self._errors_row()
        if skipped:
            self.report.row(Row("skipped with --backend postgresql (SQLite rows)", "; ".join(skipped),
                                "—", None))

    # -- a, b: accept throughput vs the ceiling, then latency at fixed rates ----------------------

    def accept(self) -> None:
        """Each load against the ceiling and then against a fresh receiver, one after the other,
        so that both see the same machine: a shared machine's speed drifts by tens of percent
        over a few minutes, which measuring all of one and then all of the other would count."""
        if self.postgresql:
            self.accept_replicas()
            return
        p = self.plan
        assert self.fake is not None
        self.fake.reset(delay=CLICKATELL_DELAY)
        bare, bare_url = self._bare()
        try:
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

    def _bare(self) -> tuple[Proc, str]:
        """The ceiling (bench/bare.py) started and answering; its webhook URL. The caller stops it."""
        port = free_port()
        bare = Proc("bare.py", [PYTHON, str(BENCH / "bare.py"), str(port)], self.work / "bare.log")
        url = f"http://127.0.0.1:{port}{WEBHOOK}"
        try:
            wait_until("bare.py", lambda: http("POST", url, b"{}", timeout=1)[0] == 200, 30, bare)
        except BaseException:
            bare.stop()
            raise
        return bare, url

    def accept_replicas(self) -> None:
        """PostgreSQL: at each connection count, the ceiling, then one receiver on a fresh
        database, then two receivers on one fresh database, each under half the connections
        (two wrk processes at once, their rates summed). 1 alert/webhook; no target: on two
        cores the receivers, wrk and PostgreSQL share the CPU, so this is what it is here."""
        p = self.plan
        assert self.fake is not None
        self.fake.reset(delay=CLICKATELL_DELAY)
        bare, bare_url = self._bare()
        ceiling: dict[int, Load] = {}
        one: dict[int, Load] = {}
        two: dict[int, Load] = {}
        parts: dict[int, list[Load]] = {}
        latency: list[Row] = []  # added after the throughput rows, as with SQLite
        try:
            for c in p.connections:
                ceiling[c] = self.load.closed(bare_url, 1, p.throughput_s, c)
                check_errors(ceiling[c])
                storage = self.outbox()
                r = self.receiver(f"accept-1x-c{c}", storage=storage)
                try:
                    one[c] = self.counted(self.load.closed(r.url + WEBHOOK, 1, p.throughput_s, c))
                    check_errors(one[c])
                    if c == p.connections[-1]:  # the latency rows: on this receiver, planning its backlog
                        bare.stop()
                        self._latency_rows(r.url + WEBHOOK, latency)
                finally:
                    r.stop()
                    self.done_with(storage)
                storage = self.outbox()
                pair: list[Receiver] = []
                try:
                    for side in "ab":
                        pair.append(self.receiver(f"accept-2x{side}-c{c}", storage=storage))
                    split = [c // 2, c - c // 2]
                    parts[c] = [self.counted(load) for load in self.load.closed_side_by_side(
                        [x.url + WEBHOOK for x in pair], 1, p.throughput_s, split)]
                    for load in parts[c]:
                        check_errors(load)
                    two[c] = summed(parts[c])
                finally:
                    for x in pair:
                        x.read_faults()  # both asked before either stops: none takes over the other's claims
                    for x in pair:
                        x.stop()
                    self.done_with(storage)
        finally:
            bare.stop()
        self._throughput_row(1, one, ceiling, label="1 replica", target=False)
        self.report.phases["throughput_1_two_replicas_parts"] = {
            c: [asdict(load) for load in loads] for c, loads in parts.items()}
        best_one = max(one.values(), key=lambda load: load.rate)
        self._throughput_row(1, two, ceiling, label="2 replicas on one database, load split in two",
                             target=False, key="throughput_1_two_replicas",
                             extra=lambda best: (f"; {parts[best][0].rate:,.0f}/s + {parts[best][1].rate:,.0f}/s"
                                                 f" at c{best // 2}+c{best - best // 2}; "
                                                 f"×{two[best].rate / best_one.rate:.2f} of 1 replica"))
        for row in latency:
            self.report.row(row)

    def _throughput_row(self, alerts: int, got: dict[int, Load], ceiling: dict[int, Load], *,
                        label: str = "", target: bool = True, key: str = "",
                        extra: Callable[[int], str] | None = None) -> None:
        """Best rate against best rate: a durable receiver answers after an fdatasync, so at
        few connections it waits on the disk with CPU to spare; the ceiling never does."""
        best = max(got, key=lambda c: got[c].rate)
        best_ceiling = max(ceiling, key=lambda c: ceiling[c].rate)
        ratio = got[best].rate / ceiling[best_ceiling].rate * 100
        at = {c: got[c].rate / ceiling[c].rate * 100 for c in got}
        errors = sum(load.errors for load in got.values())
        self.report.phases[key or f"throughput_{alerts}"] = {
            "receiver": {c: asdict(load) for c, load in got.items()},
            "ceiling": {c: asdict(load) for c, load in ceiling.items()},
        }
        each = ", ".join(f"c{c} {at[c]:.0f} %" for c in sorted(at))
        self.report.row(Row(
            f"accept throughput, {alerts} alert{'s' if alerts > 1 else ''}/webhook"
            f"{', ' + label if label else ''} ({got[best].tool}, best of {min(got)}–{max(got)} connections)",
            f"{got[best].rate:,.0f}/s (c{best}) = {ratio:.0f} % of ceiling {ceiling[best_ceiling].rate:,.0f}/s "
            f"(c{best_ceiling}){extra(best) if extra else ''}; same connections: {each}; {errors} errors",
            "≥ 35 %, 0 errors" if target else "none (reported)",
            (ratio >= 35 and errors == 0) if target else None,
            {"rate": got[best].rate, "connections": best, "ceiling": ceiling[best_ceiling].rate,
             "ceiling_connections": best_ceiling, "ratio_pct": ratio, "errors": errors,
             "ratio_pct_at": at},
        ))

    def _latency_rows(self, url: str, later: list[Row] | None = None) -> None:
        """One row per fixed rate; into ``later`` (if given, and the load had no error) for the
        caller to add after rows it has yet to make."""
        p, rep = self.plan, self.report
        for rate in p.latency_rates:
            load = self.counted(self.load.open(url, rate, p.latency_s, warmup=p.warmup_s))
            rep.phases[f"latency_{rate}"] = asdict(load)
            row = Row(
                f"accept latency at {rate:,}/s (open loop)",
                f"{fmt_lat(load)}{self._generator_note(load, rate)}",
                "p99 ≤ 25 ms", load.p99_ms is not None and load.p99_ms <= 25,
                {"p50_ms": load.p50_ms, "p99_ms": load.p99_ms, **_gen(load)},
            )
            if later is None or load.errors:
                rep.row(row)
            else:
                later.append(row)
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
        db = None if self.postgresql else self.db()
        storage = f"sqlite://{db}" if db is not None else self.outbox()
        with self.receiver("e2e", storage=storage) as r:
            load = self.counted(self.load.open(r.url + WEBHOOK, p.e2e_rate, p.e2e_s, records=records_file))
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
        if db is not None:
            self.empty_outbox = self.work / "empty.db"  # for phase f; the receiver has stopped now
            empty_copy(db, self.empty_outbox)
        self.done_with(storage)
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
            f"p99 ≤ {p.e2e_p99_ms:.0f} ms", p99 <= p.e2e_p99_ms, {"p50_ms": p50, "p99_ms": p99, **_gen(load)},
        ))

    # -- PostgreSQL: errors over every phase ---------------------------------------------------------

    def _errors_row(self) -> None:
        """HTTP errors of every load against a receiver (each also breaks its phase), and what
        each receiver counted just before it stopped: failed outbox operations (a planning or
        claim that failed is retried, invisible to the load), claims taken over."""
        requests = sum(load.requests for load in self.loads)
        http_errors = sum(load.errors for load in self.loads)
        faults = [r.faults for r in self.receivers if r.faults is not None]
        unread = sum(1 for r in self.receivers if r.faults is None)
        store = sum(f["store_errors"] for f in faults)
        taken = sum(f["claims_taken_over"] for f in faults)
        answered_503 = sum(f["webhooks_store_error"] for f in faults)
        self.report.phases["errors"] = {"requests": requests, "http_errors": http_errors, "store_errors": store,
                                        "claims_taken_over": taken, "webhooks_store_error": answered_503,
                                        "receivers": len(self.receivers), "receivers_unread": unread}
        total = http_errors + store + taken
        self.report.row(Row(
            "errors, every phase above (webhooks; outbox operations; claims taken over)",
            f"{http_errors:,} of {requests:,} webhooks non-2xx or socket error ({answered_503:.0f} answered 503); "
            f"{store:.0f} failed outbox operations, {taken:.0f} claims taken over "
            f"(sms_receiver_store_errors_total, sms_receiver_claims_taken_over_total, {len(faults)} receivers"
            f"{f'; {unread} could not be read' if unread else ''})",
            "0", total == 0 and unread == 0, {"total": total, "unread": unread},
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
        storage = self.outbox()
        with self.receiver("drain", storage=storage, clickatell_url=dead, retry_initial="1h",
                           retry_max="1h") as r:
            fill = self.counted(self.load.closed_count(r.url + WEBHOOK, n))
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
        self.done_with(storage)
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
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the outbox: SQLite files (default), or databases on a PostgreSQL cluster the "
                        "benchmark starts and stops itself (its own rows and targets)")
    args = parser.parse_args()
    suffix = "" if args.backend == "sqlite" else f"-{args.backend}"
    out: Path = args.out or BENCH / "results" / (f"smoke{suffix}.json" if args.smoke else f"latest{suffix}.json")

    signal.signal(signal.SIGTERM, _interrupted)
    plan = Plan.make(args.smoke, args.backend)
    use_wrk = not args.no_wrk
    work = Path(tempfile.mkdtemp(prefix="sms-bench-"))
    info = machine_info(use_wrk)
    info["backend"] = args.backend
    bench = Bench(plan, work, use_wrk, keep=args.keep)
    rep = bench.report
    rep.log(f"{'smoke' if plan.smoke else 'full'} run in {work}; {info['nproc']} CPUs, Python {info['python']}, "
            f"load: {info['load_generator']}; outbox: {args.backend}; "
            f"load average {info['loadavg_start'][0]:.2f}")
    try:
        bench.run(tuple(args.only or Bench.PHASES))
    except Broken as exc:  # the fake or the cluster did not start: nothing else can run
        rep.broken("setup", str(exc))
    except KeyboardInterrupt:
        rep.broken("run", "interrupted")
    finally:
        try:
            stop_all(args.keep)  # the cluster too; a second Ctrl-C here must not leave it running
        except KeyboardInterrupt:
            stop_all(args.keep)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if bench.cluster is not None:
        info["postgresql"] = bench.cluster.version
    info["loadavg_end"] = os.getloadavg()
    elapsed = time.monotonic() - rep.start

    missed = [r.measure for r in rep.rows if r.met is False and r.value != "FAILED"]
    print()
    print(rep.table())
    print()
    outbox = f"SQLite {info['sqlite']}"
    if plan.backend == "postgresql":
        outbox = f"PostgreSQL {info['postgresql']} (fsync on)" if "postgresql" in info else "PostgreSQL (not started)"
    print(f"{'smoke' if plan.smoke else 'full'} run, {elapsed:.0f} s; nproc {info['nproc']} ({info['cpu']}), "
          f"Python {info['python']}, {outbox}, load: {info['load_generator']}, "
          f"load average {info['loadavg_start'][0]:.2f} → {info['loadavg_end'][0]:.2f}, git {info['git']}")
    if args.keep:
        print(f"logs and outboxes kept in {work}"
              + (f"; the PostgreSQL cluster's data (stopped) in {bench.cluster.dir}" if bench.cluster else ""))

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "mode": "smoke" if plan.smoke else "full",
        "backend": plan.backend,
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
