"""Real processes for the tests: external tools (Debian's Alertmanager, promtool: required in
CI, skipped elsewhere) and the receiver itself as a subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import API_KEY, eventually
from tests.helpers import BASE

ROOT = Path(__file__).parent.parent


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{binary} is required in CI (.ci/run installs it)")
    pytest.skip(f"{binary} is not installed (apt-get install prometheus prometheus-alertmanager)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until_ready(http: aiohttp.ClientSession, url: str, timeout: float = 20) -> None:
    """Wait for ``GET {url}/-/ready`` to answer 200 (the receiver and Alertmanager both have it)."""

    async def ready() -> bool:
        try:
            async with http.get(f"{url}/-/ready") as r:
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
        proc = self.spawn(env)

        async def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the receiver exited with {proc.returncode}:\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            try:
                async with http.get(f"{self.url}/-/ready") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, timeout=20)

    def kill9(self) -> None:
        """SIGKILL to every process of the receiver (its process group)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc)


