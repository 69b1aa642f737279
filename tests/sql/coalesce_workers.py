"""Child-process body for the coalescing race test (spawned, so importable by name)."""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from typing import Any

from sql_workers import executions_table
from sqlalchemy import create_engine, insert

from idem_core.record import ClaimRequest
from idem_core.registry import open_store


def threaded_race(args: Any) -> tuple[int, int]:
    """``threads`` threads of one store each deliver every key, in an order of their own:
    claim, execute (a row in the executions table) if acquired, complete. Returns the
    executions and the store's batched flushes."""
    url, db_url, exec_table, keys, start, threads = args
    store = open_store(url)
    side = create_engine(db_url, isolation_level="AUTOCOMMIT")
    table = executions_table(exec_table)
    executed = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def deliver(order: list[str]) -> None:
        try:
            for key in order:
                req = ClaimRequest(key, "fp", uuid.uuid4().hex, 60.0, 600.0)
                res = store.claim(req)
                if not res.outcome.acquired:
                    continue
                with side.connect() as conn:
                    conn.execute(insert(table).values(key=key, pid=os.getpid()))
                store.complete(key, res.fence, key.encode(), 600.0)
                with lock:
                    executed[0] += 1
        except BaseException as exc:
            errors.append(exc)

    orders = [random.sample(keys, len(keys)) for _ in range(threads)]
    workers = [threading.Thread(target=deliver, args=(o,)) for o in orders]
    try:
        time.sleep(max(0.0, start - time.time()))
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
        return executed[0], int(store._coalescer.batches)
    finally:
        store.close()
        side.dispose()
