"""Time DynamoDB ``claim_many``: one request per key (side by side, as before issue 14) against
transactions (``idem_dynamodb.batch``), interleaved on the same server and table.

    .venv/bin/python scripts/ddb_claim_many.py http://127.0.0.1:PORT [--sizes 2,10,100] [--runs 9]

Each run claims a batch of new keys, then the same keys again (all in progress: replays of a
kind), then a batch of half new, half stored keys; sync and async stores. Prints the median
milliseconds per batch and the requests made. A fresh table is created and deleted: on moto,
a transaction copies every table it touches, so its cost grows with the table (see
``docs/backends/dynamodb.md``); ``--preload N`` puts N items in the table first to show it,
``--clean`` deletes each sample's keys after it (untimed) to keep the table at its size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

from idem_dynamodb.backend import BACKEND

from idem_core.record import ClaimRequest, Record, Status

WAYS = ("per-key", "batched")


def reqs(keys: list[str]) -> list[ClaimRequest]:
    return [ClaimRequest(k, "f" * 32, uuid.uuid4().hex, 600.0, 600.0) for k in keys]


def keys_(n: int) -> list[str]:
    p = uuid.uuid4().hex[:12]
    return [f"t-{p}-{i}" for i in range(n)]


class Calls:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, **_: Any) -> None:
        self.n += 1


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("--sizes", default="2,5,10,100")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--preload", type=int, default=0)
    ap.add_argument("--clean", action="store_true", help="delete each sample's keys after it")
    args = ap.parse_args()
    table = f"idem_time_{uuid.uuid4().hex[:8]}"
    url = f"dynamodb://{table}?region=us-east-1&endpoint_url={args.endpoint}&read_timeout=60"
    # Two pairs of stores on one table: batch_from=off claims key by key (as before issue 14).
    stores = {w: BACKEND.open(url, batch_from=None if w == "per-key" else 2) for w in WAYS}
    astores = {w: BACKEND.open_async(url, batch_from=None if w == "per-key" else 2) for w in WAYS}
    store = stores["batched"]
    store.setup()
    loop = asyncio.new_event_loop()
    try:
        counts = {(w, sync): Calls() for w in WAYS for sync in (True, False)}
        for w in WAYS:
            stores[w].client.meta.events.register("before-call.dynamodb", counts[w, True])
            aclient = loop.run_until_complete(astores[w]._get_client())
            aclient.meta.events.register("before-call.dynamodb", counts[w, False])
        if args.preload:
            preload(store, args.preload)
        # Learn the server's transaction limit and warm connections up.
        for w in WAYS:
            warm, awarm = keys_(101), keys_(101)
            stores[w].claim_many(reqs(warm))
            loop.run_until_complete(astores[w].claim_many(reqs(awarm)))
            if args.clean:
                delete(store, warm + awarm)
        print(f"server {args.endpoint}: {store.plans.transaction_items} items per transaction")
        head = f"{'n':>4} {'kind':<6} {'store':<5} {'per-key ms':>11} {'req':>5}"
        print(head + f" {'batched ms':>11} {'req':>4}", flush=True)
        for n in [int(x) for x in args.sizes.split(",")]:
            for kind in ("new", "again", "mixed"):
                for label, sync in (("sync", True), ("async", False)):
                    samples: dict[str, list[float]] = {w: [] for w in WAYS}
                    made: dict[str, int] = dict.fromkeys(WAYS, 0)
                    for _ in range(args.runs):
                        for way in WAYS:  # interleaved
                            s = stores[way] if sync else astores[way]
                            c = counts[way, sync]
                            stored = keys_(n if kind == "again" else n // 2)
                            run(loop, s, reqs(stored))
                            todo = {
                                "new": keys_(n),
                                "again": stored,
                                "mixed": stored + keys_(n - len(stored)),
                            }[kind]
                            c.n = 0
                            samples[way].append(timed(lambda s=s, t=todo: run(loop, s, reqs(t))))
                            made[way] = c.n
                            if args.clean:
                                delete(store, stored + todo)
                    pk, bt = (statistics.median(samples[w]) for w in WAYS)
                    pkn, btn = (made[w] for w in WAYS)
                    print(
                        f"{n:>4} {kind:<6} {label:<5} {pk:>11.1f} {pkn:>5} {bt:>11.1f} {btn:>4}",
                        flush=True,
                    )
    finally:
        for w in WAYS:
            loop.run_until_complete(astores[w].close())
        loop.close()
        store.client.delete_table(TableName=table)
        for w in WAYS:
            stores[w].close()


def run(loop: asyncio.AbstractEventLoop, s: Any, requests: list[ClaimRequest]) -> Any:
    out = s.claim_many(requests)
    return loop.run_until_complete(out) if asyncio.iscoroutine(out) else out


def delete(store: Any, keys: list[str]) -> None:
    """Keep the table at its size (untimed): moto's transactions cost grows with it."""
    table, codec = store.settings.table, store.plans.codec
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), 25):
        chunk = unique[start : start + 25]
        deletes = [{"DeleteRequest": {"Key": codec.key(k)}} for k in chunk]
        store.client.batch_write_item(RequestItems={table: deletes})


def preload(store: Any, n: int) -> None:
    """``n`` stored records (BatchWriteItem), as a table in use has."""
    client, table, codec = store.client, store.settings.table, store.plans.codec
    now = time.time_ns() // 1000
    for start in range(0, n, 25):
        records = [
            Record(
                k,
                Status.IN_PROGRESS,
                "f" * 32,
                now,
                now + 600_000_000,
                now + 600_000_000,
                "x",
                now,
                now,
            )
            for k in keys_(min(25, n - start))
        ]
        items = [{"PutRequest": {"Item": codec.item(r)}} for r in records]
        client.batch_write_item(RequestItems={table: items})


if __name__ == "__main__":
    main()
