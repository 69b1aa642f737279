"""Child-process bodies for the SQL race and fault tests (spawned, so importable by name)."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert

from idem_core.record import ClaimRequest
from idem_core.registry import open_store


def executions_table(name: str) -> Table:
    """Side effects, one row per execution; no unique key, so duplicates would show."""
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
    )


def race_worker(url: str, db_url: str, exec_table: str, keys: list[str], start: float) -> int:
    """Deliver every key once: claim, execute (a row in ``exec_table``) if acquired, complete."""
    store = open_store(url)
    side = create_engine(db_url, isolation_level="AUTOCOMMIT")
    table = executions_table(exec_table)
    executed = 0
    try:
        time.sleep(max(0.0, start - time.time()))
        for key in keys:
            req = ClaimRequest(
                key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=60.0, ttl=600.0
            )
            res = store.claim(req)
            if res.outcome.acquired:
                with side.connect() as conn:
                    conn.execute(insert(table).values(key=key, pid=os.getpid()))
                store.complete(key, res.fence, key.encode(), 600.0)
                executed += 1
    finally:
        store.close()
        side.dispose()
    return executed


def run_race(args: Any) -> int:
    return race_worker(*args)
