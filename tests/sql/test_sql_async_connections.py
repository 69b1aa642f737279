"""The async store's connections on PostgreSQL: with psycopg 3 it runs its statements on the
driver's own ``AsyncConnection``\\ s, kept checked out between calls within the pool's bounds
and all given back on close(); other drivers, statement listeners and the caller's
connection keep SQLAlchemy's path."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pool_watch import PoolWatch
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from idem_core.record import ClaimOutcome, ClaimRequest, Status
from idem_core.registry import open_async_store


def req(key: str) -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=30, ttl=60)


# The fast path is psycopg 3's: PostgreSQL only.
pytestmark = pytest.mark.parametrize("db", ["postgresql"], indirect=True)


@pytest.fixture
def pg_url(db_url: str) -> str:
    return db_url


@pytest.fixture
async def astore(pg_url: str) -> AsyncIterator[Any]:
    store = open_async_store(pg_url)
    await store.setup()
    watch = PoolWatch(store.engine.sync_engine)
    yield store
    await store.close()
    assert watch.out == 0, "close() kept a connection"


async def backend_pid(store: Any) -> int:
    async with store.dbapi_connection() as conn:
        cursor = await conn.execute("SELECT pg_backend_pid()")
        return int((await cursor.fetchone())[0])


async def test_psycopg_takes_the_fast_path_and_close_returns_everything(astore: Any) -> None:
    assert astore.fast_path
    pool = astore.engine.sync_engine.pool
    key = f"fast-{uuid.uuid4().hex}"
    res = await astore.claim(req(key))
    assert res.outcome is ClaimOutcome.CLAIMED
    # The call's connection stayed checked out, in the store's cache, not in a Connection.
    assert astore.idle_connections == 1
    assert pool.checkedout() == 1
    first = await backend_pid(astore)
    await astore.complete(key, res.fence, b"r", 60)
    assert (await astore.claim(req(key))).outcome is ClaimOutcome.COMPLETED
    assert await backend_pid(astore) == first, "every call ran on the same connection"
    await astore.close()
    assert astore.idle_connections == 0
    assert pool.checkedout() == 0


async def test_other_async_drivers_keep_sqlalchemys_path(pg_url: str) -> None:
    store = open_async_store(pg_url.replace("postgresql+psycopg://", "postgresql+asyncpg://"))
    try:
        assert not store.fast_path
        res = await store.claim(req(f"apg-{uuid.uuid4().hex}"))
        assert res.outcome is ClaimOutcome.CLAIMED
        assert store.idle_connections == 0
        assert store.engine.sync_engine.pool.checkedout() == 0
    finally:
        await store.close()


async def test_tasks_share_the_cache_within_the_pools_bounds(pg_url: str) -> None:
    store = open_async_store(pg_url + "&pool_size=2&max_overflow=0&pool_timeout=30")
    watch = PoolWatch(store.engine.sync_engine)
    await store.setup()
    peak = 0
    run = uuid.uuid4().hex[:8]

    async def worker(n: int) -> None:
        nonlocal peak
        for i in range(20):
            key = f"task-{run}-{n}-{i}"
            res = await store.claim(req(key))
            peak = max(peak, watch.out)
            await store.complete(key, res.fence, b"x", 60)
            assert (await store.claim(req(key))).outcome is ClaimOutcome.COMPLETED

    try:
        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(8))), 120)
        assert peak <= 2
        assert store.idle_connections <= 2
    finally:
        await store.close()
    assert watch.out == 0


async def test_a_pool_of_one_serves_setup_diagnostics_and_transactional_completion(
    base_url: str, pg_url: str
) -> None:
    table = f"idem_one_{uuid.uuid4().hex[:8]}"
    store = open_async_store(f"{base_url}?table={table}&pool_size=1&max_overflow=0&pool_timeout=3")
    watch = PoolWatch(store.engine.sync_engine)
    try:
        key = f"one-{uuid.uuid4().hex}"
        res = await store.claim(req(key))  # no table yet: created on the way
        assert res.outcome is ClaimOutcome.CLAIMED
        assert store.idle_connections == 1
        assert (await store.diagnostics())["table"] == table
        assert "already exists" in await store.setup()
        await store.claim(req(f"one-{uuid.uuid4().hex}"))
        record = await store.complete(key, res.fence, b"x", 60, with_items=[text("SELECT 1")])
        assert record.status is Status.COMPLETED
        assert (await store.claim(req(key))).outcome is ClaimOutcome.COMPLETED
    finally:
        async with store.dbapi_connection() as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await store.close()
    assert watch.out == 0


async def test_statement_listeners_still_see_every_statement(astore: Any) -> None:
    key = f"ev-{uuid.uuid4().hex}"
    res = await astore.claim(req(key))
    seen: list[str] = []

    def before(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    sync_engine = astore.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", before)
    try:
        await astore.complete(key, res.fence, b"x", 60)
        assert (await astore.claim(req(key))).outcome is ClaimOutcome.COMPLETED
        assert seen, "the listener saw nothing"
        assert astore.idle_connections == 0
    finally:
        event.remove(sync_engine, "before_cursor_execute", before)


async def test_callers_engine_is_used_in_autocommit_and_left_as_it_was(
    base_url: str, pg_url: str
) -> None:
    engine = create_async_engine(base_url)
    watch = PoolWatch(engine.sync_engine)
    store = open_async_store(pg_url, client=engine)
    key = f"conn-{uuid.uuid4().hex}"
    try:
        assert store.fast_path
        await store.setup()
        res = await store.claim(req(key))
        async with store.dbapi_connection() as conn:
            assert conn.autocommit
        await store.complete(key, res.fence, b"r", 60)
        assert store.idle_connections <= 1, "the caller's pool is the caller's"
    finally:
        await store.close()
    assert watch.out == 0
    async with engine.connect() as conn:  # not disposed, and back at its own isolation level
        raw = await conn.get_raw_connection()
        assert not raw.driver_connection.autocommit
        await conn.execute(text("SELECT 1"))
    await engine.dispose()


async def test_a_cancelled_call_gives_up_its_connection(astore: Any) -> None:
    """Cancelled inside the driver, the connection's state is unknown: it is invalidated,
    not cached, and the next call runs on a fresh one."""
    await astore.claim(req(f"cancel-{uuid.uuid4().hex}"))
    pid = await backend_pid(astore)

    def sleeping() -> Any:  # one statement that sleeps: the cancellation lands in the driver
        rows = yield (text("SELECT pg_sleep(5)"), {})
        return rows

    task = asyncio.ensure_future(astore._run(lambda: astore._execute(sleeping())))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert astore.idle_connections == 0
    assert astore.engine.sync_engine.pool.checkedout() == 0
    assert await astore.now() > 0
    assert await backend_pid(astore) != pid


def test_forked_child_leaves_the_parents_connections_alone(pg_url: str) -> None:
    async def parent_setup(store: Any) -> int:
        await store.setup()
        await store.claim(req(f"fork-{uuid.uuid4().hex}"))
        return await backend_pid(store)

    store = open_async_store(pg_url)
    pid = asyncio.run(parent_setup(store))
    child_key = f"fork-{uuid.uuid4().hex}"
    fork = os.fork()
    if fork == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:

            async def child() -> bool:
                ok = store.idle_connections == 0
                ok = ok and (await store.claim(req(child_key))).outcome is ClaimOutcome.CLAIMED
                ok = ok and await backend_pid(store) != pid
                await store.close()
                return ok

            code = 0 if asyncio.run(child()) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(fork, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    async def parent_after() -> None:
        # The parent's connection survived the child: still the same session, still working.
        assert await backend_pid(store) == pid
        assert (await store.claim(req(child_key))).outcome is ClaimOutcome.IN_PROGRESS
        await store.close()

    asyncio.run(parent_after())


async def test_pool_recycle_still_replaces_old_connections(pg_url: str) -> None:
    store = open_async_store(pg_url + "&pool_recycle=1")
    try:
        await store.setup()
        first = await backend_pid(store)
        await asyncio.sleep(1.2)
        assert (await store.claim(req(f"old-{uuid.uuid4().hex}"))).outcome is ClaimOutcome.CLAIMED
        assert await backend_pid(store) != first
    finally:
        await store.close()


async def test_the_callers_connection_keeps_sqlalchemys_path(base_url: str, pg_url: str) -> None:
    engine = create_async_engine(base_url)
    try:
        async with engine.connect() as conn:
            store = open_async_store(pg_url, client=conn)
            assert not store.fast_path
            await store.setup()
            key = f"bound-{uuid.uuid4().hex}"
            transaction = await conn.begin()
            bound = store.bind(conn)
            assert not bound.fast_path
            assert (await bound.claim(req(key))).outcome is ClaimOutcome.CLAIMED
            await transaction.rollback()  # the claim was the caller's transaction's
            assert await store.get(key) is None
    finally:
        await engine.dispose()
