"""The asyncio SQLite store's calls, run with the sync store's cursors: inline when they
cannot wait, else on a thread of the store's own.

Through aiosqlite, every cursor call (execute, fetch, description, close) is a hop to
aiosqlite's thread and back, under SQLAlchemy's greenlet bridge: about 1 ms per operation,
against tens of microseconds for the sync store's cursor. :class:`AsyncSQLiteStore` runs
each program (:mod:`idem_sql.ops`) on a pooled ``sqlite3`` connection exactly as
:class:`~idem_sql.store.SQLStore` does (compiled statements on a held cursor):

* the short ones (a claim, a completion, a release, a renewal, a read) on the event loop's
  thread, on a connection that never waits for a lock nor checkpoints (:class:`_Inline`);
  a statement that finds the database locked has done nothing, and it and the rest of the
  program go to the worker;
* everything else, on one worker thread per store (its
  :class:`~idem_sql.caches.ConnectionCache`), which resolves the caller's future with
  ``loop.call_soon_threadsafe``: one hop per operation, and a locked database
  (``busy_timeout``) makes the worker wait, never the event loop.

Only our own engine on a database file takes this path (an in-memory database is one
connection, the async engine's). Creating the table and diagnostics run on the worker too.
A caller's statements in ``complete(with_items=...)``, a store bound to a connection, and any
call while statement listeners watch the async engine still go through aiosqlite.

Lifetime: ``close()`` stops the worker and disposes of its engine; a store left unclosed
(its event loop closed, say) stops them when it is collected. A forked child starts its own
worker on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Connection, Engine

from .aio import AsyncSQLStore
from .caches import ConnectionCache
from .ops import Program, Rows

__all__ = ["AsyncSQLiteStore"]

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop | None, asyncio.Future[Any] | None]
_STOP: Any = None
# Programs of one or two single-row statements: quick enough to run on the event loop's
# thread while the database is not locked. Every other program runs on the worker.
_SHORT = frozenset({"claim", "complete", "release", "renew", "get"})
# Programs run inline between two checkpoints, which the worker runs (the inline connection
# never does: a checkpoint syncs the files to disk).
_CHECKPOINT_EVERY = 1000
_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary result codes)
# Inline connections a forked child inherited: never closed there (the parent's).
_inherited: list[Any] = []


class _Inline:
    """One connection of the runner's pool for programs run on the event loop's thread.

    It never waits for a lock: ``busy_timeout`` is 0, so a statement that finds the
    database locked fails at once, having done nothing (WAL mode: a writer takes its lock
    before it writes, and its commit never waits), and the rest of the program, from that
    statement on, goes to the worker, which waits as ``busy_timeout`` says. It never
    checkpoints (``wal_autocheckpoint`` 0): the worker does, every ``_CHECKPOINT_EVERY``
    programs. Outside WAL mode nothing runs inline.
    """

    def __init__(self, cache: ConnectionCache) -> None:
        self.cache = cache
        self.entry: Any = None
        self.usable = True
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.runs = 0

    def _open(self) -> Any:
        pool: Any = self.cache.engine.pool
        size, overflow = getattr(pool, "size", None), getattr(pool, "_max_overflow", -1)
        if callable(size) and overflow >= 0 and size() + overflow < 2:
            # Held for the store's life, it would leave the worker no connection.
            self.usable = False
            return None
        conn = self.cache.engine.raw_connection()
        try:
            raw: Any = conn.dbapi_connection
            mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                self.usable = False
                conn.close()
                return None
            raw.execute("PRAGMA busy_timeout = 0")
            raw.execute("PRAGMA wal_autocheckpoint = 0")
            return conn, raw.cursor(), 0.0
        except BaseException:
            conn.invalidate()
            raise

    def run(self, program: Program[T]) -> tuple[bool, Any]:
        """``(True, value)`` when the program ran here; else ``(False, rest)``: what is left
        of it to run on the worker (all of it if no statement ran)."""
        if not self.lock.acquire(blocking=False):
            return False, program  # another thread's loop is using it: no waiting here
        try:
            if self.pid != os.getpid():
                _inherited.append(self.entry)
                self.entry, self.pid = None, os.getpid()
            if self.entry is None:
                self.entry = self._open()
                if self.entry is None:
                    return False, program
            return self._run(self.entry, program)
        finally:
            self.lock.release()

    def _run(self, entry: Any, program: Program[T]) -> tuple[bool, Any]:
        cursor = entry[1]
        compiled = self.cache.sql.compiled
        try:
            step = next(program)
        except StopIteration as stop:
            return True, stop.value
        while True:
            stmt, params = step
            sql, layout, returns_rows = compiled(stmt)
            args = layout(params)
            try:
                cursor.execute(sql, args)
                rows = cursor.fetchall() if returns_rows else []
            except self.cache.dbapi_error as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY:
                    return False, _resumed(step, program)
                error = self.cache._error(entry, exc, sql, args)
                if error.connection_invalidated:
                    self.close()
                raise error from exc
            except BaseException:
                self.close()  # interrupted inside the driver: start afresh
                raise
            try:
                step = program.send(Rows(rows, cursor.rowcount))
            except StopIteration as stop:
                self.runs += 1
                return True, stop.value

    def checkpoint_due(self) -> bool:
        if self.runs < _CHECKPOINT_EVERY:
            return False
        self.runs = 0
        return True

    def close(self) -> None:
        entry, self.entry = self.entry, None
        if entry is not None and self.pid == os.getpid():
            # Its pragmas are ours: closed, never handed back to the pool.
            entry[0].invalidate()


def _resumed(step: Any, program: Program[T]) -> Program[T]:
    """``program`` from ``step`` on: ``step`` is yielded again, then the rest."""
    while True:
        rows = yield step
        try:
            step = program.send(rows)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


class _Worker:
    """One thread running jobs from a queue, one at a time; started on first use."""

    def __init__(self, cache: ConnectionCache, engine: Engine) -> None:
        self.cache = cache
        self.engine = engine
        self.inline = _Inline(cache)
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def submit(self, work: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self.thread is None or self.pid != os.getpid():
            self._start()
        self.jobs.put((work, loop, future))
        return future

    def post(self, work: Callable[[], Any]) -> None:
        """Run ``work`` on the thread; nobody waits for it, its errors are dropped."""
        if self.thread is None or self.pid != os.getpid():
            self._start()
        self.jobs.put((work, None, None))

    def checkpoint(self) -> None:
        with self.cache.connection() as raw:
            raw.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _start(self) -> None:
        with self.lock:
            if self.pid != os.getpid():
                # A forked child: the parent's thread is not here, nor its queue's waiter.
                self.pid, self.thread = os.getpid(), None
                self.jobs = queue.SimpleQueue()
            if self.thread is None:
                self.thread = threading.Thread(
                    target=_serve, args=(self.jobs,), name="idem-sqlite", daemon=True
                )
                self.thread.start()

    def stop(self, future: asyncio.Future[Any] | None = None) -> threading.Thread | None:
        """Return the connections, then end the thread (its last jobs); ``future`` (of the
        running loop) is resolved once the connections are closed. The thread to join, or
        None when none runs (the connections are then closed here)."""
        with self.lock:
            thread, self.thread = self.thread, None
        if thread is None or self.pid != os.getpid():
            self._release()
            if future is not None:
                future.set_result(None)
            return None
        loop = None if future is None else future.get_loop()
        self.jobs.put((self._release, loop, future))
        self.jobs.put(_STOP)
        return thread

    def _release(self) -> None:
        with self.inline.lock:
            self.inline.close()
        self.cache.close()
        self.engine.dispose()


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:  # None: _STOP
        work, loop, future = job
        try:
            outcome, failed = work(), False
        except BaseException as exc:  # handed to the caller, whatever it is
            outcome, failed = exc, True
        if loop is None or future is None:
            continue
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(_settle, future, outcome, failed)
        del work, loop, future, outcome, job


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.cancelled():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _abandon(worker: _Worker) -> None:
    """The store was collected unclosed: stop its worker without a loop."""
    thread = worker.stop()
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=5)


class AsyncSQLiteStore(AsyncSQLStore):
    """:class:`~idem_sql.aio.AsyncSQLStore` on a database file, its programs run on a worker
    thread with ``runner``, a sync (pysqlite) engine on the same file (ours: disposed at
    :meth:`close`)."""

    def __init__(self, *args: Any, runner: Engine, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._worker = _Worker(ConnectionCache(runner, self.sql, owned=True), runner)
        self._stop_worker = weakref.finalize(self, _abandon, self._worker)

    @property
    def threaded(self) -> bool:
        """Whether programs run on the store's worker thread (this class: always)."""
        return True

    def _watched(self) -> bool:
        """Whether statement listeners watch the async engine: then statements go through it,
        so that the listeners see them."""
        assert self._engine is not None
        dispatch = self._engine.sync_engine.dispatch
        return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)

    async def _execute(self, program: Program[T], *, hot: bool = False) -> T:
        # ``hot`` asks for coalescing, which only PostgreSQL does: here a call runs inline.
        if self._watched():
            return await super()._execute(program, hot=hot)
        worker = self._worker
        if getattr(program, "__name__", "") in _SHORT and worker.inline.usable:
            done, value = worker.inline.run(program)
            if worker.inline.checkpoint_due():
                worker.post(worker.checkpoint)
            if done:
                return value  # type: ignore[no-any-return]
            program = value
        rest = program
        return await worker.submit(lambda: worker.cache.run(rest))

    async def _on_connection(self, work: Callable[[Connection], T]) -> T:
        """Setup and diagnostics on the worker too, with a connection of ``runner``: through
        aiosqlite, a connect that fails (a file that cannot be opened) leaves aiosqlite's
        thread behind, to report to an event loop that may be closed by then."""
        if self._connection is not None or self._watched():
            return await super()._on_connection(work)
        runner = self._worker.engine

        def on_runner() -> T:
            with runner.connect() as conn:
                return work(conn)

        return await self._worker.submit(on_runner)

    async def close(self) -> None:
        """Stop the worker (its connections closed first), then close as the parent does."""
        released = asyncio.get_running_loop().create_future()
        thread = self._worker.stop(released)
        await released
        if thread is not None:
            thread.join()  # its last job is done: it is leaving
        await super().close()
