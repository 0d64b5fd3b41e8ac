"""Group commit for an asyncio store: what is added while a batch commits goes in the next batch,
together, in one transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from receiver.store import StoreError

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class Batcher(Generic[I, R]):
    """Group commit: items added while a batch commits go in the next one, together.

    ``run`` takes a batch and returns one result per item, in order, or raises: then every item
    of that batch gets the exception, and the next batch is tried as usual. Cancelled (the loop
    stops), every item not answered yet gets :class:`StoreError`: no caller waits forever."""

    def __init__(self, run: Callable[[list[I]], Awaitable[list[R]]]) -> None:
        self._run = run
        self._queue: list[tuple[I, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def add(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="postgres group commit")
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    results = await self._run([item for item, _ in batch])
                except BaseException as exc:  # noqa: BLE001 - every waiter gets the failure
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc if isinstance(exc, Exception) else StoreError("the outbox is closing"))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, f), r in zip(batch, results, strict=True):
                    if not f.done():
                        f.set_result(r)
        finally:
            self._task = None
            for _, f in self._queue:  # cancelled (the loop is stopping): nobody will serve them
                if not f.done():
                    f.set_exception(StoreError("the outbox is closing"))
            self._queue = []
