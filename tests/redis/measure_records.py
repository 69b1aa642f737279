"""Bytes per record and server time per script, measured on a Redis of your own.

    redis-server --port 6390 --save '' --daemonize yes
    .venv/bin/python tests/redis/measure_records.py redis://127.0.0.1:6390/0

It resets the server's statistics (``CONFIG RESETSTAT``): never point it at a shared server.
It runs first calls (claim + complete with a 200-byte result) and replays through the store,
in batches of ``BATCH`` keys, and prints the median ``MEMORY USAGE`` of a completed record
(``SAMPLES 0``: the whole value) and ``INFO commandstats``' microseconds per ``EVALSHA`` for
each script: the mean over all calls, and the least mean of a batch (on a loaded machine the
server is preempted mid-script, which the mean counts and the best batch mostly does not).
Keys look like the core's: ``idem:`` + ``orders:order-<run>-000123``.
"""

from __future__ import annotations

import statistics
import sys
import uuid
from collections.abc import Callable

import redis

from idem_core import ClaimRequest, open_store

BATCH = 100
BATCHES = 20
RESULT = bytes(range(200))
FP = "0123456789abcdef" * 2  # a fingerprint as the core makes them: 128 bits, hex


def timed(admin: redis.Redis, keys: list[str], op: Callable[[str], object]) -> tuple[float, float]:
    """(mean, best batch mean) of EVALSHA microseconds while running ``op`` on every key."""
    calls = usec = 0.0
    best = float("inf")
    for start in range(0, len(keys), BATCH):
        admin.config_resetstat()
        for key in keys[start : start + BATCH]:
            op(key)
        stats = admin.info("commandstats")["cmdstat_evalsha"]
        calls += int(stats["calls"])
        usec += float(stats["usec"])
        best = min(best, float(stats["usec_per_call"]))
    return usec / calls, best


def timed_batches(
    admin: redis.Redis, keys: list[str], op: Callable[[list[str]], object]
) -> tuple[float, float]:
    """As :func:`timed`, ``op`` taking a batch of keys at a time."""
    calls = usec = 0.0
    best = float("inf")
    for start in range(0, len(keys), BATCH):
        admin.config_resetstat()
        op(keys[start : start + BATCH])
        stats = admin.info("commandstats")["cmdstat_evalsha"]
        calls += int(stats["calls"])
        usec += float(stats["usec"])
        best = min(best, float(stats["usec_per_call"]))
    return usec / calls, best


def main(url: str) -> None:
    store = open_store(url)
    admin = redis.Redis.from_url(url.split("?")[0])
    run = uuid.uuid4().hex[:6]
    keys = [f"orders:order-{run}-{i:06d}" for i in range(BATCH * BATCHES)]
    store.get("warm")  # connect, load scripts
    fences: dict[str, int] = {}

    def claim(key: str) -> None:
        fences[key] = store.claim(ClaimRequest(key, FP, uuid.uuid4().hex, 30, 3600)).fence

    def complete(key: str) -> None:
        store.complete(key, fences[key], RESULT, 3600)

    figures = {
        "claim": timed(admin, keys, claim),
        "complete": timed(admin, keys, complete),
        "replay": timed(admin, keys, claim),
    }
    # The same scripts back to back in one pipeline (claim_many), as coalescing sends them
    # under load: the server's caches stay warm between scripts.
    fresh = [f"orders:order-{run}-m{i:06d}" for i in range(BATCH * BATCHES)]

    def many(batch: list[str]) -> None:
        store.claim_many([ClaimRequest(k, FP, uuid.uuid4().hex, 30, 3600) for k in batch])

    figures["claim, pipelined"] = timed_batches(admin, fresh, many)
    figures["replay, pipelined"] = timed_batches(admin, keys, many)
    sizes = [admin.memory_usage(store.prefix + k, samples=0) for k in keys[:200]]
    print(f"key: {store.prefix + keys[0]!r} ({len(store.prefix + keys[0])} bytes)")
    print(f"MEMORY USAGE per completed record (200-byte result): {statistics.median(sizes)}")
    print(f"encoding: {admin.object('encoding', store.prefix + keys[0])!r}")
    print("EVALSHA usec/call (mean, best batch):")
    for name, (mean, best) in figures.items():
        print(f"  {name:18} {mean:6.2f} {best:6.2f}")
    store.close()
    admin.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6390/0")
