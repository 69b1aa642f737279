"""``idem bench``: a first, short scenario on memory:// (the full suite replaces it)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence

from idem_core import Idempotency


@dataclasses.dataclass
class Receipt:
    order_id: str
    amount: int


def _raw(order_id: str, amount: int) -> Receipt:
    return Receipt(order_id, amount)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idem bench")
    parser.add_argument("--ops", type=int, default=50_000)
    args = parser.parse_args(argv)
    idem = Idempotency.from_url("memory://", namespace="bench")
    charge = idem.idempotent(key="order_id", ttl=3600, lease=30)(_raw)
    keys = [f"order-{i}" for i in range(args.ops)]
    t0 = time.perf_counter()
    for k in keys:
        _raw(k, 1)
    raw = (time.perf_counter() - t0) / args.ops
    t0 = time.perf_counter()
    for k in keys:
        charge(k, 1)
    first = (time.perf_counter() - t0) / args.ops
    t0 = time.perf_counter()
    for k in keys:
        charge(k, 1)
    replay = (time.perf_counter() - t0) / args.ops
    print(f"memory:// sync, {args.ops} ops each")
    print(f"  first call overhead: {(first - raw) * 1e6:.2f} us")
    print(f"  replay overhead:     {(replay - raw) * 1e6:.2f} us")
    return 0
