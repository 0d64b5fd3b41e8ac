"""The inbox journal: each answered webhook as one record appended to a file, synced in groups.

On the webhook answer path SQLite cost ~70–100 µs of the event loop per webhook (a dedup upsert,
an insert, BEGIN/COMMIT, writing the WAL's pages); appending a record costs a few. The web
process appends, the worker moves records into the inbox table (:meth:`SQLiteStore.inbox`),
checking each dedup key there as well, and records how far it got in the same transaction.

Files: ``outbox.journal.00000001``, ``…02``: a segment is closed once it passes
``SEGMENT_BYTES`` and the next is created; the worker deletes a segment once it has moved all
of it. A record is ``<II`` (length and CRC-32 of the rest), then ``<ddHHI`` (received_at, the
dedup window, the lengths of source, key and plan), those three, and the body.

Durability: a write is answered only after an ``fdatasync`` that began after its bytes were
written (the same protocol as :class:`~receiver.store.writer.LoopCommit`). A crash can leave a
torn record at the end of the last segment, never answered: the writer cuts it off when it
opens the journal, and readers stop at it until then. A failed or short write is cut off at
once; after a failed sync nothing more is written (the kernel may have dropped the pages).
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from receiver.store import StoreError

SEGMENT_BYTES = 8 << 20
_HEAD = struct.Struct("<II")  # length of the rest, its CRC-32
_META = struct.Struct("<ddHHI")  # received_at, dedup window, len(source), len(key), len(plan)


@dataclass(frozen=True, slots=True)
class Record:
    received_at: float
    window: float  # the dedup window the webhook was received under
    source: str
    key: str
    plan: str
    body: bytes


def encode(received_at: float, window: float, source: str, key: str, plan: str, body: bytes) -> bytes:
    s, k, p = source.encode(), key.encode(), plan.encode()
    rest = b"".join((_META.pack(received_at, window, len(s), len(k), len(p)), s, k, p, body))
    return _HEAD.pack(len(rest), zlib.crc32(rest)) + rest


PROBE = encode(0.0, 0.0, "", "", "", b"")  # no webhook (no source): readiness tries a write


def _frame(data: bytes | memoryview, at: int) -> tuple[int, int, tuple[float, float, int, int, int]] | None:
    """Where the whole record at ``at`` starts and ends, and its fixed fields; None for a torn
    or missing one."""
    if len(data) - at < _HEAD.size:
        return None
    length, crc = _HEAD.unpack_from(data, at)
    start, end = at + _HEAD.size, at + _HEAD.size + length
    if end > len(data) or length < _META.size or zlib.crc32(data[start:end]) != crc:
        return None
    meta = _META.unpack_from(data, start)
    if start + _META.size + meta[2] + meta[3] + meta[4] > end:
        return None
    return start, end, meta


def decode(data: bytes | memoryview, at: int) -> tuple[Record, int] | None:
    """The record at offset ``at`` and the offset after it; None for a torn or missing one."""
    framed = _frame(data, at)
    if framed is None:
        return None
    start, end, (received_at, window, ls, lk, lp) = framed
    i = start + _META.size
    source = bytes(data[i:i + ls]).decode()
    key = bytes(data[i + ls:i + ls + lk]).decode()
    plan = bytes(data[i + ls + lk:i + ls + lk + lp]).decode()
    return Record(received_at, window, source, key, plan, bytes(data[i + ls + lk + lp:end])), end


def segment_path(base: str, number: int) -> str:
    return f"{base}.{number:08d}"


def segments(base: str) -> list[int]:
    """The numbers of the journal's segments, in order."""
    p = Path(base)
    prefix = p.name + "."
    out = []
    for entry in p.parent.glob(prefix + "*") if p.parent.exists() else ():
        tail = entry.name[len(prefix):]
        if len(tail) == 8 and tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def _chunk(base: str, number: int, offset: int, max_bytes: int) -> tuple[bytes, int] | None:
    """About ``max_bytes`` of segment ``number`` from ``offset`` (all of a first record that is
    longer) and the segment's size when the read began; None for a missing segment."""
    try:
        with open(segment_path(base, number), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            data = f.read(max_bytes)
            if len(data) >= _HEAD.size:
                need = _HEAD.size + _HEAD.unpack_from(data, 0)[0]
                if len(data) < need <= size - offset:
                    data += f.read(need - len(data))
    except FileNotFoundError:
        return None
    return data, size


def read(base: str, number: int, offset: int, max_bytes: int = 4 << 20,
         max_records: int | None = None) -> tuple[list[Record], int, int]:
    """Whole records of segment ``number`` from ``offset`` (about ``max_bytes`` of them, at
    most ``max_records``): the
    records, the offset after the last, and the segment's size when the read began (bytes past
    the offset that make no record are a write in progress, or a torn one if the segment is
    closed). A missing segment reads as empty."""
    chunk = _chunk(base, number, offset, max_bytes)
    if chunk is None:
        return [], offset, 0
    data, size = chunk
    out: list[Record] = []
    at = 0
    while (max_records is None or len(out) < max_records) and (got := decode(data, at)) is not None:
        out.append(got[0])
        at = got[1]
    return out, offset + at, size


def webhook_times(base: str, number: int, offset: int,
                  max_bytes: int = 1 << 20) -> tuple[list[float], int]:
    """When each webhook record of segment ``number`` from ``offset`` was received (about
    ``max_bytes`` of records; readiness probes left out), and the offset after the last record
    read: counts a backlog without holding its bodies."""
    chunk = _chunk(base, number, offset, max_bytes)
    if chunk is None:
        return [], offset
    data = memoryview(chunk[0])
    times: list[float] = []
    at = 0
    while (framed := _frame(data, at)) is not None:
        _, at, (received_at, _window, source_length, _, _) = framed
        if source_length:
            times.append(received_at)
    return times, offset + at


def _valid_end(path: str) -> int:
    """The offset just after the last whole record of a segment."""
    at = 0
    with open(path, "rb") as f:
        data = f.read()
    while (got := decode(data, at)) is not None:
        at = got[1]
    return at


def _fsync_dir(path: str) -> None:
    fd = os.open(str(Path(path).parent), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Write:
    __slots__ = ("data", "future")

    def __init__(self, data: bytes, future: asyncio.Future[None]) -> None:
        self.data = data
        self.future = future


class JournalWriter:
    """Appends records; :meth:`append` returns once its record is on disk. One per journal:
    only the web process writes (readers never change the files they have not fully moved)."""

    def __init__(self, base: str, *, segment_bytes: int | None = None,
                 sync: Callable[[int], None] = os.fdatasync) -> None:
        self.base = base
        self.segment_bytes = SEGMENT_BYTES if segment_bytes is None else segment_bytes
        self._sync_fn = sync
        self.failing: str | None = None  # why the journal cannot take writes (readiness)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="journal-sync")
        self._number = 0
        self._fd = -1
        self._size = 0
        self._queue: list[_Write] = []
        self._timer: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the appenders' loop (open's)
        self._lock = threading.Lock()  # guards the four below, shared with the sync thread
        self._unsynced: list[list[_Write]] = []
        self._syncing = False
        self._retired: list[int] = []  # descriptors of closed segments, closed by the sync thread
        self._broken: str | None = None

    async def open(self) -> None:
        """Open the last segment for appending (cutting off a torn record), or create the first."""
        def setup() -> None:
            numbers = segments(self.base)
            if numbers:
                self._number = numbers[-1]
                path = segment_path(self.base, self._number)
                end = _valid_end(path)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                if os.fstat(fd).st_size != end:
                    os.ftruncate(fd, end)
                    os.fsync(fd)
                self._fd, self._size = fd, end
            else:
                Path(self.base).parent.mkdir(parents=True, exist_ok=True)
                self._new_segment(1)

        self._loop = asyncio.get_running_loop()
        try:
            await self._loop.run_in_executor(self._thread, setup)
        except OSError as exc:
            raise StoreError(f"cannot open the journal {self.base!r}: {exc}") from exc

    def _new_segment(self, number: int) -> None:
        fd = os.open(segment_path(self.base, number),  # O_APPEND: after a cut-off write, at the new end
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        _fsync_dir(self.base)
        self._number, self._fd, self._size = number, fd, 0

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._flush()
        fd, self._fd = self._fd, -1

        def shut() -> None:  # after the last sync (one thread, jobs in order)
            for d in [*self._retired, fd]:
                if d >= 0:
                    os.close(d)
            self._retired.clear()

        await asyncio.get_running_loop().run_in_executor(self._thread, shut)
        await asyncio.sleep(0)  # the last answers (call_soon_threadsafe) run
        self._thread.shutdown(wait=True)

    async def append(self, record: bytes) -> None:
        """Append ``record``; return once it is durable, or raise :class:`StoreError`."""
        await self.submit(record)

    def submit(self, record: bytes) -> asyncio.Future[None]:
        """Queue ``record`` for the next group write: a future done once it is durable, or
        failed with :class:`StoreError` (raised at once when the journal cannot take writes)."""
        if self._fd < 0:
            raise StoreError("the journal is not open")
        if self._broken is not None:
            raise StoreError(f"journal unusable after a failed sync: {self._broken}")
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append(_Write(record, future))
        if self._timer is None:  # appends until the loop comes round join this write
            self._timer = loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """In the loop: write what is queued, then have the thread sync it."""
        self._timer = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        data = b"".join(w.data for w in batch)
        try:
            if self._size >= self.segment_bytes:
                self._rotate()
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            self._cut_back()
            self._fail(batch, f"journal write failed: {exc}")
            return
        self._size += len(data)
        with self._lock:
            self._unsynced.append(batch)
            start, self._syncing = not self._syncing, True
        if start:
            self._thread.submit(self._sync_all, self._loop)

    def _rotate(self) -> None:
        # The old segment's pending writes are synced here, before the switch: the thread's
        # next sync, on the new segment, then answers them correctly.
        os.fdatasync(self._fd)
        old = self._fd
        with self._lock:
            self._new_segment(self._number + 1)
            self._retired.append(old)

    def _cut_back(self) -> None:
        try:  # no torn record may stay in front of the next append
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            self._broken = f"cannot cut off a failed write: {exc}"

    def _fail(self, batch: list[_Write], reason: str) -> None:
        self.failing = reason
        err = StoreError(reason)
        for w in batch:
            if not w.future.done():
                w.future.set_exception(err)

    def _sync_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the thread: sync for every write made before the sync began, until none is left."""
        while True:
            with self._lock:
                groups, self._unsynced = self._unsynced, []
                fd, retired, self._retired = self._fd, self._retired, []
                if not groups:
                    self._syncing = False
                    self._retired = retired
                    return
            for d in retired:
                os.close(d)
            try:
                self._sync_fn(fd)
                error = None
            except OSError as exc:
                error = str(exc)
            loop.call_soon_threadsafe(self._synced, groups, error)

    def _synced(self, groups: list[list[_Write]], error: str | None) -> None:
        if error is not None:
            self._broken = error
            for batch in groups:
                self._fail(batch, f"journal sync failed: {error}")
            return
        self.failing = None
        for batch in groups:
            for w in batch:
                if not w.future.done():
                    w.future.set_result(None)
