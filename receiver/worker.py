"""The worker process: planning, dispatch, pruning and balance polls, beside the web process.

``sms-receiver run`` answers webhooks in one process and does everything behind them in a
second one, so that a storm of webhooks and a backlog of sends each get a core instead of
sharing one event loop. Both open the same outbox (SQLite in WAL mode takes one writer at a
time and readers alongside). The web process:

- starts the worker (``python -m receiver worker``) and starts it again if it dies;
- wakes it by writing a byte to a pipe when it stored something (the worker also polls, so a
  lost wake-up only costs ``dispatch.poll_interval``); the worker exits when the pipe closes,
  so it never outlives the web process;
- asks it for its health, metrics and reloads over HTTP on a Unix socket.

The worker runs at a lower CPU priority (``WORKER_NICE``): when both compete for the CPU,
answering webhooks comes first (Alertmanager times out and retries a slow receiver), and what
was received waits, durable, in the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from receiver import gc_tuning

if TYPE_CHECKING:
    from receiver.app import Receiver

log = logging.getLogger("sms_receiver.worker")

WORKER_NICE = 19  # the web process first when both want one core: answers before sends in a storm
RESTART_DELAY = 1.0  # seconds before a worker that died is started again
CONTROL_TIMEOUT = 5.0  # seconds for a health, metrics or reload call


@dataclass(frozen=True, slots=True)
class Health:
    running: bool  # the dispatcher loop ran recently
    last_run_age: float | None  # seconds since it last ran
    error: str | None  # the planner's or dispatcher's last store error


class Worker:
    """The web process's handle on its worker process."""

    def __init__(self, config_path: Path, log_format: str) -> None:
        self.config_path = config_path
        self.log_format = log_format
        self._dir: Path | None = None  # holds the control socket; made by start()
        self._proc: asyncio.subprocess.Process | None = None
        self._wake_w: int | None = None
        self._wake_due = False
        self._supervisor: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    @property
    def socket(self) -> Path:
        assert self._dir is not None, "start() first"
        return self._dir / "worker.sock"

    async def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="sms-receiver-"))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket)),
            timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT),
        )
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="worker-supervisor")

    async def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "receiver", "worker", "--config", str(self.config_path),
                "--socket", str(self.socket), "--wake-fd", str(read_fd),
                "--log-format", self.log_format,
                pass_fds=(read_fd,),
            )
        finally:
            os.close(read_fd)
        if self._wake_w is not None:
            os.close(self._wake_w)
        self._wake_w = write_fd
        log.info("worker process %d started", self._proc.pid)

    async def _supervise(self) -> None:
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            log.error("worker process %d exited with %s; starting it again in %.0f s "
                      "(what is received waits in the inbox)", self._proc.pid, code, RESTART_DELAY)
            await asyncio.sleep(RESTART_DELAY)
            await self._spawn()

    def wake(self) -> None:
        """Tell the worker that something was stored, once per pass of the event loop however
        many webhooks that pass answered (one write and one wake-up of the worker, not one per
        webhook). Never blocks: a full pipe already wakes it."""
        if self._wake_w is None or self._wake_due:
            return
        self._wake_due = True
        asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_due = False
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"\0")
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EPIPE):
                raise

    async def _call(self, method: str, path: str, *, raw: bool = False) -> Any:
        assert self._session is not None
        async with self._session.request(method, f"http://worker{path}") as resp:
            resp.raise_for_status()
            return await (resp.read() if raw else resp.json())

    async def health(self) -> Health:
        try:
            data = await self._call("GET", "/health")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return Health(False, None, f"worker process not answering: {exc or type(exc).__name__}")
        return Health(bool(data["running"]), data["lastRunAge"], data["error"])

    async def metrics(self) -> bytes:
        try:
            return bytes(await self._call("GET", "/metrics", raw=True))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("could not read the worker's metrics: %s", exc or type(exc).__name__)
            return b""

    async def reload(self) -> list[str]:
        try:
            return list((await self._call("POST", "/reload"))["errors"])
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return [f"(worker): the worker process did not reload: {exc or type(exc).__name__}"]

    async def stop(self) -> None:
        """Stop the worker: it finishes the sends in flight first."""
        self._stopping = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), 60)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self._wake_w is not None:
            os.close(self._wake_w)
            self._wake_w = None
        if self._session is not None:
            await self._session.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Inside the worker process


def _control_app(receiver: Receiver) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        h = await receiver.health()
        return web.json_response({"running": h.running, "lastRunAge": h.last_run_age, "error": h.error})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=receiver.metrics.worker_exposition())

    async def reload(request: web.Request) -> web.Response:
        return web.json_response({"errors": await receiver.reload()})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reload", reload)
    return app


async def serve_worker(receiver: Receiver, socket: Path, wake_fd: int) -> None:
    """Run ``receiver``'s work until SIGTERM or until the web process is gone (pipe closed)."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_wake() -> None:
        try:
            data = os.read(wake_fd, 4096)
        except BlockingIOError:
            return
        if not data:  # the web process is gone
            log.warning("web process gone: worker stopping")
            loop.remove_reader(wake_fd)
            stop.set()
            return
        receiver.planner.wake()
        receiver.dispatcher.wake()

    os.set_blocking(wake_fd, False)
    await receiver.start()
    loop.add_reader(wake_fd, on_wake)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the web process forwards reloads
    runner = web.AppRunner(_control_app(receiver), access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, str(socket)).start()
    gc_tuning.settle()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await receiver.stop()
