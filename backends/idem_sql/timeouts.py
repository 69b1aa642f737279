"""Read deadlines for psycopg 3, which has a connect timeout but no read timeout.

A server that stops answering (frozen, or a path that drops packets) would otherwise hold a
call for as long as TCP retransmits (many minutes) or, behind a live proxy or a frozen
process whose kernel still acknowledges, forever. psycopg runs every statement through
``Connection.wait(gen, interval, timeout)``; these subclasses give that wait a deadline.
When it expires, the connection is closed (its protocol state is unknown) and a
:class:`ReadTimeout`, an ``OperationalError``, is raised: SQLAlchemy sees a closed
connection and invalidates it, so it never goes back to the pool.

The cost is one Python call per statement (the deadline itself is psycopg's own).
"""

from __future__ import annotations

import functools
from typing import Any

import psycopg
from psycopg import errors as pg_errors


class ReadTimeout(psycopg.OperationalError):
    """No reply from the server within the read timeout; the connection was closed."""


def _expired(conn: Any, timeout: float) -> ReadTimeout:
    # The reply may still arrive: the protocol state is unknown, so the connection goes.
    conn.pgconn.finish()
    return ReadTimeout(f"no reply from the server within {timeout:g} s (timed out)")


@functools.cache
def sync_connection_class(read_timeout: float) -> type[psycopg.Connection[Any]]:
    """A ``psycopg.Connection`` whose statements fail after ``read_timeout`` s of silence."""

    class BoundedConnection(psycopg.Connection[Any]):
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            try:
                return super().wait(gen, interval, read_timeout if timeout is None else timeout)
            except pg_errors._WaitTimeout:
                raise _expired(self, read_timeout) from None

    return BoundedConnection


@functools.cache
def async_connection_class(read_timeout: float) -> type[psycopg.AsyncConnection[Any]]:
    """The ``psycopg.AsyncConnection`` twin of :func:`sync_connection_class`."""

    class BoundedAsyncConnection(psycopg.AsyncConnection[Any]):
        async def wait(
            self,
            gen: Any,
            interval: float = 0.1,
            timeout: float | None = None,  # noqa: ASYNC109 - psycopg's own signature
        ) -> Any:
            limit = read_timeout if timeout is None else timeout
            try:
                return await super().wait(gen, interval, limit)
            except pg_errors._WaitTimeout:
                raise _expired(self, read_timeout) from None

    return BoundedAsyncConnection
