"""The server kills our connection mid-run (PostgreSQL ``pg_terminate_backend``, MariaDB
``KILL``): the next call reconnects or raises StoreUnavailable; no result reported completed
is lost, and no key is executed twice. On PostgreSQL the async store too."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from pool_watch import PoolWatch, assert_no_leak
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from idem_core.errors import StoreUnavailable
from idem_core.record import ClaimRequest, Status
from idem_core.registry import open_async_store, open_store

T = TypeVar("T")
KEYS = 120
KILL_AT = {20, 50, 51, 90}


@pytest.fixture
def server(db: str, base_url: str) -> Iterator[tuple[str, Engine]]:
    if db == "sqlite":
        pytest.skip("SQLite has no server to kill our connection")
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    yield db, admin
    admin.dispose()


def session_id(db: str, store: Any) -> int:
    pid_sql = "SELECT pg_backend_pid()" if db == "postgresql" else "SELECT CONNECTION_ID()"
    with store.dbapi_connection() as conn:
        cursor = conn.cursor()
        try:
            cursor.execute(pid_sql)
            return int(cursor.fetchall()[0][0])
        finally:
            cursor.close()


def kill_store_connection(db: str, store: Any, admin: Engine) -> int:
    """Kill the server session of the store's one pooled connection; returns its id."""
    pid = session_id(db, store)
    kill = "SELECT pg_terminate_backend(:p)" if db == "postgresql" else "KILL :p"
    with admin.connect() as conn:
        conn.execute(text(kill), {"p": pid})
    return pid


def retrying(call: Callable[[], T], errors: list[StoreUnavailable]) -> T:
    """What a caller does with StoreUnavailable: try again (claims carry their attempt)."""
    for _ in range(5):
        try:
            return call()
        except StoreUnavailable as exc:
            errors.append(exc)
    raise AssertionError(f"the store never came back: {errors[-1]}")


@pytest.mark.slow
def test_killed_connection_reconnects_without_loss_or_duplicates(
    server: tuple[str, Engine], db_url: str
) -> None:
    db, admin = server
    store = open_store(db_url + "&pool_size=1&max_overflow=0")
    watch = PoolWatch(store.engine)
    store.setup()
    run = uuid.uuid4().hex[:8]
    executions: dict[str, int] = {}
    completed: dict[str, bytes] = {}
    errors: list[StoreUnavailable] = []
    killed: set[int] = set()
    try:
        for i in range(KEYS):
            key = f"fault-{run}-{i}"
            if i in KILL_AT:
                killed.add(kill_store_connection(db, store, admin))
            req = ClaimRequest(
                key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=30, ttl=600
            )
            for delivery in range(2):  # every key is delivered twice
                if delivery:
                    req = ClaimRequest(
                        key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=30, ttl=600
                    )
                res = retrying(lambda r=req: store.claim(r), errors)
                if not res.outcome.acquired:
                    continue
                executions[key] = executions.get(key, 0) + 1
                if i + 1 in KILL_AT:
                    killed.add(kill_store_connection(db, store, admin))
                fence = res.fence
                record = retrying(
                    lambda k=key, f=fence: store.complete(k, f, k.encode(), 600), errors
                )
                assert record.status is Status.COMPLETED
                completed[key] = record.result or b""
        assert len(killed) >= len(KILL_AT)
        assert session_id(db, store) not in killed, "the store kept a killed session"
        assert set(executions) == {f"fault-{run}-{i}" for i in range(KEYS)}
        assert set(executions.values()) == {1}, "a key was executed twice"
        for key, result in completed.items():
            record = store.get(key)
            assert record is not None and record.status is Status.COMPLETED, key
            assert record.result == result
        assert all(exc.__cause__ is not None for exc in errors)
    finally:
        assert_no_leak(store, watch)


async def aretrying(call: Callable[[], Awaitable[T]], errors: list[StoreUnavailable]) -> T:
    for _ in range(5):
        try:
            return await call()
        except StoreUnavailable as exc:
            errors.append(exc)
    raise AssertionError(f"the store never came back: {errors[-1]}")


async def akill_store_connection(store: Any, admin: Engine) -> int:
    async with store.dbapi_connection() as conn:
        cursor = await conn.execute("SELECT pg_backend_pid()")
        pid = int((await cursor.fetchone())[0])
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    return pid


@pytest.mark.slow
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)  # psycopg 3's fast path
async def test_async_killed_connection_reconnects_without_loss_or_duplicates(
    server: tuple[str, Engine], db_url: str
) -> None:
    """The same on the async store's psycopg fast path (PostgreSQL)."""
    _, admin = server
    store = open_async_store(db_url + "&pool_size=1&max_overflow=0")
    assert store.fast_path
    watch = PoolWatch(store.engine.sync_engine)
    await store.setup()
    run = uuid.uuid4().hex[:8]
    executions: dict[str, int] = {}
    completed: dict[str, bytes] = {}
    errors: list[StoreUnavailable] = []
    killed: set[int] = set()
    try:
        for i in range(KEYS):
            key = f"afault-{run}-{i}"
            if i in KILL_AT:
                killed.add(await akill_store_connection(store, admin))
            for _delivery in range(2):  # every key is delivered twice
                req = ClaimRequest(
                    key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=30, ttl=600
                )
                res = await aretrying(lambda r=req: store.claim(r), errors)
                if not res.outcome.acquired:
                    continue
                executions[key] = executions.get(key, 0) + 1
                if i + 1 in KILL_AT:
                    killed.add(await akill_store_connection(store, admin))
                fence = res.fence
                record = await aretrying(
                    lambda k=key, f=fence: store.complete(k, f, k.encode(), 600), errors
                )
                assert record.status is Status.COMPLETED
                completed[key] = record.result or b""
        assert len(killed) >= len(KILL_AT)
        assert await akill_store_connection(store, admin) not in killed
        assert set(executions) == {f"afault-{run}-{i}" for i in range(KEYS)}
        assert set(executions.values()) == {1}, "a key was executed twice"
        for key, result in completed.items():
            record = await aretrying(lambda k=key: store.get(k), errors)
            assert record is not None and record.status is Status.COMPLETED, key
            assert record.result == result
        assert all(exc.__cause__ is not None for exc in errors)
    finally:
        assert store.engine.sync_engine.pool.checkedout() == store.idle_connections
        await store.close()
        assert watch.out == 0, "close() kept a connection"


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_connection_left_mid_command_is_replaced_not_reused(db_url: str) -> None:
    """A connection whose protocol state is unknown after an error (a reply cut short, a
    command still in progress) never goes back to the store's cache: the call that finds it
    so replaces it and runs once more, instead of every later call failing on it."""
    store = open_store(db_url + "&pool_size=1&max_overflow=0")
    try:
        store.setup()
        assert store.get(f"busy-{uuid.uuid4().hex}") is None
        with store.dbapi_connection() as conn:
            conn.pgconn.send_query(b"SELECT 1")  # sent, its reply never read
        for _ in range(3):
            assert store.get(f"busy-{uuid.uuid4().hex}") is None
        assert store.engine.pool.checkedout() == store.idle_connections
    finally:
        store.close()


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
async def test_async_connection_left_mid_command_is_replaced_not_reused(db_url: str) -> None:
    store = open_async_store(db_url + "&pool_size=1&max_overflow=0")
    assert store.fast_path
    try:
        await store.setup()
        async with store.dbapi_connection() as conn:
            conn.pgconn.send_query(b"SELECT 1")
        for _ in range(3):
            assert await store.get(f"busy-{uuid.uuid4().hex}") is None
        assert store.engine.sync_engine.pool.checkedout() == store.idle_connections
    finally:
        await store.close()


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_watched_statements_replace_a_connection_left_mid_command(db_url: str) -> None:
    """The same on SQLAlchemy's Connection, the path taken while statements are watched."""
    store = open_store(db_url + "&pool_size=1&max_overflow=0")
    seen: list[str] = []
    try:
        store.setup()
        event.listen(store.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        with store.engine.connect() as conn:
            conn.connection.dbapi_connection.pgconn.send_query(b"SELECT 1")
        for _ in range(3):
            assert store.get(f"busy-{uuid.uuid4().hex}") is None
        assert seen
    finally:
        store.close()
