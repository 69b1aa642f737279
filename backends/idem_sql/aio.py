"""The asyncio SQL store, twin of :class:`idem_sql.store.SQLStore` (same method order).

With psycopg 3 on an engine, statements run on the driver's own ``AsyncConnection`` cursors
(:class:`~idem_sql.caches.AsyncConnectionCache`); with other drivers, through SQLAlchemy's
``AsyncConnection``. Errors are translated in :meth:`AsyncSQLStore._run` exactly as in the
sync store, including a caller's failing ``with_items`` statement (its own exception, unless
the connection or server failed: ``StoreUnavailable``).

Drivers without a read timeout of their own (asyncpg, aiomysql, aiosqlite) get an
``asyncio`` deadline per operation (``deadline``); psycopg's connections enforce theirs in
the driver (:mod:`idem_sql.timeouts`). A connection interrupted by a deadline is
invalidated, never returned to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from idem_core.errors import ConfigurationError
from idem_core.record import ClaimRequest, ClaimResult, Record

from . import steps
from .caches import AsyncConnectionCache, fast_async
from .coalesce import AsyncCoalescer, coalesces
from .common import SETUP, _Common, aexecute_item, run_async, setup_on
from .lifetimes import abandon
from .ops import SQL, Program

__all__ = ["AsyncSQLStore"]

T = TypeVar("T")


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
        deadline: float | None = None,
        coalesce: bool = True,
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
        # Concurrent hot operations share round trips (:mod:`idem_sql.coalesce`).
        self._coalescer = (
            AsyncCoalescer(self._cache) if coalesce and self._cache and coalesces(sql) else None
        )
        self._deadline = deadline
        # Left unclosed (its loop closed, say), the store closes its connections without a
        # loop when collected or at exit, silently (:mod:`idem_sql.lifetimes`).
        self._abandon = None
        if engine is not None:
            idle = self._cache.idle if self._cache is not None else deque()
            self._abandon = weakref.finalize(
                self, abandon, os.getpid(), engine.sync_engine.pool, idle, owns_engine
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
        view = AsyncSQLStore(self.sql, connection=connection, create=False, label=self._label)
        view._limit = self._limit  # what this store learnt of the server
        return view

    # -- I/O -----------------------------------------------------------------------------

    async def _execute(self, program: Program[T], *, hot: bool = False) -> T:
        if self._connection is not None:
            # The caller's connection, in the caller's transaction: theirs to commit.
            return await run_async(self._connection, program)
        cache = self._cache
        assert self._engine is not None
        if cache is not None:
            dispatch = self._engine.sync_engine.dispatch
            if not (dispatch.before_cursor_execute or dispatch.after_cursor_execute):
                if hot and self._coalescer is not None:
                    return await self._coalescer.run(program)
                return await cache.run(program)
            # Statement listeners expect a Connection: the SQLAlchemy path, as the sync store.
        async with self._connect() as conn:
            return await run_async(conn, program)

    async def _on_connection(self, work: Callable[[Connection], T]) -> T:
        """``work`` on the caller's connection, or on one of the engine's (through
        ``run_sync``: the sync code is shared with :class:`~idem_sql.store.SQLStore`)."""
        if self._connection is not None:
            return await self._connection.run_sync(work)
        async with self._connect() as conn:
            return await conn.run_sync(work)

    def _connect(self) -> _AsyncConnect:
        """A SQLAlchemy AsyncConnection from the engine, for what does not run on the cache."""
        assert self._engine is not None
        return _AsyncConnect(self._engine, self._cache)

    async def _run(
        self, op: Callable[[], Awaitable[T]], *, retry: bool = True, create: bool = True
    ) -> T:
        """``await op()``, the one place where its errors are translated; a dropped
        connection is replaced and ``op`` run once more when ``retry``."""
        tried: set[str] = set()
        while True:
            try:
                if self._deadline is None:
                    return await op()
                return await self._bounded(op, self._deadline)
            except self._transient as exc:
                if self._after(exc, tried, retry=retry, create=create) == SETUP:
                    await self.setup()

    @staticmethod
    async def _bounded(op: Callable[[], Awaitable[T]], deadline: float) -> T:
        """``await op()`` within ``deadline`` seconds (drivers without a read timeout)."""
        bound = asyncio.timeout(deadline)
        try:
            async with bound:
                return await op()
        except TimeoutError as exc:
            if not bound.expired():
                raise  # the driver's own (connect) timeout
            raise TimeoutError(
                f"no answer from the server within {deadline:g} s "
                "(connect_timeout + read_timeout); the connection was discarded"
            ) from exc

    # -- operations ----------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        autocommit = self._connection is None
        return await self._run(
            lambda: self._execute(self.sql.claim(request, autocommit=autocommit), hot=True)
        )

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        if not requests:
            return []
        return await self._run(lambda: self._execute(self.sql.claim_many(requests)))

    async def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        if self._limit is None and len(result) > self.max_result_size:
            self._learn_packet(await self._run(lambda: self._execute(self.sql.packet_program())))
        self._check_result(key, result)
        if not with_items:
            return await self._run(
                lambda: self._execute(self.sql.complete(key, fence, result, ttl), hot=True)
            )
        items = with_items
        # Never run again: the caller's statements may have committed before the error.
        return await self._run(
            lambda: self._complete_with(key, fence, result, ttl, items), retry=False
        )

    async def _complete_with(
        self, key: str, fence: int, result: bytes, ttl: float, items: Sequence[Any]
    ) -> Record:
        """The caller's statements and the result in one transaction; LeaseLost undoes both."""
        program = self.sql.complete(key, fence, result, ttl)
        if self._connection is not None:
            for item in items:
                await aexecute_item(self._connection, item)
            return await run_async(self._connection, program)
        assert self._engine is not None
        async with self._connect() as raw:
            # known once the engine has connected (the SQLite store's claims use another)
            level = raw.dialect.default_isolation_level or "SERIALIZABLE"
            conn = await raw.execution_options(isolation_level=level)
            async with conn.begin():
                for item in items:
                    await aexecute_item(conn, item)
                return await run_async(conn, program)

    async def release(self, key: str, fence: int) -> None:
        await self._run(lambda: self._execute(self.sql.release(key, fence), hot=True))

    async def renew(self, key: str, fence: int, lease: float) -> Record:
        return await self._run(lambda: self._execute(self.sql.renew(key, fence, lease), hot=True))

    async def get(self, key: str) -> Record | None:
        return await self._run(lambda: self._execute(self.sql.get(key), hot=True))

    async def delete(self, key: str) -> None:
        await steps.adelete_steps(self, key)
        await self._run(lambda: self._execute(self.sql.delete(key)))

    async def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        """Record a step for the holder of ``fence`` (see :mod:`idem_sql.steps`)."""
        await steps.arecord_step(self, key, fence, name, data, until)

    async def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        return await steps.aload_steps(self, key)

    async def now(self) -> int:
        return await self._run(lambda: self._execute(self.sql.now_program()))

    async def purge_expired(self, batch: int = 1000) -> int:
        """Delete expired records, ``batch`` rows per statement; returns how many."""
        if batch < 1:
            raise ConfigurationError("batch must be at least 1")
        done = await self._run(lambda: self._execute(self.sql.purge(batch)))
        return done + await steps.apurge_steps(self, batch)

    async def setup(self) -> str:
        """Create the table and its index if missing; says what it did."""
        existed = await self._run(lambda: self._on_connection(self._setup_on), create=False)
        return self._setup_result(existed)

    def _setup_on(self, conn: Connection) -> bool:
        existed = setup_on(conn, self.table)
        steps.setup_steps_on(conn, self.sql)
        return existed

    async def diagnostics(self) -> dict[str, object]:
        if self.sql.dialect.name in ("mysql", "mariadb") and self._limit is None:
            self._learn_packet(await self._run(lambda: self._execute(self.sql.packet_program())))
        return await self._run(lambda: self._on_connection(self._diagnostics_on), create=False)

    async def close(self) -> None:
        """Return the store's connections to the pool; dispose of the engine if it is ours."""
        if self._cache is not None:
            await self._cache.close()
        if self._owns_engine and self._engine is not None:
            await self._engine.dispose()
        if self._abandon is not None:
            self._abandon.detach()


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
