"""Coalescing (issue 14): concurrent calls of one process share round trips, on Redis and
Redis Cluster, sync and async. Each test records the size of every flush, so it also checks
that calls were in fact sent together."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from fault_proxy import FaultProxy
from idem_redis.common import parse
from redis_servers import RedisServer, with_params

from idem_core import ClaimOutcome, ClaimRequest, CorruptRecord, LeaseLost
from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.registry import open_async_store, open_store
from idem_core.testing.race import task_race, thread_race


def req(key: str, attempt: str | None = None, lease: float = 30.0) -> ClaimRequest:
    return ClaimRequest(key, "f" * 32, attempt or uuid.uuid4().hex, lease, 120)


def recorded(store: Any) -> list[int]:
    """Record the number of calls of each flush of ``store`` (its batcher is rebuilt on the
    recording flush; nothing else changes)."""
    sizes: list[int] = []
    flush = store._flush

    if asyncio.iscoroutinefunction(flush):

        async def aflush(ops: Any) -> Any:
            sizes.append(len(ops))
            return await flush(ops)

        store._flush = aflush
    else:

        def sflush(ops: Any) -> Any:
            sizes.append(len(ops))
            return flush(ops)

        store._flush = sflush
    store._batcher = store._coalescer()
    assert store._batcher is not None
    return sizes


@pytest.fixture(params=["standalone", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    base = request.getfixturevalue("redis_url" if request.param == "standalone" else "cluster_url")
    return with_params(base.split("?")[0], prefix=f"co-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def raw(url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    if url.startswith("redis+cluster"):
        cluster = request.getfixturevalue("cluster")
        client: Any = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    else:
        client = redis.Redis.from_url(url.split("?")[0])
    yield client
    client.close()


def test_threads_storm_one_key_one_claim(url: str) -> None:
    store = open_store(url)
    sizes = recorded(store)
    try:
        for _ in range(10):
            outcomes = thread_race(store, uuid.uuid4().hex, threads=32)
            assert sum(o.acquired for o in outcomes) == 1
            assert outcomes.count(ClaimOutcome.IN_PROGRESS) == 31
            if max(sizes) > 1:
                break
        assert max(sizes) > 1, sizes  # the threads' claims did share round trips
    finally:
        store.close()


async def test_tasks_storm_one_key_one_claim(url: str) -> None:
    store = open_async_store(url)
    sizes = recorded(store)
    try:
        await store.get("warm")  # connected, scripts loaded
        sizes.clear()
        for _ in range(3):
            outcomes = await task_race(store, uuid.uuid4().hex, tasks=64)
            assert sum(o.acquired for o in outcomes) == 1
            assert outcomes.count(ClaimOutcome.IN_PROGRESS) == 63
        # the first task's claim goes alone, the 63 others in the next round trip
        assert sizes[:2] == [1, 63], sizes
    finally:
        await store.close()


async def _setup(store: Any, raw: Any) -> dict[str, Any]:
    keys = {name: f"{name}-{uuid.uuid4().hex}" for name in ("held", "done", "new", "zombie")}
    held = await store.claim(req(keys["held"]))
    done = await store.claim(req(keys["done"]))
    await store.complete(keys["done"], done.fence, b"kept", 60)
    lapsed = await store.claim(req(keys["zombie"], lease=0.05))
    await asyncio.sleep(0.1)
    successor = await store.claim(req(keys["zombie"]))
    assert successor.outcome is ClaimOutcome.TOOK_OVER
    keys["corrupt"] = f"corrupt-{uuid.uuid4().hex}"
    raw.set(store.prefix + keys["corrupt"], b"not a record")
    return {"keys": keys, "held": held.fence, "stale": lapsed.fence, "successor": successor}


async def test_one_round_trip_answers_each_call_with_its_own_outcome(url: str, raw: Any) -> None:
    """Claims, a replay, a complete, a zombie's stale complete and a corrupt record in the same
    flush: each call gets its own outcome, an error for one does not touch the others."""
    store = open_async_store(url)
    sizes = recorded(store)
    try:
        s = await _setup(store, raw)
        keys = s["keys"]
        sizes.clear()
        got = await asyncio.gather(
            store.get("warm"),  # goes alone; the rest queue behind it
            store.claim(req(keys["new"])),
            store.claim(req(keys["done"])),
            store.complete(keys["held"], s["held"], b"r", 60),
            store.complete(keys["zombie"], s["stale"], b"zombie", 60),
            store.get(keys["corrupt"]),
            store.renew(keys["zombie"], s["successor"].fence, 30),
            store.release(keys["new"] + "-never", 1),
            return_exceptions=True,
        )
        assert sizes == [1, 7], sizes
        assert got[1].outcome is ClaimOutcome.CLAIMED
        assert got[2].outcome is ClaimOutcome.COMPLETED and got[2].record.result == b"kept"
        assert got[3].result == b"r"
        assert isinstance(got[4], LeaseLost)
        assert isinstance(got[5], CorruptRecord)
        assert got[6].fence == s["successor"].fence
        assert got[7] is None
        rec = await store.get(keys["zombie"])
        assert rec is not None and rec.fence == s["successor"].fence and rec.result is None
    finally:
        await store.close()


def test_threads_mixed_calls(url: str, raw: Any) -> None:
    """The sync twin: many threads, each its own sequence; batches form as they overlap."""
    store = open_store(url)
    sizes = recorded(store)
    try:
        keys = [uuid.uuid4().hex for _ in range(200)]

        def first_call_and_replay(key: str) -> None:
            res = store.claim(req(key))
            assert res.outcome is ClaimOutcome.CLAIMED
            store.renew(key, res.fence, 30)
            store.complete(key, res.fence, key.encode(), 60)
            with pytest.raises(LeaseLost):
                store.complete(key, res.fence - 1, b"stale", 60)
            again = store.claim(req(key))
            assert again.outcome is ClaimOutcome.COMPLETED and again.record.result == key.encode()

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(first_call_and_replay, keys))
        assert max(sizes) > 1, sizes
        assert sum(sizes) == 5 * len(keys)
    finally:
        store.close()


async def test_noscript_in_a_batch_is_sent_again_with_eval(own_server: RedisServer) -> None:
    store = open_async_store(with_params(own_server.url, prefix="noscript:"))
    sizes = recorded(store)
    admin = redis.Redis(port=own_server.port)
    try:
        await store.get("warm")
        admin.script_flush()
        got = await asyncio.gather(*(store.claim(req(f"k{i}")) for i in range(20)))
        assert all(r.outcome is ClaimOutcome.CLAIMED for r in got)
        assert sizes[-2:] == [1, 19]
    finally:
        admin.close()
        await store.close()


def test_noscript_in_a_sync_batch(own_server: RedisServer, cluster_url: str) -> None:
    for url, admins in (
        (with_params(own_server.url, prefix="noscript:"), [redis.Redis(port=own_server.port)]),
        (cluster_url, None),
    ):
        store = open_store(url)
        try:
            store.get("warm")
            if admins is None:
                admins = [
                    store.client.get_redis_connection(n) for n in store.client.get_primaries()
                ]
            for admin in admins:
                admin.script_flush()
            got = store.claim_many([req(uuid.uuid4().hex) for _ in range(30)])
            assert all(r.outcome is ClaimOutcome.CLAIMED for r in got)
        finally:
            store.close()


@pytest.mark.parametrize("retries", [0, 1])
def test_reply_lost_mid_pipeline(retries: int, redis_url: str) -> None:
    """The connection is reset in the middle of a batch's replies. With a retry, the calls
    whose replies were lost are sent again and recognised (same attempt): no claim runs
    twice. Without, they are StoreUnavailable, and the caller's retry is recognised too."""
    with FaultProxy("127.0.0.1", 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0?timeout=2&retries={retries}"
        store = open_store(f"{url}&prefix=lost-{uuid.uuid4().hex[:8]}:")
        asyncs = asyncio.run(_lost_async(proxy, url, retries))
        try:
            store.get("warm")
            requests = [req(uuid.uuid4().hex) for _ in range(50)]
            proxy.reset_mid_reply()
            if retries:
                first = store.claim_many(requests)
            else:
                with pytest.raises(StoreUnavailable):
                    store.claim_many(requests)
                first = store.claim_many(requests)  # the same attempts: recognised
            assert all(r.outcome is ClaimOutcome.CLAIMED for r in first)
            for r, res in zip(requests, first, strict=True):
                rec = store.get(r.key)
                assert rec is not None and rec.attempt == r.attempt and rec.fence == res.fence
        finally:
            store.close()
    assert asyncs > 0


async def _lost_async(proxy: FaultProxy, url: str, retries: int) -> int:
    """The async twin, through the batcher: ``retries=0`` fails the calls whose replies were
    cut, and only those; re-sent with the same attempts, every claim is recognised."""
    store = open_async_store(f"{url}&prefix=alost-{uuid.uuid4().hex[:8]}:")
    sizes = recorded(store)
    try:
        await store.get("warm")
        requests = [req(uuid.uuid4().hex) for _ in range(40)]
        proxy.reset_mid_reply()
        got = await asyncio.gather(*(store.claim(r) for r in requests), return_exceptions=True)
        assert max(sizes) > 1
        lost = [r for r, g in zip(requests, got, strict=True) if isinstance(g, StoreUnavailable)]
        assert all(
            isinstance(g, StoreUnavailable) or g.outcome is ClaimOutcome.CLAIMED for g in got
        )
        assert bool(lost) == (retries == 0)
        again = await asyncio.gather(*(store.claim(r) for r in requests))
        for r, res in zip(requests, again, strict=True):
            assert res.outcome is ClaimOutcome.CLAIMED, res  # the same attempt, never re-run
            assert res.record.attempt == r.attempt
        return len(requests)
    finally:
        await store.close()


@pytest.mark.slow
async def test_connections_killed_mid_pipeline(url: str, request: pytest.FixtureRequest) -> None:
    """Connections killed every few milliseconds while batches fly: every call either
    answers or is StoreUnavailable; retried with the same attempt and fence, each key is
    claimed once (never taken over) and completed with that claim's fence."""
    if url.startswith("redis+cluster"):
        ports = request.getfixturevalue("cluster").ports
    else:
        ports = [int(url.split(":")[2].split("/")[0])]
    url = with_params(url, timeout=2, client_name="idemcoalkill")
    admins = [redis.Redis(port=p) for p in ports]
    stop = threading.Event()
    killed = [0]

    def killer() -> None:
        # By id, only this test's connections: the standalone server is shared.
        while not stop.is_set():
            for a in admins:
                for c in a.client_list():
                    if c.get("name") == "idemcoalkill":
                        killed[0] += int(a.client_kill_filter(_id=c["id"]))
            time.sleep(0.005)

    async def until_ok(make: Any) -> Any:
        deadline = time.monotonic() + 30
        while True:
            try:
                return await make()
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    store = open_async_store(url)
    sizes = recorded(store)
    t = threading.Thread(target=killer)
    t.start()
    try:

        async def one(key: str) -> int:
            r = req(key)
            res = await until_ok(lambda: store.claim(r))
            assert res.outcome is ClaimOutcome.CLAIMED, res
            await until_ok(lambda: store.complete(key, res.fence, b"ok", 120))
            return int(res.fence)

        keys = [f"kill-{uuid.uuid4().hex}" for _ in range(200)]
        fences = await asyncio.gather(*(one(k) for k in keys))
    finally:
        stop.set()
        t.join()
    try:
        assert killed[0] > 0 and max(sizes) > 1
        for key, fence in zip(keys, fences, strict=True):
            rec = await store.get(key)
            assert rec is not None and rec.fence == fence and rec.result == b"ok"
    finally:
        await store.close()
        for a in admins:
            a.close()


def test_coalesce_url_option(redis_url: str) -> None:
    assert parse("redis://h").coalesce is True
    assert parse("redis://h?coalesce=0").coalesce is False
    assert parse("redis+cluster://a:7000?coalesce=off").coalesce is False
    with pytest.raises(ConfigurationError, match="coalesce"):
        parse("redis://h?coalesce=maybe")
    store = open_store(with_params(redis_url, coalesce=0))
    try:
        assert store._batcher is None
        assert store.claim(req(uuid.uuid4().hex)).outcome is ClaimOutcome.CLAIMED
    finally:
        store.close()
    # WAIT counts one connection's writes: no coalescing with wait_replicas
    store = open_store(with_params(redis_url, wait_replicas=1))
    assert store._batcher is None
    store.close()
