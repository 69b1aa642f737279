"""8 processes race over the same 200 keys on each server: every key executes exactly once."""

from __future__ import annotations

import collections
import multiprocessing
import uuid

import ddb_race
import pytest
from ddb_servers import Server

PROCESSES = 8
KEYS = 200


@pytest.mark.slow
def test_eight_processes_two_hundred_keys_one_execution_each(server: Server) -> None:
    prefix = uuid.uuid4().hex
    keys = [f"race-{prefix}-{i}" for i in range(KEYS)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=ddb_race.worker, args=(server.url(), keys, barrier, out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    reports = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [(who, err) for who, _, _, err in reports if err]
    assert not errors, errors
    executions = collections.Counter(k for _, executed, _, _ in reports for k in executed)
    assert sorted(executions) == sorted(keys)
    assert set(executions.values()) == {1}, executions.most_common(3)
    outcomes: collections.Counter[str] = collections.Counter()
    for _, _, counts, _ in reports:
        outcomes.update(counts)
    assert sum(outcomes.values()) == PROCESSES * KEYS
    assert outcomes["claimed"] + outcomes["took_over"] == KEYS
    assert outcomes["took_over"] == 0  # leases are long: nobody should look stalled
    # Every record holds the result of the worker that executed it.
    by_key = {k: who for who, executed, _, _ in reports for k in executed}
    with server.open() as store:
        for key in keys[:: KEYS // 20]:
            rec = store.get(key)
            assert rec is not None and rec.result == by_key[key].encode()
