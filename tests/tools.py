"""Real processes for the tests: external tools (Debian's Alertmanager, promtool: required in
CI, skipped elsewhere), the receiver itself as a subprocess, and what its SQLite file holds once
it is dead."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import API_KEY, eventually
from tests.helpers import BASE, fixture

ROOT = Path(__file__).parent.parent
# Group "db" of BASE, as Clickatell sees its members (MSISDN, no "+"): alert_body pages both.
DB_MEMBERS = ("886911960999", "886911960998")


def need(binary: str, package: str = "prometheus prometheus-alertmanager") -> str:
    path = shutil.which(binary)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{binary} is required in CI (.ci/run installs it)")
    pytest.skip(f"{binary} is not installed (apt-get install {package})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until_ready(http: aiohttp.ClientSession, url: str, timeout: float = 20,
                      proc: subprocess.Popen[bytes] | None = None, log: Path | None = None,
                      path: str = "/-/ready") -> None:
    """Wait for ``GET {url}{path}`` to answer 200 (the receiver and Alertmanager both have it);
    fail at once, with the end of ``log``, should ``proc`` exit meanwhile."""

    async def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            raise AssertionError(f"the process exited with {proc.returncode}:\n{tail}")
        try:
            async with http.get(f"{url}{path}") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(ready, timeout=timeout)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def receiver_config(tmp_path: Path, clickatell_url: str, dispatch: dict[str, Any], **extra: Any) -> Path:
    """A config file for ``sms-receiver run``: BASE, an outbox in ``tmp_path``, the fake
    Clickatell at ``clickatell_url``, these dispatch settings, ``extra`` top-level keys."""
    path = tmp_path / "receiver.yaml"
    path.write_text(yaml.safe_dump({
        **BASE,
        "storage": f"sqlite://{tmp_path}/outbox.db",
        "clickatell": {"api_key": API_KEY, "base_url": clickatell_url, "timeout": "2s"},
        "dispatch": dispatch,
        **extra,
    }))
    return path


class ReceiverProcess:
    """`sms-receiver run` as a child process on 127.0.0.1, for kill -9 and end-to-end tests."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start it in a process group of its own (what kill9 kills), without waiting."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "receiver", "run", "--config", str(self.config),
                 "--listen", f"127.0.0.1:{self.port}"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        return self.proc

    async def start(self, http: aiohttp.ClientSession, env: dict[str, str] | None = None) -> None:
        await until_ready(http, self.url, proc=self.spawn(env), log=self.log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL to every process of the receiver (its process group)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def exited(self, timeout: float = 20) -> int:
        """Wait for the process to exit by itself; its exit status."""
        proc = self.proc
        assert proc is not None

        async def gone() -> bool:
            return proc.poll() is not None

        await eventually(gone, timeout=timeout)
        return proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc)


# ---------------------------------------------------------------------------------------------
# Payloads and the outbox file, for the crash tests


def alert_body(name: str, bulk: int = 0) -> bytes:
    """An Alertmanager notification of its own (alertname ``name``, its own group key and
    fingerprint: never a replay of another) that pages group "db" (both DB_MEMBERS).
    ``bulk``: that many more bytes, in an annotation the SMS text does not show."""
    body = json.loads(fixture("alertmanager-0.25-firing.json"))
    alert = body["alerts"][0]
    alert["labels"] = {"alertname": name, "team": "db", "severity": "warning", "instance": "db-1:9100"}
    if bulk:
        alert["annotations"]["description"] = "x" * bulk
    alert["fingerprint"] = name
    body["groupKey"] = f'{{}}:{{alertname="{name}"}}'
    body["groupLabels"] = {"alertname": name}
    body["commonLabels"] = dict(alert["labels"])
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Outbox:
    """What a receiver's SQLite file holds."""

    recorded: frozenset[tuple[str, str]]  # (message id, MSISDN) whose acceptance by Clickatell is recorded
    states: Counter[str]  # messages by state
    messages: frozenset[str]  # message ids
    notifications: frozenset[str]  # notification ids received and not planned yet

    @cached_property
    def _answered(self) -> frozenset[str]:
        # the ids the messages answer to: a notification's (its messages' ids are its 27
        # characters and 8 more), or a /send message's own
        return frozenset(m[:27] for m in self.messages)

    def holds(self, answered: str) -> bool:
        """Is what was answered (a notification id, a /send message id) in the file: not
        planned yet, or planned into messages?"""
        return answered in self.notifications or answered in self._answered


def read_outbox(db: Path) -> Outbox:
    """Read the SQLite file ``db`` of a receiver that is not running (killed, stopped).

    A copy of the file and its WAL is read, never the file itself: closing the last connection
    to a WAL database checkpoints it and deletes the WAL, and the next receiver must find the
    files exactly as the dead one left them (and recover them itself)."""
    with tempfile.TemporaryDirectory(prefix="outbox-copy-") as scratch:
        copy = Path(scratch) / db.name
        for suffix in ("", "-wal"):
            if Path(f"{db}{suffix}").exists():
                shutil.copyfile(f"{db}{suffix}", f"{copy}{suffix}")
        conn = sqlite3.connect(copy)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "recipients" not in tables:  # killed before its schema was committed
                return Outbox(frozenset(), Counter(), frozenset(), frozenset())
            recorded = frozenset(
                (mid, number.lstrip("+")) for mid, number in conn.execute(
                    "SELECT message_id, number FROM recipients "
                    "WHERE state IN ('accepted','delivered','undelivered')"))
            states = Counter(dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state")))
            messages = frozenset(r[0] for r in conn.execute("SELECT id FROM messages"))
            notifications = frozenset(r[0] for r in conn.execute("SELECT id FROM notifications"))
        finally:
            conn.close()
    return Outbox(recorded, states, messages, notifications)


