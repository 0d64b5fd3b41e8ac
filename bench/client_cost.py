"""CPU per Clickatell request of the receiver's client, against the fake on loopback.

    python bench/client_cost.py [--requests 3000]

Sends REST sends of 5 recipients, 16 at a time (the benchmark's dispatch.concurrency), through
``ClickatellClient`` (httpx) and prints the client process's CPU time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the benchmark's process helpers: the fake, free ports)
from receiver.clickatell import ClickatellClient  # noqa: E402

NUMBERS = [m.lstrip("+") for m in bench.MEMBERS]  # the benchmark's group: one message, five SMS


async def measure(name: str, send: Callable[[], Awaitable[None]], count: int) -> None:
    gate = asyncio.Semaphore(16)

    async def one() -> None:
        async with gate:
            await send()

    await asyncio.gather(*[one() for _ in range(200)])  # connections open, code warm
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*[one() for _ in range(count)])
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    print(f"{name:10} {cpu / count * 1e6:7.0f} µs of CPU per request  ({count / wall:,.0f} requests/s)")


async def main(url: str, count: int) -> None:
    client = ClickatellClient(base_url=url, api="rest", timeout=10, max_connections=16)

    async def receiver_client() -> None:
        outcome = await client.send(api_key="bench-key", to=NUMBERS, content="[WARNING] 1 firing",
                                    client_message_id="bench")
        assert outcome.kind == "ok", outcome

    try:
        await measure("receiver", receiver_client, count)
    finally:
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    import tempfile

    fake = bench.Fake(Path(tempfile.mkdtemp(prefix="client-cost-")))
    try:
        asyncio.run(main(fake.url, args.requests))
    finally:
        fake.proc.stop()
