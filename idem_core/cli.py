"""``idem``: check, set up and purge stores, and run the benchmarks."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from .errors import IdempotencyError
from .record import ClaimRequest
from .registry import open_store
from .store import Store


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def check(url: str, out: Any = sys.stdout) -> int:
    """Claim, complete, read back and delete one record; print timings and clock skew."""
    store = open_store(url)
    try:
        key = f"idem-check:{uuid.uuid4().hex}"
        req = ClaimRequest(key, "0" * 32, uuid.uuid4().hex, 30.0, 60.0)
        timings: list[tuple[str, float]] = []

        def timed(name: str, fn: Any, *args: Any) -> Any:
            t0 = time.perf_counter()
            value = fn(*args)
            timings.append((name, time.perf_counter() - t0))
            return value

        res = timed("claim", store.claim, req)
        timed("complete", store.complete, key, res.fence, b"\x01\xa2ok", 60.0)
        rec = timed("get", store.get, key)
        timed("delete", store.delete, key)
        if rec is None or rec.result != b"\x01\xa2ok":
            print(f"FAILED: the record read back does not match: {rec!r}", file=out)
            return 1
        print(f"store: {url}  ({type(store).__module__}.{type(store).__qualname__})", file=out)
        for name, took in timings:
            print(f"  {name:<9} {_ms(took)}", file=out)
        print(f"  total     {_ms(sum(t for _, t in timings))}", file=out)
        if store.server_clock:
            t0 = time.time()
            server = store.now() / 1e6
            t1 = time.time()
            skew = server - (t0 + t1) / 2
            print(f"  clock skew (server - local): {skew * 1000:+.3f} ms", file=out)
        else:
            print("  clock: leases are judged by this client's clock", file=out)
        diagnostics = getattr(store, "diagnostics", None)
        if diagnostics is not None:
            for name, value in diagnostics().items():
                print(f"  {name}: {value}", file=out)
        print("OK", file=out)
        return 0
    finally:
        store.close()


def setup(url: str, out: Any = sys.stdout) -> int:
    store = open_store(url)
    try:
        fn = getattr(store, "setup", None)
        print(fn() if fn is not None else f"{url}: nothing to set up", file=out)
        return 0
    finally:
        store.close()


def purge(url: str, batch: int, out: Any = sys.stdout) -> int:
    store: Store = open_store(url)
    try:
        fn = getattr(store, "purge_expired", None)
        if fn is None:
            print(f"{url}: this store expires records itself; nothing to purge", file=out)
            return 0
        print(f"purged {fn(batch=batch)} expired records", file=out)
        return 0
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from idem_bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="idem", description="idem-core command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="claim, complete, read back and delete one record")
    p.add_argument("url")
    p = sub.add_parser("setup", help="create the table, indexes and TTL settings")
    p.add_argument("url")
    p = sub.add_parser("purge", help="delete expired records in bounded batches")
    p.add_argument("url")
    p.add_argument("--batch", type=int, default=1000)
    sub.add_parser("bench", help="run the benchmarks (idem bench --help)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return check(args.url)
        if args.command == "setup":
            return setup(args.url)
        return purge(args.url, args.batch)
    except IdempotencyError as exc:
        print(f"idem: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
