"""The sync and async SQL stores: they run :mod:`idem_sql.ops` programs on a connection.

Our own engines run in the driver's autocommit mode, so each statement commits on the server
with no BEGIN/COMMIT round trips, and never roll back on check-in. A store bound to the
caller's connection (:meth:`SQLStore.bind`) runs inside the caller's transaction instead.

The sync store on an Engine runs each statement, compiled once per dialect, on a DBAPI
cursor of a pooled connection it keeps checked out between calls (:class:`ConnectionCache`):
SQLAlchemy's per-call ``Connection`` and result machinery would cost several times the
database round trip itself. The async store does the same with psycopg 3
(:class:`AsyncConnectionCache`), on the driver's ``AsyncConnection`` without SQLAlchemy's
greenlet bridge; with other async drivers it runs through SQLAlchemy's ``AsyncConnection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import MetaData, Table, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool, PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.record import ClaimRequest, ClaimResult, Record

from .ops import SQL, Program, Rows
from .schema import MAX_KEY_LENGTH, records_table

T = TypeVar("T")

_MISSING_TABLE = ("no such table", "does not exist", "doesn't exist", "undefinedtable")

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


def _step(program: Program[T], rows: Rows | None) -> tuple[Any, T | None, bool]:
    try:
        step = next(program) if rows is None else program.send(rows)
    except StopIteration as stop:
        return None, stop.value, True
    return step, None, False


def run_sync(conn: Connection, program: Program[T]) -> T:
    step, value, done = _step(program, None)
    while not done:
        stmt, params = step
        result = conn.execute(stmt, params)
        rows = Rows(list(result.fetchall()) if result.returns_rows else [], result.rowcount)
        step, value, done = _step(program, rows)
    return value  # type: ignore[return-value]


async def run_async(conn: AsyncConnection, program: Program[T]) -> T:
    step, value, done = _step(program, None)
    while not done:
        stmt, params = step
        result = await conn.execute(stmt, params)
        rows = Rows(list(result.fetchall()) if result.returns_rows else [], result.rowcount)
        step, value, done = _step(program, rows)
    return value  # type: ignore[return-value]


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
        disconnect = bool(self.dialect.is_disconnect(exc, entry[0].dbapi_connection, entry[1]))
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

    def run(self, program: Program[T]) -> T:
        idle = self.idle
        try:
            entry = idle.pop()
        except IndexError:
            entry = self._take()
        else:
            if self._stale(entry):
                _give_back(entry, self.dialect, self.autocommit)
                entry = self._take()
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

    async def run(self, program: Program[T]) -> T:
        idle = self.idle
        try:
            entry = idle.pop()
        except IndexError:
            entry = await self._take()
        else:
            if self._stale(entry):
                await self._give_back(entry)
                entry = await self._take()
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


def unavailable(exc: BaseException, where: str) -> StoreUnavailable:
    detail = getattr(exc, "orig", None) or exc
    return StoreUnavailable(f"{where}: {type(detail).__name__}: {detail}".strip())


def missing_table(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _MISSING_TABLE)


def retryable(exc: DBAPIError) -> bool:
    """A dropped connection: every program is safe to run again (claims carry their
    ``attempt``, and a repeated complete/release/renew is recognised by the core)."""
    return bool(exc.connection_invalidated)


class _Common:
    max_key_length = MAX_KEY_LENGTH
    server_clock = True

    def __init__(self, sql: SQL, *, create: bool, bound: bool, label: str) -> None:
        self.sql = sql
        self._create = create and not bound
        self._bound = bound
        self._label = label
        self.table: Table = records_table(MetaData(), sql.table)

    def _setup_result(self, existed: bool) -> str:
        if existed:
            return f"table {self.sql.table} already exists; ensured its indexes"
        return f"created table {self.sql.table} and index on expires_at"

    def _diagnostics(self, version: Any) -> dict[str, object]:
        claim_path = {
            "postgresql": "one statement (CTE: snapshot read + INSERT ON CONFLICT RETURNING)",
            "sqlite": "INSERT ON CONFLICT RETURNING; a key this store claimed before: read first",
            "mysql": "INSERT ON DUPLICATE KEY UPDATE + one read",
            "mariadb": "INSERT ON DUPLICATE KEY UPDATE + one read",
        }.get(self.sql.dialect.name, "?")
        return {
            "dialect": self.sql.dialect.name,
            "driver": self.sql.dialect.driver,
            "server_version": version,
            "table": self.sql.table,
            "max_key_length": MAX_KEY_LENGTH,
            "claim_path": claim_path,
            "clock": "database",
            "bound": self._bound,
        }


class SQLStore(_Common):
    """A synchronous store on an Engine (ours or the caller's) or on a Connection."""

    def __init__(
        self,
        sql: SQL,
        *,
        engine: Engine | None = None,
        connection: Connection | None = None,
        owns_engine: bool = False,
        create: bool = True,
        label: str = "sql",
    ) -> None:
        if (engine is None) == (connection is None):
            raise ConfigurationError("SQLStore needs exactly one of engine or connection")
        super().__init__(sql, create=create, bound=connection is not None, label=label)
        self._engine = engine
        self._connection = connection
        self._owns_engine = owns_engine
        self._cache = None if engine is None else ConnectionCache(engine, sql, owned=owns_engine)

    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def idle_connections(self) -> int:
        """Pooled connections this store holds between calls (the rest are in the pool)."""
        return 0 if self._cache is None else len(self._cache.idle)

    @contextlib.contextmanager
    def dbapi_connection(self) -> Iterator[Any]:
        """One of the DBAPI connections the store's calls run on (autocommit), lent for the
        block; for diagnostics and tests. Not for a store bound to a Connection."""
        if self._cache is None:
            raise ConfigurationError("a store on a Connection has no connections of its own")
        with self._cache.connection() as conn:
            yield conn

    def bind(self, connection: Connection) -> SQLStore:
        """A view of this store inside ``connection``'s transaction: the claim and the
        result commit or roll back with the caller's own writes."""
        if not isinstance(connection, Connection):
            raise ConfigurationError(
                f"bind() takes a sqlalchemy Connection, not {type(connection).__name__}"
            )
        return SQLStore(self.sql, connection=connection, create=False, label=self._label)

    def _execute(self, program: Program[T]) -> T:
        if self._connection is not None:
            conn = self._connection
            if conn.in_transaction() or self._bound:
                return run_sync(conn, program)
            # A connection given as client outside any transaction: ours to commit.
            value = run_sync(conn, program)
            if conn.in_transaction():
                conn.commit()
            return value
        cache = self._cache
        assert cache is not None and self._engine is not None
        dispatch = self._engine.dispatch
        if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
            # Someone watches statements (tracing, counting): their listeners expect a
            # Connection, so take the SQLAlchemy path, with the cached connections pooled.
            with self._connect() as conn:
                return run_sync(conn, program)
        return cache.run(program)

    def _release_idle(self) -> None:
        # Our idle connections back to the pool first: with a pool of one, the connection
        # this checkout needs may be sitting in our cache.
        if self._cache is not None:
            self._cache.close()

    def _connect(self) -> Connection:
        """A SQLAlchemy Connection from the engine, for what does not run on the cache."""
        assert self._engine is not None
        self._release_idle()
        return self._engine.connect()

    def _run(self, make: Callable[[], Program[T]]) -> T:
        reconnected = created = False
        while True:
            try:
                return self._execute(make())
            except DBAPIError as exc:
                if not self._bound and not reconnected and retryable(exc):
                    reconnected = True
                    continue
                if self._create and not created and missing_table(exc):
                    created = True
                    self.setup()
                    continue
                raise unavailable(exc, self._label) from exc
            except SQLAlchemyError as exc:
                raise unavailable(exc, self._label) from exc
            except OSError as exc:
                raise unavailable(exc, self._label) from exc

    def claim(self, request: ClaimRequest) -> ClaimResult:
        return self._run(lambda: self.sql.claim(request, autocommit=self._cache is not None))

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        if not requests:
            return []
        return self._run(lambda: self.sql.claim_many(requests))

    def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        if not with_items:
            return self._run(lambda: self.sql.complete(key, fence, result, ttl))
        return self._complete_with(key, fence, result, ttl, with_items)

    def _complete_with(
        self, key: str, fence: int, result: bytes, ttl: float, items: Sequence[Any]
    ) -> Record:
        """The caller's statements and the result in one transaction; LeaseLost undoes both."""
        if self._connection is not None and (self._bound or self._connection.in_transaction()):
            for item in items:
                _execute_item(self._connection, item)
            return self._run(lambda: self.sql.complete(key, fence, result, ttl))
        try:
            with self._transaction() as conn:
                for item in items:
                    _execute_item(conn, item)
                return run_sync(conn, self.sql.complete(key, fence, result, ttl))
        except SQLAlchemyError as exc:
            raise unavailable(exc, self._label) from exc

    def _transaction(self) -> Any:
        if self._connection is not None:
            return _CommitOnExit(self._connection)
        assert self._engine is not None
        level = self._engine.dialect.default_isolation_level or "SERIALIZABLE"
        self._release_idle()
        return _TransactionOn(self._engine, level)

    def release(self, key: str, fence: int) -> None:
        self._run(lambda: self.sql.release(key, fence))

    def renew(self, key: str, fence: int, lease: float) -> Record:
        return self._run(lambda: self.sql.renew(key, fence, lease))

    def get(self, key: str) -> Record | None:
        return self._run(lambda: self.sql.get(key))

    def delete(self, key: str) -> None:
        self._run(lambda: self.sql.delete(key))

    def now(self) -> int:
        return self._run(self.sql.now_program)

    def purge_expired(self, batch: int = 1000) -> int:
        """Delete expired records, ``batch`` rows per statement; returns how many."""
        if batch < 1:
            raise ConfigurationError("batch must be at least 1")
        return self._run(lambda: self.sql.purge(batch))

    def setup(self) -> str:
        """Create the table and its index if missing; says what it did."""
        try:
            if self._connection is not None:
                return self._setup_on(self._connection)
            assert self._engine is not None
            with self._connect() as conn:
                return self._setup_on(conn)
        except SQLAlchemyError as exc:
            raise unavailable(exc, self._label) from exc

    def _setup_on(self, conn: Connection) -> str:
        existed = inspect(conn).has_table(self.sql.table)
        try:
            self.table.metadata.create_all(conn, tables=[self.table], checkfirst=True)
        except DBAPIError:
            # Another process created it between our check and our CREATE.
            if not inspect(conn).has_table(self.sql.table):
                raise
        if conn.in_transaction():
            conn.commit()
        return self._setup_result(existed)

    def diagnostics(self) -> dict[str, object]:
        try:
            if self._connection is not None:
                info = self._connection.dialect.server_version_info
            else:
                assert self._engine is not None
                with self._connect() as conn:
                    info = conn.dialect.server_version_info
        except SQLAlchemyError as exc:
            raise unavailable(exc, self._label) from exc
        return self._diagnostics(".".join(map(str, info or ())))

    def close(self) -> None:
        """Return the store's connections to the pool; dispose of the engine if it is ours."""
        if self._cache is not None:
            self._cache.close()
        if self._owns_engine and self._engine is not None:
            self._engine.dispose()


class _TransactionOn:
    """A pooled connection in a real transaction (our engine is in autocommit mode)."""

    def __init__(self, engine: Engine, level: str) -> None:
        self._engine = engine
        self._level = level
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        conn = self._engine.connect().execution_options(isolation_level=self._level)
        self._conn = conn
        conn.begin()
        return conn

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        assert self._conn is not None
        try:
            if exc_type is None:
                self._conn.commit()
            else:
                self._conn.rollback()
        finally:
            self._conn.close()


class _CommitOnExit:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __enter__(self) -> Connection:
        self._conn.begin()
        return self._conn

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self._conn.commit()
        else:
            self._conn.rollback()


def _execute_item(conn: Connection, item: Any) -> None:
    if isinstance(item, tuple):
        conn.execute(*item)
    else:
        conn.execute(item)


async def _aexecute_item(conn: AsyncConnection, item: Any) -> None:
    if isinstance(item, tuple):
        await conn.execute(*item)
    else:
        await conn.execute(item)


class AsyncSQLStore(_Common):
    """The asyncio twin, on an AsyncEngine (ours or the caller's) or an AsyncConnection."""

    def __init__(
        self,
        sql: SQL,
        *,
        engine: AsyncEngine | None = None,
        connection: AsyncConnection | None = None,
        owns_engine: bool = False,
        create: bool = True,
        label: str = "sql",
    ) -> None:
        if (engine is None) == (connection is None):
            raise ConfigurationError("AsyncSQLStore needs exactly one of engine or connection")
        super().__init__(sql, create=create, bound=connection is not None, label=label)
        self._engine = engine
        self._connection = connection
        self._owns_engine = owns_engine
        self._cache = (
            AsyncConnectionCache(engine, sql, owned=owns_engine)
            if engine is not None and fast_async(engine)
            else None
        )

    @property
    def engine(self) -> AsyncEngine | None:
        return self._engine

    @property
    def fast_path(self) -> bool:
        """Whether calls run on the driver's connections directly (psycopg 3 on an engine)."""
        return self._cache is not None

    @property
    def idle_connections(self) -> int:
        """Pooled connections this store holds between calls (the rest are in the pool)."""
        return 0 if self._cache is None else len(self._cache.idle)

    @contextlib.asynccontextmanager
    async def dbapi_connection(self) -> AsyncIterator[Any]:
        """One of the psycopg ``AsyncConnection`` objects the store's calls run on (autocommit),
        lent for the block; for diagnostics and tests. Only on the psycopg fast path."""
        if self._cache is None:
            raise ConfigurationError("only a psycopg store on an engine has connections of its own")
        async with self._cache.connection() as conn:
            yield conn

    def bind(self, connection: AsyncConnection) -> AsyncSQLStore:
        """A view of this store inside ``connection``'s transaction."""
        if not isinstance(connection, AsyncConnection):
            raise ConfigurationError(
                f"bind() takes a sqlalchemy AsyncConnection, not {type(connection).__name__}"
            )
        return AsyncSQLStore(self.sql, connection=connection, create=False, label=self._label)

    async def _execute(self, program: Program[T]) -> T:
        if self._connection is not None:
            conn = self._connection
            if conn.in_transaction() or self._bound:
                return await run_async(conn, program)
            value = await run_async(conn, program)
            if conn.in_transaction():
                await conn.commit()
            return value
        cache = self._cache
        assert self._engine is not None
        if cache is not None:
            dispatch = self._engine.sync_engine.dispatch
            if not (dispatch.before_cursor_execute or dispatch.after_cursor_execute):
                return await cache.run(program)
            # Statement listeners expect a Connection: the SQLAlchemy path, as the sync store.
        async with self._connect() as conn:
            return await run_async(conn, program)

    def _connect(self) -> _AsyncConnect:
        """A SQLAlchemy AsyncConnection from the engine, for what does not run on the cache."""
        assert self._engine is not None
        return _AsyncConnect(self._engine, self._cache)

    async def _run(self, make: Callable[[], Program[T]]) -> T:
        reconnected = created = False
        while True:
            try:
                return await self._execute(make())
            except DBAPIError as exc:
                if not self._bound and not reconnected and retryable(exc):
                    reconnected = True
                    continue
                if self._create and not created and missing_table(exc):
                    created = True
                    await self.setup()
                    continue
                raise unavailable(exc, self._label) from exc
            except SQLAlchemyError as exc:
                raise unavailable(exc, self._label) from exc
            except OSError as exc:
                raise unavailable(exc, self._label) from exc

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        own = self._connection is None
        return await self._run(lambda: self.sql.claim(request, autocommit=own))

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        if not requests:
            return []
        return await self._run(lambda: self.sql.claim_many(requests))

    async def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        if not with_items:
            return await self._run(lambda: self.sql.complete(key, fence, result, ttl))
        try:
            if self._connection is not None:
                conn = self._connection
                for item in with_items:
                    await _aexecute_item(conn, item)
                record = await run_async(conn, self.sql.complete(key, fence, result, ttl))
                if not self._bound and conn.in_transaction():
                    await conn.commit()
                return record
            assert self._engine is not None
            level = self._engine.dialect.default_isolation_level or "SERIALIZABLE"
            async with self._connect() as raw:
                conn = await raw.execution_options(isolation_level=level)
                async with conn.begin():
                    for item in with_items:
                        await _aexecute_item(conn, item)
                    return await run_async(conn, self.sql.complete(key, fence, result, ttl))
        except SQLAlchemyError as exc:
            raise unavailable(exc, self._label) from exc

    async def release(self, key: str, fence: int) -> None:
        await self._run(lambda: self.sql.release(key, fence))

    async def renew(self, key: str, fence: int, lease: float) -> Record:
        return await self._run(lambda: self.sql.renew(key, fence, lease))

    async def get(self, key: str) -> Record | None:
        return await self._run(lambda: self.sql.get(key))

    async def delete(self, key: str) -> None:
        await self._run(lambda: self.sql.delete(key))

    async def now(self) -> int:
        return await self._run(self.sql.now_program)

    async def purge_expired(self, batch: int = 1000) -> int:
        if batch < 1:
            raise ConfigurationError("batch must be at least 1")
        return await self._run(lambda: self.sql.purge(batch))

    async def setup(self) -> str:
        try:
            if self._connection is not None:
                return await self._connection.run_sync(self._setup_sync)
            assert self._engine is not None
            async with self._connect() as conn:
                return await conn.run_sync(self._setup_sync)
        except SQLAlchemyError as exc:
            raise unavailable(exc, self._label) from exc

    def _setup_sync(self, conn: Connection) -> str:
        existed = inspect(conn).has_table(self.sql.table)
        try:
            self.table.metadata.create_all(conn, tables=[self.table], checkfirst=True)
        except DBAPIError:
            if not inspect(conn).has_table(self.sql.table):
                raise
        if conn.in_transaction():
            conn.commit()
        return self._setup_result(existed)

    async def diagnostics(self) -> dict[str, object]:
        try:
            if self._connection is not None:
                info = self._connection.dialect.server_version_info
            else:
                assert self._engine is not None
                async with self._connect() as conn:
                    info = conn.dialect.server_version_info
        except SQLAlchemyError as exc:
            raise unavailable(exc, self._label) from exc
        return self._diagnostics(".".join(map(str, info or ())))

    async def close(self) -> None:
        """Return the store's connections to the pool; dispose of the engine if it is ours."""
        if self._cache is not None:
            await self._cache.close()
        if self._owns_engine and self._engine is not None:
            await self._engine.dispose()


class _AsyncConnect:
    """``engine.connect()``, after the cache's idle connections went back to the pool: with
    a pool of one, the connection this checkout needs may be sitting in the cache."""

    def __init__(self, engine: AsyncEngine, cache: AsyncConnectionCache | None) -> None:
        self._engine = engine
        self._cache = cache
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        if self._cache is not None:
            await self._cache.close()
        self._conn = await self._engine.connect().__aenter__()
        return self._conn

    async def __aexit__(self, *exc: Any) -> None:
        assert self._conn is not None
        await self._conn.__aexit__(*exc)
