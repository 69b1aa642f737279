"""Not a test: PostgreSQL's ``claim_many``, statements per batch (1/10/100 new keys, 9/27/99
mixed keys as in test_sql_batch_claims.py) and the time of ``claim_many(100)`` (median).

    .venv/bin/python tests/sql/batch_claims.py [reps]

To measure another version of the backend, put its ``backends`` directory first on
``PYTHONPATH``. Works in a table of its own, dropped at the end.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import idem_sql
from sqlalchemy import create_engine, text
from test_sql_batch_claims import _prepare, req
from test_sql_round_trips import Counter, counting_store

BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def main(reps: int) -> None:
    table = f"idem_batch_{uuid.uuid4().hex[:8]}"
    print("idem_sql from", idem_sql.__file__)
    counter = Counter()
    store = counting_store(f"{BASE}?table={table}", counter)
    try:
        store.setup()
        store.now()
        counter.take()
        for n in (1, 10, 100):
            store.claim_many([req(f"m-{uuid.uuid4().hex}") for _ in range(n)])
            print(f"new   n={n:3}: {counter.take()} statements")
        for n in (9, 27, 99):
            batch = _prepare(store, n)
            counter.take()
            store.claim_many([r for _, r in batch])
            print(f"mixed n={n:3}: {counter.take()} statements")
        times: dict[str, list[float]] = {"new": [], "mixed": []}
        for _ in range(reps):
            new = [req(f"m-{uuid.uuid4().hex}") for _ in range(100)]
            mixed = [r for _, r in _prepare(store, 99)] + [req(f"m-{uuid.uuid4().hex}")]
            for name, batch in (("new", new), ("mixed", mixed)):
                start = time.perf_counter()
                store.claim_many(batch)
                times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            print(
                f"claim_many(100) {name:5}: median {statistics.median(ts) * 1e3:.2f} ms "
                f"(min {min(ts) * 1e3:.2f}, max {max(ts) * 1e3:.2f}, {reps} runs)"
            )
    finally:
        store.close()
        engine = create_engine(BASE)
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
