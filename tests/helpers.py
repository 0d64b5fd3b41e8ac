"""Shared test helpers: fixture payloads and config building."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from receiver.config import Config, parse_config

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


BASE: dict[str, Any] = {
    "groups": [
        {"id": "db", "name": "DB on-call", "level": "warning",
         "members": ["+886911960999", "886911960998"]},
        {"id": "web", "name": "Web on-call", "level": "critical", "members": ["+14155550123"]},
        {"id": "info", "level": "info", "members": ["+4915112345678"], "send_resolved": False},
    ],
    "routes": [
        {"matchers": ['team="db"'], "groups": ["db"]},
        {"matchers": ['alertname=~"Disk.*"'], "groups": ["db"], "continue": True},
        {"matchers": ['job="node"'], "groups": ["web"]},
    ],
    "default_groups": ["info"],
    # Flood control off: these tests page the same numbers many times a second on purpose.
    # tests/test_paging*.py turn it on.
    "paging": {"throttle": []},
    # Closed by default: these tests post on 127.0.0.1 without credentials on purpose (a test
    # that sets credentials replaces the section). Admin endpoints answer loopback without them.
    "webhook_auth": {"allow_unauthenticated": True},
    "callbacks": {"allow_unauthenticated": True},
}


def make_config(env: dict[str, str] | None = None, base_dir: Path = FIXTURES, **overrides: Any) -> Config:
    """A valid config: BASE with top-level keys replaced by ``overrides``."""
    doc = {**BASE, **overrides}
    return parse_config(yaml.safe_dump(doc), env=env or {}, base_dir=base_dir)
