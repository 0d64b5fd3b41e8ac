"""CPU per Clickatell request of the receiver's client, against the fake on loopback.

    python bench/client_cost.py [--requests 3000]

Sends REST sends of 5 recipients through ``ClickatellClient`` (httpx), 1, 8 (the default
dispatch.concurrency) and 16 at a time, and prints the client process's CPU time per request.
httpcore's pool checks every idle connection at each request's start and end, so the cost per
request grows with the connections in use.
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


async def measure(name: str, send: Callable[[], Awaitable[None]], count: int, at_once: int) -> None:
    gate = asyncio.Semaphore(at_once)

    async def one() -> None:
        async with gate:
            await send()

    await asyncio.gather(*[one() for _ in range(200)])  # connections open, code warm
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*[one() for _ in range(count)])
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    print(f"{name:10} {at_once:3} at once: {cpu / count * 1e6:7.0f} µs of CPU per request  "
          f"({count / wall:,.0f} requests/s)")


async def main(url: str, count: int) -> None:
    for at_once in (1, 8, 16):  # the dispatcher's pool has dispatch.concurrency connections
        client = ClickatellClient(base_url=url, api="rest", timeout=10, max_connections=at_once)

        async def receiver_client(client: ClickatellClient = client) -> None:
            outcome = await client.send(api_key="bench-key", to=NUMBERS, content="[WARNING] 1 firing",
                                        client_message_id="bench")
            assert outcome.kind == "ok", outcome

        try:
            await measure("receiver", receiver_client, count, at_once)
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
