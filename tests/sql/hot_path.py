"""Not a test: p50 of a first call and of a replay through the public API, against a held
DBAPI cursor's ``SELECT 1`` on the same kind of connection (issue 3's hot-path targets).

    .venv/bin/python tests/sql/hot_path.py [sqlite,postgresql,mysql] [calls] [rounds]

Each round measures ``SELECT 1`` (the better of one run before and one after), then ``calls``
first calls (claim + complete) and ``calls`` replays; the medians over rounds are printed.
The machine may be shared: compare runs made one after the other, and mind ``uptime``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text

from idem_core import Idempotency

URLS = {
    "sqlite": "sqlite:///{tmp}/hot_path.db",
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/test",
}


def p50(call: Callable[[int], Any], n: int) -> float:
    """Median microseconds of ``n`` calls."""
    times = []
    clock = time.perf_counter_ns
    for i in range(n):
        start = clock()
        call(i)
        times.append(clock() - start)
    return statistics.median(times) / 1000


def measure(db: str, calls: int, rounds: int) -> str:
    base = URLS[db].format(tmp=tempfile.mkdtemp())
    table = f"idem_hot_{uuid.uuid4().hex[:8]}"
    idem = Idempotency.from_url(f"{base}?table={table}", namespace="hot")
    idem.store.setup()

    @idem.idempotent(key="key")
    def handler(key: str) -> int:
        return 1

    raw = create_engine(base, isolation_level="AUTOCOMMIT").raw_connection()
    cursor = raw.cursor()

    def select_1(_: int) -> None:
        cursor.execute("SELECT 1")
        cursor.fetchall()

    for i in range(200):  # warm up: connections, prepared statements, caches
        handler(f"warm-{i}")
        handler("replay")
        select_1(i)
    rows = []
    for _ in range(rounds):
        run = uuid.uuid4().hex[:8]
        before = p50(select_1, calls)
        first = p50(lambda i, run=run: handler(f"{run}-{i}"), calls)
        replay = p50(lambda _: handler("replay"), calls)
        rows.append((min(before, p50(select_1, calls)), first, replay))
    cursor.close()
    raw.close()
    with idem.store.engine.connect() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.commit()
    idem.store.close()
    select = statistics.median(r[0] for r in rows)
    first = statistics.median(r[1] for r in rows)
    replay = statistics.median(r[2] for r in rows)
    first_x = statistics.median(r[1] / r[0] for r in rows)
    replay_x = statistics.median(r[2] / r[0] for r in rows)
    return (
        f"{db:10} SELECT 1 {select:7.1f} us | first call {first:7.1f} us ({first_x:5.1f}x)"
        f" | replay {replay:7.1f} us ({replay_x:5.1f}x)"
    )


def main() -> None:
    dbs = sys.argv[1].split(",") if len(sys.argv) > 1 else list(URLS)
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 600
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    for db in dbs:
        print(measure(db, calls, rounds), flush=True)


if __name__ == "__main__":
    main()
