"""Fixtures: the project's fake Clickatell and the receiver, each a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from receiver.app import Receiver
from fake_clickatell import FakeState
from fake_clickatell import create_app as create_fake_app
from receiver.web import create_app
from tests.helpers import make_config

API_KEY = "lPe91jCqTwGbErZ6OFeXjQ=="


@dataclass
class Fake:
    url: str
    state: FakeState

    async def messages(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with http.get(f"{self.url}/_fake/messages") as resp:
            return await resp.json()

    async def mode(self, http: aiohttp.ClientSession, **mode: Any) -> None:
        async with http.post(f"{self.url}/_fake/mode", json=mode) as resp:
            assert resp.status == 200, await resp.text()


@dataclass
class Running:
    receiver: Receiver
    url: str


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def planned(http: aiohttp.ClientSession, base_url: str, answer: dict[str, Any],
                  headers: dict[str, str] | None = None) -> list[str]:
    """The ids of the messages planned from an accepted webhook (``answer``: its JSON), once
    the planner has made them (at least one)."""
    ids: list[str] = []

    async def made() -> bool:
        nonlocal ids
        async with http.get(f"{base_url}/api/v1/messages", headers=headers,
                            params={"notification": answer["notification"]}) as r:
            ids = [m["id"] for m in (await r.json())["messages"]]
        return bool(ids)

    await eventually(made)
    return ids


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def fake(aiohttp_server) -> Fake:
    state = FakeState(api_keys=None)
    server = await aiohttp_server(create_fake_app(state), host="127.0.0.1")
    return Fake(str(server.make_url("")).rstrip("/"), state)


def _settle(receiver: Receiver) -> Any:
    """Plan what a webhook stored before its answer leaves, so a test can read the messages of
    the ids it was answered with at once. The receiver answers first and plans right after
    (``settle=False`` and the subprocess tests see it as it runs)."""

    @web.middleware
    async def settle(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        if request.path.startswith("/webhook/"):
            await receiver.planner.drain()
        return response

    return settle


@pytest.fixture
def backend() -> str:
    """The outbox backend of ``start_receiver``; a module parametrises it to run on both."""
    return __import__("os").environ.get("SMS_TEST_BACKEND", "sqlite")


@pytest.fixture
async def start_receiver(aiohttp_server, tmp_path: Path, fake: Fake, backend: str, request):
    """``await start_receiver(**config_overrides)`` → a running receiver sending to the fake.
    ``db`` names the outbox (the same name: the same outbox, e.g. across a restart)."""
    started: list[Receiver] = []
    databases: dict[str, str] = {}

    def storage(db: str) -> str:
        if backend == "sqlite":
            return f"sqlite://{tmp_path}/{db}"
        if db not in databases:
            databases[db] = request.getfixturevalue("pg_server").database()
        return databases[db]

    async def start(*, clickatell: dict[str, Any] | None = None, dispatch: dict[str, Any] | None = None,
                    receiver_kwargs: dict[str, Any] | None = None, run_dispatcher: bool = True,
                    db: str | None = None, settle: bool = True, run_planner: bool = True,
                    **overrides: Any) -> Running:
        cfg = make_config(
            storage=storage(db or f"outbox-{len(started)}.db"),
            clickatell={"api_key": API_KEY, "base_url": fake.url, "timeout": "2s", **(clickatell or {})},
            dispatch={"retry_initial": "20ms", "retry_max": "100ms", "poll_interval": "50ms",
                      **(dispatch or {})},
            **overrides,
        )
        receiver = Receiver(cfg, **(receiver_kwargs or {}))
        # False: the test drives that stage itself
        await receiver.start(dispatch=run_dispatcher, plan=run_planner)
        started.append(receiver)
        app = create_app(receiver)
        if settle:
            app.middlewares.append(_settle(receiver))
        server = await aiohttp_server(app, host="127.0.0.1")
        return Running(receiver, str(server.make_url("")).rstrip("/"))

    yield start
    for receiver in started:
        await receiver.stop()


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL cluster for the session (tests/pg.py): required in CI, skipped elsewhere
    when PostgreSQL is not installed."""
    import os

    from tests import pg

    if pg.binaries() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is required in CI (.ci/run installs it)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    import shutil

    server = pg.start()  # in /tmp itself: pytest's own directories are closed to other users
    yield server
    server.stop("immediate")
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a new, empty database on the session's server."""
    return pg_server.database()
