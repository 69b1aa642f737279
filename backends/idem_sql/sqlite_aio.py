"""The asyncio SQLite store's calls, run on a thread of its own with the sync store's cursors.

Through aiosqlite, every cursor call (execute, fetch, description, close) is a hop to
aiosqlite's thread and back, under SQLAlchemy's greenlet bridge: about 1 ms per operation,
against tens of microseconds for the sync store's cursor. :class:`AsyncSQLiteStore` instead
hands each whole program (:mod:`idem_sql.ops`) to one worker thread per store, which runs it
on a pooled ``sqlite3`` connection exactly as :class:`~idem_sql.store.SQLStore` does (its
:class:`~idem_sql.caches.ConnectionCache`), and resolves the caller's future with
``loop.call_soon_threadsafe``: one hop per operation. A locked database (``busy_timeout``)
makes the worker wait, never the event loop.

Only our own engine on a database file takes this path (an in-memory database is one
connection, the async engine's). What does not run a program (creating the table,
diagnostics, a caller's statements in ``complete(with_items=...)``, a store bound to a
connection) and any call while statement listeners watch the async engine still go through
aiosqlite.

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

from sqlalchemy.engine import Engine

from .aio import AsyncSQLStore
from .caches import ConnectionCache
from .ops import Program

__all__ = ["AsyncSQLiteStore"]

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop | None, asyncio.Future[Any] | None]
_STOP: Any = None


class _Worker:
    """One thread running jobs from a queue, one at a time; started on first use."""

    def __init__(self, cache: ConnectionCache, engine: Engine) -> None:
        self.cache = cache
        self.engine = engine
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

    async def _execute(self, program: Program[T]) -> T:
        assert self._engine is not None
        dispatch = self._engine.sync_engine.dispatch
        if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
            # Statement listeners watch the async engine: let them see the statements.
            return await super()._execute(program)
        return await self._worker.submit(lambda: self._worker.cache.run(program))

    async def close(self) -> None:
        """Stop the worker (its connections closed first), then close as the parent does."""
        released = asyncio.get_running_loop().create_future()
        thread = self._worker.stop(released)
        await released
        if thread is not None:
            thread.join()  # its last job is done: it is leaving
        await super().close()
