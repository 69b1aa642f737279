"""Not a test: p50 of an ``async def`` first call and replay through the public API on
PostgreSQL (psycopg 3, async), against a held psycopg ``AsyncConnection``'s ``SELECT 1``.

    .venv/bin/python tests/sql/hot_path_async.py [calls] [rounds]

Each round measures ``SELECT 1`` (the better of one run before and one after), then ``calls``
first calls (claim + complete) and ``calls`` replays; the medians over rounds are printed.
The machine may be shared: compare runs made one after the other, and mind ``uptime``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from idem_core import Idempotency

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DSN = "postgresql://postgres@127.0.0.1:5432/test"


async def p50(call: Callable[[int], Awaitable[Any]], n: int) -> float:
    """Median microseconds of ``n`` calls."""
    times = []
    clock = time.perf_counter_ns
    for i in range(n):
        start = clock()
        await call(i)
        times.append(clock() - start)
    return statistics.median(times) / 1000


async def measure(calls: int, rounds: int) -> str:
    table = f"idem_hot_{uuid.uuid4().hex[:8]}"
    idem = Idempotency.from_url(f"{URL}?table={table}", namespace="hot")
    await idem.astore.setup()

    @idem.idempotent(key="key")
    async def handler(key: str) -> int:
        return 1

    conn = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
    cursor = conn.cursor()

    async def select_1(_: int) -> None:
        await cursor.execute("SELECT 1")
        await cursor.fetchall()

    for i in range(200):  # warm up: connections, prepared statements, caches
        await handler(f"warm-{i}")
        await handler("replay")
        await select_1(i)
    rows = []
    for _ in range(rounds):
        run = uuid.uuid4().hex[:8]
        before = await p50(select_1, calls)
        first = await p50(lambda i, run=run: handler(f"{run}-{i}"), calls)
        replay = await p50(lambda _: handler("replay"), calls)
        rows.append((min(before, await p50(select_1, calls)), first, replay))
    await cursor.execute(f"DROP TABLE IF EXISTS {table}")
    await cursor.close()
    await conn.close()
    await idem.astore.close()
    select = statistics.median(r[0] for r in rows)
    first = statistics.median(r[1] for r in rows)
    replay = statistics.median(r[2] for r in rows)
    first_x = statistics.median(r[1] / r[0] for r in rows)
    replay_x = statistics.median(r[2] / r[0] for r in rows)
    return (
        f"postgresql async SELECT 1 {select:7.1f} us | first call {first:7.1f} us"
        f" ({first_x:5.1f}x) | replay {replay:7.1f} us ({replay_x:5.1f}x)"
    )


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 600
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(asyncio.run(measure(calls, rounds)), flush=True)


if __name__ == "__main__":
    main()
