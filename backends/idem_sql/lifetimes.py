"""What an async store left unclosed does with its connections when it is collected (or at
interpreter exit): close them without an event loop.

``Idempotency`` keeps one async store per event loop and abandons, without awaiting
anything, the stores whose loop has closed: a closed loop runs no coroutine, so ``await
store.close()`` is impossible there. Left alone, each pooled connection would then complain
at garbage collection or exit (aiomysql: ``RuntimeError: Event loop is closed`` from its
``__del__``; SQLAlchemy: "The garbage collector is trying to clean up non-checked-in
connection"; every driver: ``ResourceWarning``). :func:`abandon` closes each connection's
socket directly, with no loop (psycopg: libpq's own ``PQfinish``; asyncpg and aiomysql:
the transport's socket; aiosqlite: its worker thread), and takes them out of SQLAlchemy's
hands, so nothing is printed and nothing of another loop's is touched.

In a forked child it does nothing: those sockets are the parent's.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from typing import Any


def close_quietly(driver: Any) -> None:
    """Close one driver connection (asyncio flavour) without awaiting anything."""
    module = type(driver).__module__.split(".", 1)[0]
    with contextlib.suppress(Exception):
        pgconn = getattr(driver, "pgconn", None)
        if pgconn is not None:  # psycopg (sync or async): libpq closes its own socket
            pgconn.finish()
            return
        if module == "aiosqlite":
            _stop_aiosqlite(driver)
            return
        writer = getattr(driver, "_writer", None)  # aiomysql
        if writer is not None:
            _close_transport(writer.transport)
            driver._writer = driver._reader = None
            return
        transport = getattr(driver, "_transport", None)  # asyncpg
        if transport is not None:
            _close_transport(transport)
            driver._aborted = True


def _close_transport(transport: Any) -> None:
    loop = getattr(transport, "_loop", None)
    if loop is not None and not loop.is_closed():
        transport.abort()
        return
    # The loop is closed: it cannot be told. Close the socket itself, and let the transport
    # know (it warns at collection while it holds a socket).
    sock = getattr(transport, "_sock", None)
    if sock is not None:
        sock.close()
        transport._sock = None
    transport._closing = True


def _stop_aiosqlite(driver: Any) -> None:
    """Close the SQLite connection on aiosqlite's worker thread, and end the thread."""
    driver._running = False

    def close_and_stop() -> Any:
        conn, driver._connection = driver._connection, None
        if conn is not None:
            conn.close()
        return _stop_sentinel()

    driver._tx.put_nowait((None, close_and_stop))
    driver._thread.join(timeout=5)


def _stop_sentinel() -> Any:
    from aiosqlite import core

    return core._STOP_RUNNING_SENTINEL


def abandon(pid: int, pool: Any, idle: deque[Any], owned: bool) -> None:
    """Close the store's cached connections and, if the engine is the store's own, every
    connection idle in its pool; without an event loop."""
    if os.getpid() != pid:
        return
    while idle:
        fairy = idle.pop()[0]
        with contextlib.suppress(Exception):
            close_quietly(fairy.driver_connection)
            # Out of the pool's hands: no checkin, no garbage-collection cleanup later.
            fairy.detach()
    if not owned:
        return
    queue = getattr(pool, "_pool", None)
    while queue is not None:
        try:
            record = queue.get_nowait()
        except Exception:
            return
        adapted = getattr(record, "dbapi_connection", None)
        if adapted is not None:
            close_quietly(getattr(adapted, "driver_connection", adapted))
            record.dbapi_connection = None
