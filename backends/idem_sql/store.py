"""The sync SQL store: it runs :mod:`idem_sql.ops` programs on a connection.

Our own engines run in the driver's autocommit mode, so each statement commits on the server
with no BEGIN/COMMIT round trips, and never roll back on check-in. A store bound to the
caller's connection (:meth:`SQLStore.bind`) runs inside the caller's transaction instead.

On an Engine, statements run on DBAPI cursors of pooled connections the store keeps checked
out between calls (:class:`~idem_sql.caches.ConnectionCache`). The asyncio twin is
:class:`idem_sql.aio.AsyncSQLStore`; what both decide alike is in :mod:`idem_sql.common`.

Errors: every operation runs through :meth:`SQLStore._run`, the one place where driver and
SQLAlchemy errors become idem-core's (:mod:`idem_sql.errors`): ``StoreUnavailable`` with the
original as ``__cause__``, ``ConfigurationError`` for a missing table the store may not
create. In ``complete(with_items=...)``, a caller's statement that fails for its own reasons
(a constraint violation, a syntax error: anything but ``OperationalError``,
``InterfaceError`` or a dropped connection) raises its own SQLAlchemy exception, as it would
outside idem-core, and nothing is written; a connection or server failure is
``StoreUnavailable``. :class:`~idem_sql.aio.AsyncSQLStore` does the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy.engine import Connection, Engine

from idem_core.errors import ConfigurationError
from idem_core.record import ClaimRequest, ClaimResult, Record
from idem_core.scanning import DEFAULT_PAGE, ScanFilter

from . import steps
from .caches import ConnectionCache, own
from .coalesce import Coalescer, coalesces
from .common import SETUP, _Common, execute_item, run_sync, setup_on
from .ops import SQL, Program

__all__ = ["SQLStore", "own"]

T = TypeVar("T")


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
        coalesce: bool = True,
    ) -> None:
        if (engine is None) == (connection is None):
            raise ConfigurationError("SQLStore needs exactly one of engine or connection")
        super().__init__(sql, create=create, bound=connection is not None, label=label)
        self._engine = engine
        self._connection = connection
        self._owns_engine = owns_engine
        self._cache = None if engine is None else ConnectionCache(engine, sql, owned=owns_engine)
        # Concurrent hot operations share round trips (:mod:`idem_sql.coalesce`).
        self._coalescer = (
            Coalescer(self._cache) if coalesce and self._cache and coalesces(sql) else None
        )

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
        view = SQLStore(self.sql, connection=connection, create=False, label=self._label)
        view._limit = self._limit  # what this store learnt of the server
        return view

    # -- I/O -----------------------------------------------------------------------------

    def _execute(self, program: Program[T], *, hot: bool = False) -> T:
        if self._connection is not None:
            # The caller's connection, in the caller's transaction: theirs to commit.
            return run_sync(self._connection, program)
        cache = self._cache
        assert cache is not None and self._engine is not None
        dispatch = self._engine.dispatch
        if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
            # Someone watches statements (tracing, counting): their listeners expect a
            # Connection, so take the SQLAlchemy path, with the cached connections pooled.
            with self._connect() as conn:
                return run_sync(conn, program)
        if hot and self._coalescer is not None:
            return self._coalescer.run(program)
        return cache.run(program)

    def _on_connection(self, work: Callable[[Connection], T]) -> T:
        """``work`` on the caller's connection, or on one of the engine's."""
        if self._connection is not None:
            return work(self._connection)
        with self._connect() as conn:
            return work(conn)

    def _connect(self) -> Connection:
        """A SQLAlchemy Connection from the engine, for what does not run on the cache."""
        assert self._engine is not None
        # Our idle connections back to the pool first: with a pool of one, the connection
        # this checkout needs may be sitting in our cache.
        if self._cache is not None:
            self._cache.close()
        return self._engine.connect()

    def _run(self, op: Callable[[], T], *, retry: bool = True, create: bool = True) -> T:
        """``op()``, the one place where its errors are translated (:mod:`idem_sql.errors`);
        a dropped connection is replaced and ``op`` run once more when ``retry``."""
        tried: set[str] = set()
        while True:
            try:
                return op()
            except self._transient as exc:
                if self._after(exc, tried, retry=retry, create=create) == SETUP:
                    self.setup()

    # -- operations ----------------------------------------------------------------------

    def claim(self, request: ClaimRequest) -> ClaimResult:
        autocommit = self._cache is not None
        return self._run(
            lambda: self._execute(self.sql.claim(request, autocommit=autocommit), hot=True)
        )

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        if not requests:
            return []
        return self._run(lambda: self._execute(self.sql.claim_many(requests)))

    def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        if self._limit is None and len(result) > self.max_result_size:
            self._learn_packet(self._run(lambda: self._execute(self.sql.packet_program())))
        self._check_result(key, result)
        if not with_items:
            return self._run(
                lambda: self._execute(self.sql.complete(key, fence, result, ttl), hot=True)
            )
        items = with_items
        # Never run again: the caller's statements may have committed before the error.
        return self._run(lambda: self._complete_with(key, fence, result, ttl, items), retry=False)

    def _complete_with(
        self, key: str, fence: int, result: bytes, ttl: float, items: Sequence[Any]
    ) -> Record:
        """The caller's statements and the result in one transaction; LeaseLost undoes both."""
        program = self.sql.complete(key, fence, result, ttl)
        if self._connection is not None:
            for item in items:
                execute_item(self._connection, item)
            return run_sync(self._connection, program)
        assert self._engine is not None
        with self._connect() as raw:
            # known once the engine has connected
            level = raw.dialect.default_isolation_level or "SERIALIZABLE"
            conn = raw.execution_options(isolation_level=level)
            with conn.begin():
                for item in items:
                    execute_item(conn, item)
                return run_sync(conn, program)

    def release(self, key: str, fence: int) -> None:
        self._run(lambda: self._execute(self.sql.release(key, fence), hot=True))

    def renew(self, key: str, fence: int, lease: float) -> Record:
        return self._run(lambda: self._execute(self.sql.renew(key, fence, lease), hot=True))

    def get(self, key: str) -> Record | None:
        return self._run(lambda: self._execute(self.sql.get(key), hot=True))

    def delete(self, key: str) -> None:
        steps.delete_steps(self, key)
        self._run(lambda: self._execute(self.sql.delete(key)))

    def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        """Record a step for the holder of ``fence`` (see :mod:`idem_sql.steps`)."""
        steps.record_step(self, key, fence, name, data, until)

    def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        return steps.load_steps(self, key)

    def now(self) -> int:
        return self._run(lambda: self._execute(self.sql.now_program()))

    def purge_expired(self, batch: int = 1000) -> int:
        """Delete expired records, ``batch`` rows per statement; returns how many."""
        if batch < 1:
            raise ConfigurationError("batch must be at least 1")
        done = self._run(lambda: self._execute(self.sql.purge(batch)))
        return done + steps.purge_steps(self, batch)

    def scan(self, where: ScanFilter, page_size: int = DEFAULT_PAGE) -> Iterator[list[Record]]:
        """Pages of the records ``where`` selects, keyset-paginated (:mod:`idem_sql.scan`)."""
        from .scan import scan_pages

        return scan_pages(self, where, page_size)

    def setup(self) -> str:
        """Create the table and its index if missing; says what it did."""
        existed = self._run(lambda: self._on_connection(self._setup_on), create=False)
        return self._setup_result(existed)

    def _setup_on(self, conn: Connection) -> bool:
        existed = setup_on(conn, self.table)
        steps.setup_steps_on(conn, self.sql)
        return existed

    def diagnostics(self) -> dict[str, object]:
        if self.sql.dialect.name in ("mysql", "mariadb") and self._limit is None:
            self._learn_packet(self._run(lambda: self._execute(self.sql.packet_program())))
        return self._run(lambda: self._on_connection(self._diagnostics_on), create=False)

    def close(self) -> None:
        """Return the store's connections to the pool; dispose of the engine if it is ours."""
        if self._cache is not None:
            self._cache.close()
        if self._owns_engine and self._engine is not None:
            self._engine.dispose()
