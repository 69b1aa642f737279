"""The stores' connection caches: pooled DBAPI connections kept checked out between calls.

The sync store on an Engine runs each statement, compiled once per dialect, on a DBAPI
cursor of a pooled connection it keeps checked out between calls (:class:`ConnectionCache`):
SQLAlchemy's per-call ``Connection`` and result machinery would cost several times the
database round trip itself. The async store does the same with psycopg 3
(:class:`AsyncConnectionCache`), on the driver's ``AsyncConnection`` without SQLAlchemy's
greenlet bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool, PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from .ops import SQL, Program, Rows

T = TypeVar("T")

# Engines this package created: a forked child drops their pooled connections (the parent
# still uses those sockets) and opens its own.
_owned: weakref.WeakSet[Engine] = weakref.WeakSet()
_owned_lock = threading.Lock()
_caches: weakref.WeakSet[_CachePolicy] = weakref.WeakSet()
# Connections a forked child inherited: kept referenced forever, since closing them (or
# letting the pool's finalizer reset them) would talk on the parent's sockets.
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    for cache in list(_caches):
        cache.forget()
    for engine in list(_owned):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def own(engine: Engine) -> None:
    with _owned_lock:
        _owned.add(engine)


_Entry = tuple[PoolProxiedConnection, Any, float]
_NEVER = float("inf")


class _CachePolicy:
    """What the sync and async caches decide alike: how many connections stay idle, when
    one is too old to reuse, and what a forked child does with them.

    A call takes the most recently used connection, or checks one out of the pool when none
    is idle (so the pool's size, overflow and timeout still bound and throttle the total),
    and puts it back afterwards. At most ``cap`` connections stay idle here, and none while
    a call waits on the pool: those go back to the pool.
    """

    def __init__(self, engine: Engine, sql: SQL, *, owned: bool) -> None:
        self.engine = engine
        self.sql = sql
        # The DBAPI-level Dialect methods are typed for PEP 249 objects the drivers lack.
        self.dialect: Any = engine.dialect
        self.dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self.idle: deque[_Entry] = deque()
        pool = engine.pool
        size = getattr(pool, "size", None)
        if isinstance(pool, NullPool):
            self.cap = 0  # the caller asked for a connection per checkout
        elif owned and callable(size):
            self.cap = max(1, int(size()))
        else:
            # The caller's engine serves the caller too: do not sit on its pool.
            self.cap = 1
        # A caller's engine hands out connections at its own isolation level.
        self.autocommit = not owned
        recycle = getattr(pool, "_recycle", -1)
        self.recycle = float(recycle) if isinstance(recycle, int | float) and recycle >= 0 else -1
        self._waiting = 0
        _caches.add(self)

    def _deadline(self) -> float:
        return time.monotonic() + self.recycle if self.recycle >= 0 else _NEVER

    def _stale(self, entry: _Entry) -> bool:
        # Stale ones go back to the pool, which replaces them if older than pool_recycle.
        return self.recycle >= 0 and time.monotonic() > entry[2]

    def _keeps(self) -> bool:
        # While a call waits on the pool, connections go back there, not to the cache: the
        # waiting call would never see them here.
        return not self._waiting and len(self.idle) < self.cap

    def _error(self, entry: _Entry, exc: Exception, sql: str, args: Any) -> DBAPIError:
        """SQLAlchemy's wrapping of a driver error, saying whether the connection is gone."""
        dbapi_connection = entry[0].dbapi_connection
        disconnect = bool(self.dialect.is_disconnect(exc, dbapi_connection, entry[1]))
        # SQLAlchemy asks psycopg only whether the socket is closed; a connection still
        # open but mid-command (a reply cut short) would fail every later call on it.
        disconnect = disconnect or mid_command(dbapi_connection)
        error = DBAPIError.instance(
            sql,
            args,
            exc,
            self.dbapi_error,
            connection_invalidated=disconnect,
            dialect=self.dialect,
        )
        assert isinstance(error, DBAPIError)  # always, for an error of the driver's
        return error

    def forget(self) -> None:
        """In a forked child: drop the parent's connections without touching them."""
        _inherited.extend(self.idle)
        self.idle.clear()
        self._waiting = 0


class ConnectionCache(_CachePolicy):
    """A LIFO of the engine pool's DBAPI connections (with a cursor each), kept checked out
    between calls so that a call costs one ``deque.pop`` instead of a pool checkout.

    A connection-level error invalidates the connection (and, as SQLAlchemy does, every
    connection the pool handed out before it); :meth:`close` returns them all.
    """

    def __init__(self, engine: Engine, sql: SQL, *, owned: bool) -> None:
        super().__init__(engine, sql, owned=owned)
        self._lock = threading.Lock()
        weakref.finalize(self, _return_all, self.idle, self.dialect, self.autocommit)

    def _checkout(self) -> _Entry:
        conn = _raw_connection(self.engine, self.dialect, self.autocommit)
        try:
            cursor = conn.cursor()
        except BaseException:
            conn.invalidate()
            raise
        return conn, cursor, self._deadline()

    def checkout(self) -> _Entry:
        """The most recently used idle connection (unless too old), or one from the pool;
        the caller hands it back with :meth:`put_back` or :meth:`invalidate`."""
        try:
            entry = self.idle.pop()
        except IndexError:
            return self._take()
        if self._stale(entry):
            _give_back(entry, self.dialect, self.autocommit)
            return self._take()
        return entry

    def run(self, program: Program[T]) -> T:
        entry = self.checkout()
        cursor = entry[1]
        compiled = self.sql.compiled
        in_driver = False
        sql = ""
        args: Any = None
        try:
            step = next(program)
            while True:
                stmt, params = step
                sql, layout, returns_rows = compiled(stmt)
                args = layout(params)
                in_driver = True
                cursor.execute(sql, args)
                rows = cursor.fetchall() if returns_rows else []
                count = cursor.rowcount
                in_driver = False
                step = program.send(Rows(rows, count))
        except StopIteration as stop:
            self._put_back(entry)
            return stop.value  # type: ignore[no-any-return]
        except self.dbapi_error as exc:
            error = self._error(entry, exc, sql, args)
            if error.connection_invalidated:
                self._invalidate(entry, exc)
            else:
                self._put_back(entry)
            raise error from exc
        except BaseException:
            if in_driver:
                # Interrupted inside the driver: the protocol state is unknown.
                entry[0].invalidate()
            else:
                # The program raised between statements (LeaseLost, CorruptRecord...).
                self._put_back(entry)
            raise

    def _take(self) -> _Entry:
        """An idle connection, or one from the pool (waiting for one as the pool does)."""
        with self._lock:
            if self.idle:
                return self.idle.pop()
            self._waiting += 1
        try:
            return self._checkout()
        finally:
            with self._lock:
                self._waiting -= 1

    def _put_back(self, entry: _Entry) -> None:
        with self._lock:
            if self._keeps():
                self.idle.append(entry)
                return
        _give_back(entry, self.dialect, self.autocommit)

    def _invalidate(self, entry: _Entry, exc: BaseException) -> None:
        _invalidate_pool(self.engine, entry[0], exc)
        self.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """One of the cache's DBAPI connections, for as long as the block lasts."""
        entry = self._take()
        try:
            yield entry[0].dbapi_connection
        except BaseException:
            entry[0].invalidate()
            raise
        self._put_back(entry)

    def close(self) -> None:
        """Every idle connection back to the pool."""
        _return_all(self.idle, self.dialect, self.autocommit)

    def forget(self) -> None:
        super().forget()
        # The parent's other threads are gone, and may have held the lock at the fork.
        self._lock = threading.Lock()


def mid_command(dbapi_connection: Any) -> bool:
    """Whether a psycopg connection is in no state to take a statement: a command still
    in progress, or a protocol state libpq no longer knows. Other drivers close a
    connection they cannot use, which ``is_disconnect`` already sees."""
    status = getattr(getattr(dbapi_connection, "info", None), "transaction_status", None)
    return getattr(status, "name", None) in ("ACTIVE", "UNKNOWN")


def _raw_connection(engine: Engine, dialect: Any, autocommit: bool) -> PoolProxiedConnection:
    """A pooled connection, in autocommit mode (ours are already)."""
    conn = engine.raw_connection()
    try:
        if autocommit:
            dialect.set_isolation_level(conn.dbapi_connection, "AUTOCOMMIT")
    except BaseException:
        conn.invalidate()
        raise
    return conn


def _invalidate_pool(engine: Engine, conn: PoolProxiedConnection, exc: BaseException) -> None:
    """Like SQLAlchemy on a disconnect: this connection is closed, and every other one the
    pool opened before now is replaced at its next checkout (the server may have restarted);
    the caller then returns its idle ones to the pool, to be replaced there."""
    pool_invalidate = getattr(engine.pool, "_invalidate", None)
    if pool_invalidate is not None:
        pool_invalidate(conn, exc)
    else:
        conn.invalidate(exc)


def _give_back(entry: _Entry, dialect: Any, reset: bool) -> None:
    conn, cursor, _ = entry
    try:
        cursor.close()
    except Exception:
        conn.invalidate()
        return
    _check_in(conn, dialect, reset)


def _check_in(conn: PoolProxiedConnection, dialect: Any, reset: bool) -> None:
    """Back to the pool, at the engine's own isolation level if we changed it."""
    try:
        if reset:
            dialect.reset_isolation_level(conn.dbapi_connection)
    except Exception:
        conn.invalidate()
        return
    conn.close()


def _return_all(idle: deque[_Entry], dialect: Any, reset: bool) -> None:
    while True:
        try:
            entry = idle.pop()
        except IndexError:
            return
        _give_back(entry, dialect, reset)


class AsyncConnectionCache(_CachePolicy):
    """The asyncio twin of :class:`ConnectionCache`, for psycopg 3's ``AsyncConnection``:
    statements run on the driver's own async cursor, with no greenlet in between.

    Pool checkouts and checkins (rare: only when the cache is empty or full) go through the
    pool's greenlet bridge, as SQLAlchemy's own async connections do. Calls on one event loop
    interleave only at an ``await``, so the cache needs no lock. Nothing can be awaited at
    garbage collection: :meth:`close` returns the connections.
    """

    def __init__(self, engine: AsyncEngine, sql: SQL, *, owned: bool) -> None:
        super().__init__(engine.sync_engine, sql, owned=owned)

    async def _checkout(self) -> _Entry:
        conn = await greenlet_spawn(_raw_connection, self.engine, self.dialect, self.autocommit)
        driver: Any = conn.driver_connection
        return conn, driver.cursor(), self._deadline()

    async def checkout(self) -> _Entry:
        """The twin of :meth:`ConnectionCache.checkout`."""
        try:
            entry = self.idle.pop()
        except IndexError:
            return await self._take()
        if self._stale(entry):
            await self._give_back(entry)
            return await self._take()
        return entry

    async def run(self, program: Program[T]) -> T:
        entry = await self.checkout()
        cursor = entry[1]
        compiled = self.sql.compiled
        in_driver = False
        sql = ""
        args: Any = None
        try:
            step = next(program)
            while True:
                stmt, params = step
                sql, layout, returns_rows = compiled(stmt)
                args = layout(params)
                in_driver = True
                await cursor.execute(sql, args)
                rows = await cursor.fetchall() if returns_rows else []
                count = cursor.rowcount
                in_driver = False
                step = program.send(Rows(rows, count))
        except StopIteration as stop:
            await self._put_back(entry)
            return stop.value  # type: ignore[no-any-return]
        except self.dbapi_error as exc:
            error = self._error(entry, exc, sql, args)
            if error.connection_invalidated:
                await self._invalidate(entry, exc)
            else:
                await self._put_back(entry)
            raise error from exc
        except BaseException:
            if in_driver:
                # Interrupted inside the driver (a cancelled task): the protocol state is
                # unknown. Shielded, so a second cancellation cannot leak the connection.
                await _shielded(greenlet_spawn(entry[0].invalidate))
            else:
                await self._put_back(entry)
            raise

    async def _take(self) -> _Entry:
        if self.idle:
            return self.idle.pop()
        self._waiting += 1
        try:
            return await self._checkout()
        finally:
            self._waiting -= 1

    async def _put_back(self, entry: _Entry) -> None:
        if self._keeps():
            self.idle.append(entry)
        else:
            await self._give_back(entry)

    async def _give_back(self, entry: _Entry) -> None:
        conn, cursor, _ = entry
        try:
            await cursor.close()
        except Exception:
            await greenlet_spawn(conn.invalidate)
            return
        await greenlet_spawn(_check_in, conn, self.dialect, self.autocommit)

    async def _invalidate(self, entry: _Entry, exc: BaseException) -> None:
        await greenlet_spawn(_invalidate_pool, self.engine, entry[0], exc)
        await self.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """One of the cache's psycopg connections, for as long as the block lasts."""
        entry = await self._take()
        try:
            yield entry[0].driver_connection
        except BaseException:
            await _shielded(greenlet_spawn(entry[0].invalidate))
            raise
        await self._put_back(entry)

    async def close(self) -> None:
        """Every idle connection back to the pool."""
        idle = self.idle
        while idle:
            await self._give_back(idle.pop())


async def _shielded(work: Awaitable[Any]) -> None:
    """Finish ``work`` even if the calling task is cancelled again meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def fast_async(engine: AsyncEngine) -> bool:
    """Whether the async store may run statements on the driver's own connections: psycopg
    3 only (asyncpg, aiosqlite and aiomysql have other calling conventions)."""
    dialect = engine.dialect
    return dialect.name == "postgresql" and dialect.driver == "psycopg" and dialect.is_async
