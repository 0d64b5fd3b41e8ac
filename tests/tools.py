"""Real external tools (Debian's Alertmanager, promtool): required in CI, skipped elsewhere."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


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
