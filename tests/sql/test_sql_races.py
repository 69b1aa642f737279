"""8 processes deliver the same 500 keys at once: exactly one execution per key, per database."""

from __future__ import annotations

import multiprocessing
import time
import uuid

import pytest
from sql_workers import executions_table, run_race
from sqlalchemy import create_engine, func, select

from idem_core.record import Status
from idem_core.registry import open_store

PROCESSES = 8
KEYS = 500


@pytest.mark.slow
def test_eight_processes_one_execution_per_key(db_url: str, base_url: str) -> None:
    run = uuid.uuid4().hex[:8]
    keys = [f"race-{run}-{i}" for i in range(KEYS)]
    exec_name = f"idem_exec_{run}"
    side = create_engine(base_url)
    table = executions_table(exec_name)
    table.metadata.create_all(side)
    store = open_store(db_url)
    store.setup()
    try:
        start = time.time() + 3.0  # every child imported and connected before the first claim
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(PROCESSES) as pool:
            executed = pool.map(run_race, [(db_url, base_url, exec_name, keys, start)] * PROCESSES)
        assert sum(executed) == KEYS
        with side.connect() as conn:
            counts = dict(
                conn.execute(select(table.c.key, func.count()).group_by(table.c.key)).all()
            )
        assert set(counts) == set(keys)
        assert set(counts.values()) == {1}, "a key was executed twice"
        for key in keys[:: KEYS // 50]:
            record = store.get(key)
            assert record is not None and record.status is Status.COMPLETED
            assert record.result == key.encode()
    finally:
        store.close()
        table.drop(side, checkfirst=True)
        side.dispose()
