"""Slow-connection flood: N connections from 127.0.0.1 that send request headers only (no end of
headers, never a body), against a real ``sms-receiver run``; meanwhile, and after, a legitimate
webhook on a new connection every 0.5 s. Prints the webhooks' latencies and what the listener
closed. tests/test_listener.py does the same with a few thousand connections; this is the run at
20,000 that issue #20 asks for.

    python bench/slow_connections.py [--connections 20000] [--header-timeout 10s]

File descriptors: the script raises its soft RLIMIT_NOFILE to the hard limit (the receiver, its
child, inherits it), sets the receiver's server.max_connections 400 below that limit (its outbox,
client and pipes need some), and opens the flood from two worker processes, each under its own
limit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = (ROOT / "tests" / "fixtures" / "alertmanager-0.25-firing.json").read_bytes()
TOKEN = "bench-token"
HEADERS_ONLY = b"POST /webhook/alertmanager HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def flood(port: int, n: int, opened: mp.Value, stop: mp.Event) -> None:  # type: ignore[valid-type]
    """A worker: open ``n`` header-only connections, then hold them until told to stop."""
    raise_fd_limit()
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(HEADERS_ONLY)
        except OSError:
            continue  # refused or reset: the listener at work, counted on its side
        socks.append(s)
        with opened.get_lock():
            opened.value += 1
    stop.wait(600)
    for s in socks:
        s.close()


def webhook(port: int) -> float:
    """Seconds for one webhook on a new connection (raises on any failure)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/webhook/alertmanager", body=PAYLOAD,
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")
    finally:
        conn.close()
    return time.perf_counter() - started


def closed_counts(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {m[1]: float(m[2]) for m in re.finditer(
        r'sms_receiver_http_connections_closed_total\{reason="(\w+)"\} (\S+)', text)}
    out["open"] = float(re.search(r"^sms_receiver_http_connections (\S+)", text, re.M)[1])  # type: ignore[index]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=20_000, help="stalled connections to open")
    ap.add_argument("--header-timeout", default="10s", help="the receiver's server.header_timeout")
    args = ap.parse_args()
    limit = raise_fd_limit()
    cap = limit - 400
    tmp = Path(tempfile.mkdtemp(prefix="slow-conn-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "config.yaml").write_text(json.dumps({
        "storage": f"sqlite://{tmp}/outbox.db", "webhook_auth": {"bearer_tokens": [TOKEN]},
        "groups": [{"id": "ops", "members": ["+886911960999"]}], "default_groups": ["ops"],
        "server": {"max_connections": cap, "header_timeout": args.header_timeout},
    }))
    log = open(tmp / "receiver.log", "w")  # noqa: SIM115 (closed below)
    receiver = subprocess.Popen([sys.executable, "-m", "receiver", "run", "--config", str(tmp / "config.yaml"),
                                 "--listen", f"127.0.0.1:{port}"], cwd=ROOT, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                webhook(port)
                break
            except OSError:
                if time.monotonic() > deadline or receiver.poll() is not None:
                    raise SystemExit(f"the receiver did not start: see {tmp / 'receiver.log'}") from None
                time.sleep(0.2)
        print(f"fd limit {limit}; receiver server.max_connections {cap}; {args.connections} stalled "
              f"connections from 2 processes; header_timeout {args.header_timeout}")
        opened, stop = mp.Value("i", 0), mp.Event()
        workers = [mp.Process(target=flood, args=(port, n, opened, stop))
                   for n in (args.connections // 2, args.connections - args.connections // 2)]
        latencies: list[tuple[str, float]] = []
        failures: list[str] = []
        done = threading.Event()

        def probe() -> None:
            while not done.wait(0.5):
                phase = "during flood" if opened.value < args.connections else "after flood"
                try:
                    latencies.append((phase, webhook(port)))
                except (OSError, RuntimeError) as exc:
                    failures.append(f"{phase}: {exc!r}")

        started = time.monotonic()
        for w in workers:
            w.start()
        prober = threading.Thread(target=probe)
        prober.start()
        while any(w.is_alive() for w in workers) and opened.value < args.connections:
            time.sleep(0.2)
        flood_s = time.monotonic() - started
        time.sleep(5)  # keep probing with every stalled connection open
        done.set()
        prober.join()
        counts = closed_counts(port)
        stop.set()
        for w in workers:
            w.join(30)
        print(f"opened {opened.value} stalled connections in {flood_s:.1f}s")
        for phase in ("during flood", "after flood"):
            xs = sorted(t for p, t in latencies if p == phase)
            if xs:
                print(f"webhook latency {phase}: n={len(xs)} median={statistics.median(xs) * 1000:.1f}ms "
                      f"max={xs[-1] * 1000:.1f}ms")
        print(f"webhooks failed: {len(failures)}" + (f" ({failures[:3]})" if failures else ""))
        print("listener closed: " + ", ".join(f"{k}={v:.0f}" for k, v in counts.items()))
        return 1 if failures or any(t >= 1.0 for _, t in latencies) else 0
    finally:
        receiver.send_signal(signal.SIGTERM)
        try:
            receiver.wait(60)
        except subprocess.TimeoutExpired:
            receiver.kill()
        log.close()
        if os.environ.get("KEEP_LOG"):
            print(f"receiver log: {tmp / 'receiver.log'}")


if __name__ == "__main__":
    sys.exit(main())
