"""Coalescing on PostgreSQL (psycopg 3), sync and async: concurrent operations of one store
share round trips (:mod:`idem_sql.coalesce`), with the same race guarantees.

To make a batch happen deterministically, a test first *occupies* the store's one flight with
a statement that sleeps on the server; operations submitted meanwhile queue, and go in one
flush when it ends.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from conftest import server_url, with_params
from fault_proxy import FaultProxy
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from idem_core import Idempotency
from idem_core.errors import (
    AlreadyInProgress,
    ConfigurationError,
    LeaseLost,
    StoreUnavailable,
)
from idem_core.record import ClaimOutcome, ClaimRequest, Status
from idem_core.registry import open_async_store, open_store

HOLD = 0.6  # seconds the occupying statement sleeps: time for the others to queue


@pytest.fixture(scope="module")
def pg_url() -> str:
    return with_params(server_url("postgresql"), table=f"idem_co_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module", autouse=True)
def _table(pg_url: str) -> Iterator[None]:
    store = open_store(pg_url)
    store.setup()
    yield
    with store._connect() as conn:
        table = make_url(pg_url).query["table"]
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        conn.execute(text(f"DROP TABLE IF EXISTS {table}_steps"))
        conn.commit()
    store.close()


@pytest.fixture
def store(pg_url: str) -> Iterator[Any]:
    s = open_store(pg_url)
    yield s
    assert s.engine.pool.checkedout() == s.idle_connections, "a connection leaked"
    s.close()


@pytest.fixture
async def astore(pg_url: str) -> AsyncIterator[Any]:
    s = open_async_store(pg_url)
    yield s
    assert s.engine.sync_engine.pool.checkedout() == s.idle_connections, "a connection leaked"
    await s.close()


def sleeper(seconds: float, then: Callable[[], None] | None = None) -> Any:
    """A program that holds its connection (and the store's flight) for ``seconds``."""
    yield text(f"SELECT pg_sleep({seconds})"), {}
    if then is not None:
        then()  # runs in the flush, after the reply, before the next flush starts


def occupy(store: Any, seconds: float = HOLD, then: Callable[[], None] | None = None) -> Any:
    """Start a thread whose operation holds the store's one flight; returns the thread."""
    thread = threading.Thread(target=store._coalescer.run, args=(sleeper(seconds, then),))
    thread.start()
    time.sleep(0.1)  # it is in flight
    return thread


async def aoccupy(store: Any, seconds: float = HOLD, then: Any = None) -> asyncio.Task[Any]:
    task = asyncio.create_task(store._coalescer.run(sleeper(seconds, then)))
    await asyncio.sleep(0.1)
    return task


def request(key: str, lease: float = 30.0) -> ClaimRequest:
    return ClaimRequest(key, "fp", uuid.uuid4().hex, lease, 60.0)


def threads(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run each function in its own thread, at once; their values or exceptions, in order."""
    out: list[Any] = [None] * len(fns)
    gate = threading.Barrier(len(fns))

    def run(i: int) -> None:
        gate.wait()
        try:
            out[i] = fns[i]()
        except BaseException as exc:
            out[i] = exc

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return out


def xmins(store: Any, keys: list[str]) -> set[int]:
    """The transactions that last wrote these rows (one round of a flush is one)."""
    with store._connect() as conn:
        rows = conn.execute(
            text(f"SELECT xmin::text FROM {store.sql.t} WHERE key = ANY(:keys)"), {"keys": keys}
        ).all()
        conn.commit()
    assert len(rows) == len(keys)
    return {int(r[0]) for r in rows}


# -- the batch runner ----------------------------------------------------------------------


def test_queued_claims_go_in_one_round_trip(store: Any) -> None:
    keys = [f"one-{uuid.uuid4().hex}" for _ in range(20)]
    holder = occupy(store)
    results = threads([lambda k=k: store.claim(request(k)) for k in keys])
    holder.join()
    assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED] * len(keys)
    assert [r.record.key for r in results] == keys
    assert store._coalescer.batches >= 1
    # Written by one transaction: one round, one Sync, one commit.
    assert len(xmins(store, keys)) == 1


async def test_queued_claims_go_in_one_round_trip_async(astore: Any, store: Any) -> None:
    keys = [f"aone-{uuid.uuid4().hex}" for _ in range(20)]
    holder = await aoccupy(astore)
    results = await asyncio.gather(*(astore.claim(request(k)) for k in keys))
    await holder
    assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED] * len(keys)
    assert [r.record.key for r in results] == keys
    assert astore._coalescer.batches >= 1
    assert len(xmins(store, keys)) == 1


def test_each_operation_gets_its_own_outcome(store: Any) -> None:
    """A claim, a completion, a zombie's completion, a release and a statement that fails,
    all in one flush: each gets its own answer, and the failure stays its own."""
    held, done, released = (f"own-{i}-{uuid.uuid4().hex}" for i in range(3))
    claims = {k: store.claim(request(k)) for k in (done, released)}
    fence = claims[done].fence

    def failing() -> Any:
        yield text("SELECT 1 / 0"), {"key": ""}

    holder = occupy(store)
    results = threads(
        [
            lambda: store.claim(request(held)),
            lambda: store.complete(done, fence, b"ok", 60.0),
            lambda: store.complete(done, fence + 1, b"zombie", 60.0),
            lambda: store.release(released, claims[released].fence),
            lambda: store._coalescer.run(failing()),
        ]
    )
    holder.join()
    claimed, completed, zombie, release, failed = results
    assert claimed.outcome is ClaimOutcome.CLAIMED
    # The zombie may run before or after the completion: it is refused either way.
    assert isinstance(zombie, LeaseLost), repr(zombie)
    assert completed.status is Status.COMPLETED and completed.result == b"ok"
    assert release is None
    assert isinstance(failed, DBAPIError) and "division by zero" in str(failed)
    assert store._coalescer.batches >= 1
    assert store.get(done).result == b"ok"
    assert store.get(released) is not None


async def test_each_operation_gets_its_own_outcome_async(astore: Any) -> None:
    held, done = (f"aown-{i}-{uuid.uuid4().hex}" for i in range(2))
    fence = (await astore.claim(request(done))).fence

    def failing() -> Any:
        yield text("SELECT 1 / 0"), {"key": ""}

    holder = await aoccupy(astore)
    claimed, completed, zombie, failed = await asyncio.gather(
        astore.claim(request(held)),
        astore.complete(done, fence, b"ok", 60.0),
        astore.complete(done, fence + 1, b"zombie", 60.0),
        astore._coalescer.run(failing()),
        return_exceptions=True,
    )
    await holder
    assert claimed.outcome is ClaimOutcome.CLAIMED
    assert isinstance(zombie, LeaseLost), repr(zombie)
    assert completed.result == b"ok"
    assert isinstance(failed, DBAPIError) and "division by zero" in str(failed)
    assert astore._coalescer.batches >= 1


def test_completions_share_a_round(store: Any) -> None:
    """Completions of distinct keys in one flush: each record gets its own result, expiry
    and fence check (a zombie among them is refused), all in one transaction."""
    keys = [f"done-{i}-{uuid.uuid4().hex}" for i in range(10)]
    fences = {k: store.claim(request(k)).fence for k in keys}
    zombie = f"zdone-{uuid.uuid4().hex}"
    old = store.claim(request(zombie, lease=0.2))
    time.sleep(0.4)
    assert store.claim(request(zombie)).outcome is ClaimOutcome.TOOK_OVER
    holder = occupy(store)
    results = threads(
        [lambda k=k: store.complete(k, fences[k], k.encode(), 120.0) for k in keys]
        + [lambda: store.complete(zombie, old.fence, b"zombie", 60.0)]
    )
    holder.join()
    *done, refused = results
    assert isinstance(refused, LeaseLost), repr(refused)
    for key, record in zip(keys, done, strict=True):
        assert record.key == key and record.status is Status.COMPLETED, repr(record)
        assert record.result == key.encode() and record.fence == fences[key]
        assert 110e6 < record.expires_at - record.updated_at <= 120e6
        assert store.get(key) == record
    assert store.get(zombie).status is Status.IN_PROGRESS
    assert len(xmins(store, keys)) == 1


async def test_completions_share_a_round_async(astore: Any, store: Any) -> None:
    keys = [f"adone-{i}-{uuid.uuid4().hex}" for i in range(10)]
    fences = {k: (await astore.claim(request(k))).fence for k in keys}
    holder = await aoccupy(astore)
    done = await asyncio.gather(
        *(astore.complete(k, fences[k], k.encode(), 120.0) for k in keys),
        astore.complete(keys[0], fences[keys[0]] + 1, b"zombie", 60.0),
        return_exceptions=True,
    )
    await holder
    assert isinstance(done[-1], LeaseLost), repr(done[-1])
    for key, record in zip(keys, done, strict=False):
        assert record.result == key.encode() and record.fence == fences[key], repr(record)
    assert len(xmins(store, keys)) == 1


# -- race guarantees -----------------------------------------------------------------------


def test_storm_one_key_one_run(pg_url: str) -> None:
    """64 threads call with one key while a flush is in flight: the function runs once."""
    idem = Idempotency.from_url(pg_url, namespace=f"st{uuid.uuid4().hex[:6]}", lease=30.0)
    runs: Counter[str] = Counter()

    @idem.idempotent(key="key")
    def work(key: str) -> str:
        runs[key] += 1
        time.sleep(0.05)
        return f"done-{key}"

    key = f"storm-{uuid.uuid4().hex}"
    try:
        holder = occupy(idem.store)
        results = threads([lambda: work(key)] * 64)
        holder.join()
        assert runs[key] == 1
        assert store_batches(idem.store) >= 1
        for r in results:
            assert r == f"done-{key}" or isinstance(r, AlreadyInProgress), repr(r)
        assert work(key) == f"done-{key}"
    finally:
        idem.close()


def store_batches(store: Any) -> int:
    return int(store._coalescer.batches)


async def test_storm_one_key_one_run_async(pg_url: str) -> None:
    idem = Idempotency.from_url(pg_url, namespace=f"ast{uuid.uuid4().hex[:6]}", lease=30.0)
    runs: Counter[str] = Counter()

    @idem.idempotent(key="key")
    async def work(key: str) -> str:
        runs[key] += 1
        await asyncio.sleep(0.05)
        return f"done-{key}"

    key = f"astorm-{uuid.uuid4().hex}"
    try:
        holder = await aoccupy(idem.astore)
        results = await asyncio.gather(*(work(key) for _ in range(64)), return_exceptions=True)
        await holder
        assert runs[key] == 1
        assert store_batches(idem.astore) >= 1
        for r in results:
            assert r == f"done-{key}" or isinstance(r, AlreadyInProgress), repr(r)
        assert await work(key) == f"done-{key}"
    finally:
        await idem.aclose()


def test_zombie_is_refused_in_a_batch(store: Any) -> None:
    """A lease that lapsed and was taken over: the old holder's completion, batched with the
    new holder's, is refused; the new holder's result stands."""
    key = f"zombie-{uuid.uuid4().hex}"
    old = store.claim(request(key, lease=0.2))
    time.sleep(0.4)
    new = store.claim(request(key))
    assert new.outcome is ClaimOutcome.TOOK_OVER and new.fence > old.fence
    holder = occupy(store)
    zombie, winner = threads(
        [
            lambda: store.complete(key, old.fence, b"zombie", 60.0),
            lambda: store.complete(key, new.fence, b"winner", 60.0),
        ]
    )
    holder.join()
    assert isinstance(zombie, LeaseLost), repr(zombie)
    assert winner.result == b"winner"
    assert store._coalescer.batches >= 1
    assert store.get(key).result == b"winner"


async def test_zombie_is_refused_in_a_batch_async(astore: Any) -> None:
    key = f"azombie-{uuid.uuid4().hex}"
    old = await astore.claim(request(key, lease=0.2))
    await asyncio.sleep(0.4)
    new = await astore.claim(request(key))
    assert new.outcome is ClaimOutcome.TOOK_OVER
    holder = await aoccupy(astore)
    zombie, winner = await asyncio.gather(
        astore.complete(key, old.fence, b"zombie", 60.0),
        astore.complete(key, new.fence, b"winner", 60.0),
        return_exceptions=True,
    )
    await holder
    assert isinstance(zombie, LeaseLost), repr(zombie)
    assert winner.result == b"winner"
    assert astore._coalescer.batches >= 1


@pytest.mark.slow
def test_processes_of_threads_one_execution_per_key(pg_url: str) -> None:
    """4 processes of 8 threads deliver the same 200 keys, each thread in its own order:
    batches of different processes contend for the same rows (and may deadlock, then be
    replayed one by one); still exactly one execution per key, every record completed."""
    from coalesce_workers import threaded_race
    from sql_workers import executions_table
    from sqlalchemy import create_engine, func, select

    run = uuid.uuid4().hex[:8]
    keys = [f"prace-{run}-{i}" for i in range(200)]
    base = pg_url.split("?", 1)[0]
    side = create_engine(base)
    table = executions_table(f"idem_cexec_{run}")
    table.metadata.create_all(side)
    try:
        start = time.time() + 3.0
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4) as pool:
            out = pool.map(threaded_race, [(pg_url, base, table.name, keys, start, 8)] * 4)
        assert sum(executed for executed, _ in out) == len(keys)
        assert sum(batches for _, batches in out) > 0, "nothing was coalesced"
        with side.connect() as conn:
            counts = dict(
                conn.execute(select(table.c.key, func.count()).group_by(table.c.key)).all()
            )
        assert set(counts) == set(keys)
        assert set(counts.values()) == {1}, "a key was executed twice"
        store = open_store(pg_url)
        try:
            for key in keys:
                record = store.get(key)
                assert record is not None and record.result == key.encode()
        finally:
            store.close()
    finally:
        table.drop(side, checkfirst=True)
        side.dispose()


# -- lost replies --------------------------------------------------------------------------


@pytest.fixture
def proxied(pg_url: str) -> Iterator[tuple[str, FaultProxy]]:
    url = make_url(pg_url)
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        through = url.set(port=proxy.port).render_as_string(hide_password=False)
        yield with_params(through, connect_timeout=2, read_timeout=2), proxy


def check_lost(results: list[Any], runs: Counter[str], keys: list[str], cut: bool) -> None:
    for key, r in zip(keys, results, strict=True):
        if isinstance(r, BaseException):
            assert isinstance(r, StoreUnavailable), repr(r)
            assert r.__cause__ is not None
            assert runs[key] == 0
        else:
            # Recovered: a reply cut once, then the store's one retry on a new connection.
            assert cut, "succeeded through a dead path"
            assert r == f"done-{key}"
            assert runs[key] == 1
    assert max(runs.values(), default=0) <= 1


@pytest.mark.parametrize("fault", ["reset_mid_reply", "reset", "blackhole"])
def test_lost_replies_during_a_flush(proxied: tuple[str, FaultProxy], fault: str) -> None:
    url, proxy = proxied
    idem = Idempotency.from_url(url, namespace=f"lr{uuid.uuid4().hex[:6]}", lease=60.0)
    runs: Counter[str] = Counter()

    @idem.idempotent(key="key")
    def work(key: str) -> str:
        runs[key] += 1
        return f"done-{key}"

    keys = [f"lost-{i}-{uuid.uuid4().hex}" for i in range(8)]
    try:
        work(f"warm-{uuid.uuid4().hex}")
        # The fault strikes as the occupier's flush ends: the next reply (the batch's) is
        # cut, or every connection is reset and no new one is accepted, or the server goes
        # silent (the flush times out: its connection is closed, never pooled again).
        holder = occupy(idem.store, then=getattr(proxy, fault))
        results = threads([lambda k=k: work(k) for k in keys])
        holder.join()
        assert store_batches(idem.store) >= 1
        check_lost(results, runs, keys, cut=fault == "reset_mid_reply")
        if fault != "reset_mid_reply":
            assert all(isinstance(r, StoreUnavailable) for r in results)
        proxy.heal()
        for key, r in zip(keys, results, strict=True):
            try:
                again = work(key)
            except AlreadyInProgress:
                assert isinstance(r, StoreUnavailable)  # claimed, reply lost: lease holds it
            else:
                assert again == f"done-{key}"
            assert runs[key] <= 1
        store: Any = idem.store
        assert store.engine.pool.checkedout() == store.idle_connections
    finally:
        proxy.heal()
        idem.close()


@pytest.mark.parametrize("fault", ["reset_mid_reply", "reset", "blackhole"])
async def test_lost_replies_during_a_flush_async(
    proxied: tuple[str, FaultProxy], fault: str
) -> None:
    url, proxy = proxied
    idem = Idempotency.from_url(url, namespace=f"alr{uuid.uuid4().hex[:6]}", lease=60.0)
    runs: Counter[str] = Counter()

    @idem.idempotent(key="key")
    async def work(key: str) -> str:
        runs[key] += 1
        return f"done-{key}"

    keys = [f"alost-{i}-{uuid.uuid4().hex}" for i in range(8)]
    try:
        await work(f"warm-{uuid.uuid4().hex}")
        holder = await aoccupy(idem.astore, then=getattr(proxy, fault))
        results = await asyncio.gather(*(work(k) for k in keys), return_exceptions=True)
        await holder
        assert store_batches(idem.astore) >= 1
        check_lost(list(results), runs, keys, cut=fault == "reset_mid_reply")
        if fault != "reset_mid_reply":
            assert all(isinstance(r, StoreUnavailable) for r in results)
        proxy.heal()
        for key, r in zip(keys, results, strict=True):
            try:
                again = await work(key)
            except AlreadyInProgress:
                assert isinstance(r, StoreUnavailable)
            else:
                assert again == f"done-{key}"
            assert runs[key] <= 1
        store: Any = idem.astore
        assert store.engine.sync_engine.pool.checkedout() == store.idle_connections
    finally:
        proxy.heal()
        await idem.aclose()


# -- when it is off, and at concurrency 1 ----------------------------------------------------


def test_one_at_a_time_never_batches(store: Any) -> None:
    """At concurrency 1 each operation flushes alone, on the plain path (no pipeline)."""
    for i in range(20):
        key = f"c1-{i}-{uuid.uuid4().hex}"
        claim = store.claim(request(key))
        store.complete(key, claim.fence, b"r", 60.0)
        store.claim(request(key))
    assert store._coalescer.batches == 0


def test_coalesce_0_turns_it_off(pg_url: str) -> None:
    store = open_store(with_params(pg_url, coalesce=0))
    astore = open_async_store(with_params(pg_url, coalesce="off"))
    try:
        assert store._coalescer is None and astore._coalescer is None
        keys = [f"off-{uuid.uuid4().hex}" for _ in range(8)]
        results = threads([lambda k=k: store.claim(request(k)) for k in keys])
        assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED] * len(keys)
    finally:
        store.close()
    assert open_store(pg_url)._coalescer is not None  # on by default
    with pytest.raises(ConfigurationError, match="coalesce"):
        open_store(with_params(pg_url, coalesce=2))


def test_bound_store_never_coalesces(store: Any) -> None:
    with store.engine.connect() as conn:
        view = store.bind(conn)
        assert view._coalescer is None
        key = f"bound-{uuid.uuid4().hex}"
        claim = view.claim(request(key))
        view.complete(key, claim.fence, b"r", 60.0)
        conn.commit()
    assert store.get(key).result == b"r"


def test_other_dialects_keep_their_path(tmp_path: Any) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'co.db'}")
    try:
        assert store._coalescer is None
    finally:
        store.close()
