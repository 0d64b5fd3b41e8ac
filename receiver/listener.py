"""The HTTP listener: aiohttp's request handling behind our own accept loop, which times every
phase of a connection, caps their number and serves TLS with a certificate a reload re-reads.

aiohttp bounds keep-alive idleness only: nothing bounds the time to send the headers or the
body, nor the number of connections, so a few thousand stalled connections from one host used
to take every file descriptor. Each accepted connection is wrapped in a small protocol
(:class:`_Conn`) that forwards to aiohttp's handler and reports its phase to a
:class:`ConnectionGuard`:

- ``headers``: connected (the TLS handshake included) or, after ``idle``, bytes of the next request
  arrived; until aiohttp has parsed the request line and headers. Bounded by ``header_timeout``.
- ``body``: headers parsed, body not yet received whole. Bounded by ``body_timeout``.
- ``busy``: a handler works on a complete request (not bounded here: that is the handler's work).
- ``idle``: answered, waiting for another request on the kept-alive connection: ``idle_timeout``.

When ``server.max_connections`` are open, a new connection closes the oldest connection waiting
for headers or idle; when there is none, the oldest one still sending a body; when every
connection is busy, the new one is refused. Each closure is counted in
``sms_receiver_http_connections_closed_total{reason}`` and summarised in one log line at most
every :data:`LOG_EVERY` seconds. The limits are read from the live config at each use, so a
reload changes them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from receiver.clock import Clock
from receiver.config import Config
from receiver.config.model import ServerConfig
from receiver.metrics import Metrics
from receiver.tls import TlsError, load_tls

log = logging.getLogger("sms_receiver")

ACCEPT_BATCH = 128  # connections accepted per event-loop pass
ACCEPT_QUEUE = 4096  # the kernel's queue of connections not accepted yet
LOG_EVERY = 10.0  # seconds between two summary lines of closed connections
SWEEP_EVERY = 0.25  # seconds between sweeps at most
SWEEP_BATCH = 200  # connections closed per loop pass at most
# TLS handshakes in progress at most: each holds ~0.25-0.5 MB of buffers until it ends, so a
# flood of bare ClientHellos would otherwise take a pod's memory well before max_connections
MAX_HANDSHAKES = 64
PHASES = ("headers", "body", "busy", "idle")
_TIMED = (("headers", "header_timeout"), ("idle", "idle_timeout"), ("body", "body_timeout"))


# ---------------------------------------------------------------------------------------------
# aiohttp's handler, with its parse-error answers replaced

# aiohttp's parse errors by class → a reason that quotes nothing of the request: their messages
# quote the request line or the path (depending on the parser, C or Python), and a callback URL
# carries its secret in the path or the query.
_BAD_REQUEST = {
    "BadStatusLine": "invalid request line",
    "BadHttpMethod": "invalid method",
    "InvalidURLError": "invalid URL",
    "LineTooLong": "request line or header too long",
    "InvalidHeader": "invalid header",
    "TransferEncodingError": "invalid Transfer-Encoding",
    "ContentLengthError": "invalid Content-Length",
    "ContentEncodingError": "invalid Content-Encoding",
}


def bad_request_reason(exc: BaseException | None) -> str:
    """A fixed reason for a request aiohttp could not parse: safe to log and to answer with."""
    for cls in type(exc).__mro__ if exc is not None else ():
        if cls.__name__ in _BAD_REQUEST:
            return _BAD_REQUEST[cls.__name__]
    return "malformed request"


class _Handler(RequestHandler):
    """aiohttp's handler, except that a request it cannot parse (a control character in the
    request line, a line or header over the limit) is answered and logged with the reason only:
    aiohttp's own answer and log quote the request line, query string and secret included."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400:  # a bug in a handler: aiohttp's 500 and its traceback (scrubbed by logs)
            return super().handle_error(request, status, exc, message)
        reason = bad_request_reason(exc)
        log.info("bad HTTP request from %s: %s", request.remote, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already")
        response = web.Response(status=400, text=f"400 Bad Request: {reason}\n")
        response.force_close()
        return response


# ---------------------------------------------------------------------------------------------
# connections


class _Conn(asyncio.Protocol):
    """One accepted connection: forwards to aiohttp's handler and tells the guard its phase."""

    __slots__ = ("guard", "handler", "transport", "phase", "since", "request", "early")

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.handler: RequestHandler | None = None  # once the connection is admitted (and TLS up)
        self.transport: Any = None
        self.phase: str | None = None  # None: not admitted, or closed
        self.since = 0.0  # when the phase began (the clock's monotonic time)
        self.request: web.BaseRequest | None = None
        # TLS: the request may come with the end of the handshake, before start_tls() returns
        self.early = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if not self.guard.admit(self):
            transport.abort()
            return
        tls = self.guard.tls
        if tls is None:
            self._start(transport)
        else:
            transport.pause_reading()  # the ClientHello is for start_tls, not for aiohttp
            self.guard.handshaking(self)
            self.guard.spawn(self._handshake(transport, tls))

    async def _handshake(self, raw: asyncio.Transport, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        # asyncio's handshake timeout is a backstop: the guard's header_timeout comes first (counted)
        try:
            secure = await loop.start_tls(raw, self, tls, server_side=True,
                                          ssl_handshake_timeout=2 * self.guard.settings().header_timeout)
        except Exception as exc:  # any handshake failure is the client's: it is not served
            log.debug("TLS handshake failed: %r", exc)
            secure = None
        finally:
            self.guard.handshaken(self)
        if secure is None or self.phase is None:
            raw.abort()
            self.guard.forget(self)
            return
        self.transport = secure
        self._start(secure)

    def _start(self, transport: Any) -> None:
        self.handler = self.guard.new_handler()
        self.guard.attach(self)
        self.handler.connection_made(transport)
        if self.early:
            early, self.early = bytes(self.early), bytearray()
            self.handler.data_received(early)

    def data_received(self, data: bytes) -> None:
        if self.phase == "idle":
            self.guard.enter(self, "headers")
        if self.handler is not None:
            self.handler.data_received(data)
        elif len(self.early) + len(data) <= 65536:
            self.early += data
        else:  # more than aiohttp would take as headers before it can even answer
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.forget(self)
        if self.handler is not None:
            self.handler.connection_lost(exc)


class ConnectionGuard:
    """Every open connection in its phase, oldest first; times them out and enforces the cap.
    ``settings`` returns the live ``server`` section."""

    def __init__(self, *, settings: Callable[[], ServerConfig], metrics: Metrics, clock: Clock,
                 new_handler: Callable[[], RequestHandler]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.new_handler = new_handler
        self.tls: ssl.SSLContext | None = None  # for new connections; swapped by a reload
        self._phases: dict[str, OrderedDict[_Conn, None]] = {p: OrderedDict() for p in PHASES}
        self._by_handler: dict[RequestHandler, _Conn] = {}
        self.open = 0
        self._unlogged: Counter[str] = Counter()
        self._logged_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshakes: OrderedDict[_Conn, None] = OrderedDict()  # oldest first

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def enter(self, conn: _Conn, phase: str) -> None:
        if conn.phase is not None:
            del self._phases[conn.phase][conn]
        conn.phase, conn.since = phase, self.clock.monotonic()
        self._phases[phase][conn] = None

    def admit(self, conn: _Conn) -> bool:
        """Count a new connection in, closing the oldest waiting one at the cap; False: refuse it."""
        if self.open >= self.settings().max_connections and not self._evict():
            self._count("limit")
            return False
        self.open += 1
        self.metrics.http_connections.set(self.open)
        self.enter(conn, "headers")
        return True

    def handshaking(self, conn: _Conn) -> None:
        """A TLS handshake starts; past MAX_HANDSHAKES the oldest one in progress is closed."""
        self._handshakes[conn] = None
        while len(self._handshakes) > MAX_HANDSHAKES:
            oldest, _ = self._handshakes.popitem(last=False)
            if oldest.phase is not None:
                self.close(oldest, "limit")

    def handshaken(self, conn: _Conn) -> None:
        self._handshakes.pop(conn, None)

    def attach(self, conn: _Conn) -> None:
        assert conn.handler is not None
        self._by_handler[conn.handler] = conn

    def forget(self, conn: _Conn) -> None:
        self._handshakes.pop(conn, None)
        if conn.handler is not None:
            self._by_handler.pop(conn.handler, None)
        if conn.phase is not None:
            del self._phases[conn.phase][conn]
            conn.phase = None
            self.open -= 1
            self.metrics.http_connections.set(self.open)

    def close(self, conn: _Conn, reason: str) -> None:
        self.forget(conn)
        self._count(reason)
        conn.transport.abort()  # no TLS goodbye: a stalled peer would hold the socket for it

    def _count(self, reason: str) -> None:
        self.metrics.child(self.metrics.http_closed, reason).inc()
        self._unlogged[reason] += 1

    def _receiving(self, conn: _Conn) -> bool:
        """Whether a connection in ``body`` still waits for its body (else it becomes busy)."""
        if conn.request is not None and conn.request.content.is_eof():
            self.enter(conn, "busy")
            return False
        return True

    def _evict(self) -> bool:
        waiting = [next(iter(self._phases[p])) for p in ("headers", "idle") if self._phases[p]]
        if waiting:
            self.close(min(waiting, key=lambda c: c.since), "limit")
            return True
        body = self._phases["body"]
        while body:
            conn = next(iter(body))
            if self._receiving(conn):
                self.close(conn, "limit")
                return True
        return False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Outermost: its request's headers are in; the connection is idle once it answered."""
        conn = self._by_handler.get(request.protocol)  # type: ignore[arg-type]
        if conn is None or conn.phase is None:
            return await handler(request)
        conn.request = request
        self.enter(conn, "busy" if request.content.is_eof() else "body")
        try:
            return await handler(request)
        finally:
            conn.request = None
            if conn.phase is not None:
                self.enter(conn, "idle")

    def sweep(self) -> bool:
        """Close the connections whose phase lasted too long, at most SWEEP_BATCH of them (True:
        more are due); log what was closed (rate-limited)."""
        now, s, budget = self.clock.monotonic(), self.settings(), SWEEP_BATCH
        for phase, key in _TIMED:
            limit, conns = getattr(s, key), self._phases[phase]
            while conns and budget:
                conn = next(iter(conns))
                if now - conn.since < limit:
                    break
                if phase != "body" or self._receiving(conn):
                    self.close(conn, key)
                    budget -= 1
        self.report(now)
        return not budget

    def report(self, now: float, *, final: bool = False) -> None:
        """One summary line of the closures since the last one, at most every LOG_EVERY s.
        Idle keep-alive connections expiring is routine: alone, they are logged at debug."""
        if not self._unlogged or (not final and self._logged_at is not None
                                  and now - self._logged_at < LOG_EVERY):
            return
        counts, self._unlogged = self._unlogged, Counter()
        self._logged_at = now
        level = logging.DEBUG if set(counts) == {"idle_timeout"} else logging.WARNING
        log.log(level, "listener closed %d connection(s): %s; %d open (server.max_connections %d)",
                sum(counts.values()), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                self.open, self.settings().max_connections)

    async def run(self) -> None:
        """Sweep often enough to honour the shortest timeout within a quarter of it, and in small
        batches: closing a flood's connections all at once stalled every request for ~0.5 s."""
        while True:
            s = self.settings()
            await asyncio.sleep(min(SWEEP_EVERY, max(0.02, min(s.header_timeout, s.body_timeout,
                                                                s.idle_timeout) / 4)))
            while self.sweep():
                await asyncio.sleep(0)  # let accepts and requests in between batches

    def abort_unstarted(self) -> None:
        """At shutdown: close connections aiohttp does not know yet (TLS handshakes)."""
        for task in list(self._tasks):
            task.cancel()
        for conns in self._phases.values():
            for conn in [c for c in conns if c.handler is None]:
                self.forget(conn)
                conn.transport.abort()


class Listener:
    """The listening socket and its guard. Use: ``bind`` (before anything else starts, so a
    taken port fails fast), ``install`` on the app (before the runner's setup), ``serve`` with
    the set-up runner, ``close`` before the runner's cleanup."""

    def __init__(self, *, settings: Callable[[], ServerConfig], metrics: Metrics, clock: Clock) -> None:
        self.guard = ConnectionGuard(settings=settings, metrics=metrics, clock=clock,
                                     new_handler=self._new_handler)
        self._server: asyncio.base_events.Server | None = None
        self._manager: web.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # told when the sweeper stops on a bug: without it no timeout or cap holds any more
        self.on_fatal: Callable[[str], None] = lambda reason: None

    def load_tls(self, cfg: Config) -> None:
        """Use ``cfg``'s certificate for new connections (TlsError: keep the current one)."""
        self.guard.tls = load_tls(cfg.server.tls)

    def reload_tls(self, cfg: Config) -> list[str]:
        """For :attr:`Receiver.reload_hooks`: the errors, or [] once the new files are in use.
        Turning TLS on or off waits for a restart, like ``listen``: clients of the port would
        otherwise find it speaking another protocol from one connection to the next."""
        if (cfg.server.tls is None) != (self.guard.tls is None):
            log.warning("config reload: server.tls was %s; it takes effect after a restart",
                        "removed" if cfg.server.tls is None else "added")
            return []
        try:
            self.load_tls(cfg)
        except TlsError as exc:
            return [str(exc)]
        return []

    @property
    def scheme(self) -> str:
        return "https" if self.guard.tls is not None else "http"

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def bind(self, host: str, port: int) -> None:
        """Take the port (not serving yet)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self.guard), host or None, port,
                                                backlog=ACCEPT_BATCH, start_serving=False)

    def install(self, app: web.Application) -> None:
        app.middlewares.insert(0, self.guard.middleware)

    def _new_handler(self) -> RequestHandler:
        assert self._manager is not None
        s = self.guard.settings()
        # aiohttp's own keep-alive timer only as a backstop: the guard's idle_timeout comes first
        # auto_decompress off as in create_app: a body is never inflated by the server
        return _Handler(self._manager, loop=asyncio.get_running_loop(), access_log=None,
                        keepalive_timeout=s.idle_timeout + s.header_timeout + 5, auto_decompress=False)

    async def serve(self, runner: web.AppRunner) -> None:
        assert self._server is not None and runner.server is not None
        self._manager = runner.server
        self._sweeper = asyncio.create_task(self.guard.run(), name="listener sweep")
        self._sweeper.add_done_callback(self._swept)
        await self._server.start_serving()
        # asyncio uses its backlog both for listen() and as the accepts per loop pass: keep the
        # pass short (a flood's 4,096 accepts at once stalled the loop ~0.4 s) but the kernel's
        # queue deep (when it overflows, a legitimate client's SYN is dropped and retried 1 s later)
        for listening in self._server.sockets:
            with socket.fromfd(listening.fileno(), listening.family, listening.type) as same:
                same.listen(ACCEPT_QUEUE)  # capped by net.core.somaxconn

    def _swept(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.critical("the listener sweep stopped: %r", exc, exc_info=exc)
        self.on_fatal(f"the listener sweep stopped: {exc!r}")

    async def close(self) -> None:
        """Stop accepting; the runner's cleanup then finishes the requests in flight."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        self.guard.abort_unstarted()
        self.guard.report(self.guard.clock.monotonic(), final=True)
