"""Races between processes, and faults: killed connections, a restarted or frozen server."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import redis
from redis_servers import RedisServer, with_params

from idem_core import ClaimOutcome, ClaimRequest, Status
from idem_core.errors import StoreUnavailable
from idem_core.registry import open_async_store, open_store

PROCESSES = 8
KEYS = 500


def req(key: str, attempt: str | None = None, lease: float = 30.0) -> ClaimRequest:
    return ClaimRequest(
        key=key, fingerprint="f" * 32, attempt=attempt or uuid.uuid4().hex, lease=lease, ttl=120
    )


def _worker(url: str, keys: list[str], start: float, out: Any) -> None:
    store = open_store(url)
    executed = []
    order = list(keys)
    random.shuffle(order)
    time.sleep(max(0.0, start - time.time()))
    for key in order:
        res = store.claim(req(key))
        if res.outcome.acquired:
            executed.append(key)  # the "execution"
            store.complete(key, res.fence, b"done", 120)
    store.close()
    out.put(executed)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_eight_processes_exactly_one_execution_per_key(
    where: str, redis_url: str, cluster_url: str
) -> None:
    url = redis_url if where == "standalone" else cluster_url
    run = uuid.uuid4().hex
    keys = [f"race-{run}-{i}" for i in range(KEYS)]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_worker, args=(url, keys, start, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    executed: list[str] = []
    for _ in procs:
        executed.extend(queue.get(timeout=120))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    counts = Counter(executed)
    assert set(counts) == set(keys)
    assert max(counts.values()) == 1
    store = open_store(url)
    try:
        records = [store.get(k) for k in keys]
        assert all(r is not None and r.status is Status.COMPLETED for r in records)
    finally:
        store.close()


def _until_ok(fn: Any, seconds: float = 30.0) -> Any:
    """A caller that retries the same call (same attempt) after StoreUnavailable.

    Bounded in time, not in tries: with every connection killed every few milliseconds, a
    call needs a new connection, its handshake and the command between two kills, and on a
    loaded machine (2 CPUs shared by the whole suite) twenty tries in a row can miss."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_client_kill_mid_run(where: str, request: pytest.FixtureRequest) -> None:
    if where == "cluster":
        cluster = request.getfixturevalue("cluster")
        url, ports = with_params(cluster.url, prefix=f"kill-{uuid.uuid4().hex}:"), cluster.ports
    else:
        server = request.getfixturevalue("own_server")
        url, ports = with_params(server.url, prefix="kill:"), [server.port]
    url = with_params(url, timeout=2, client_name="idemkill")
    admins = [redis.Redis(port=p) for p in ports]
    store = open_store(url)
    stop = threading.Event()
    killed = [0]

    def killer() -> None:
        while not stop.is_set():
            for a in admins:
                killed[0] += int(
                    a.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                )
            time.sleep(0.005)

    t = threading.Thread(target=killer)
    t.start()
    unavailable = 0
    completed: dict[str, int] = {}
    try:
        for i in range(300):
            key = f"k{i}"
            r = req(key)
            try:
                res = store.claim(r)
            except StoreUnavailable:
                unavailable += 1
                res = _until_ok(lambda r=r: store.claim(r))  # the same attempt: recognised
            assert res.outcome is ClaimOutcome.CLAIMED
            try:
                store.complete(key, res.fence, b"ok", 120)
            except StoreUnavailable:
                unavailable += 1
                _until_ok(lambda key=key, f=res.fence: store.complete(key, f, b"ok", 120))
            completed[key] = res.fence
    finally:
        stop.set()
        t.join()
    assert killed[0] > 0
    for key, fence in completed.items():
        rec = store.get(key)
        assert rec is not None and rec.status is Status.COMPLETED and rec.fence == fence
    store.close()
    for a in admins:
        a.close()


@pytest.mark.slow
def test_restart_keeps_completed_records_and_recovers(own_server: RedisServer) -> None:
    url = with_params(own_server.url, prefix="restart:", timeout=0.5, retries=1)
    store = open_store(url)
    fences = {}
    for i in range(50):
        res = store.claim(req(f"k{i}"))
        store.complete(f"k{i}", res.fence, b"kept", 120)
        fences[f"k{i}"] = res.fence
    own_server.kill()  # SIGKILL: only what was fsynced survives (appendfsync always)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.claim(req("during"))
    assert time.monotonic() - start < 3
    own_server.start()
    rec = _until_ok(lambda: store.get("k0"))  # reconnects; scripts reload after NOSCRIPT
    assert rec is not None
    for key, fence in fences.items():
        res = store.claim(req(key))
        assert res.outcome is ClaimOutcome.COMPLETED
        assert res.record.fence == fence and res.record.result == b"kept"
    fresh = store.claim(req("after"))
    assert fresh.outcome is ClaimOutcome.CLAIMED
    store.close()


@pytest.mark.slow
def test_frozen_server_times_out(own_server: RedisServer) -> None:
    """A server that stops answering: StoreUnavailable within (retries+1) x timeout."""
    url = with_params(own_server.url, prefix="frozen:", timeout=0.5, retries=1)
    store = open_store(url)
    store.get("warm")
    own_server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.claim(req("k"))
        elapsed = time.monotonic() - start
        assert elapsed < 2 * 0.5 + 1.0, elapsed
    finally:
        own_server.resume()
    assert _until_ok(lambda: store.claim(req("k2"))).outcome is ClaimOutcome.CLAIMED
    store.close()


@pytest.mark.slow
async def test_frozen_server_times_out_async(own_server: RedisServer) -> None:
    url = with_params(own_server.url, prefix="frozen:", timeout=0.5, retries=1)
    store = open_async_store(url)
    await store.get("warm")
    own_server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.claim(req("k"))
        elapsed = time.monotonic() - start
        assert elapsed < 2 * 0.5 + 1.0, elapsed
    finally:
        own_server.resume()
    for _ in range(20):
        try:
            res = await store.claim(req("k2"))
            break
        except StoreUnavailable:
            await asyncio.sleep(0.02)
    assert res.outcome is ClaimOutcome.CLAIMED
    await store.close()
