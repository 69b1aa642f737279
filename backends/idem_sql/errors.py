"""How the SQL stores turn driver and SQLAlchemy errors into idem-core's, written once.

Every store operation runs through its store's ``_run``, which catches :data:`TRANSIENT`
(plus the loaded driver's own ``Error``: some escape SQLAlchemy's wrapping, at connect or in
the stores' direct cursor paths) and hands the exception to :func:`translate`:

* a missing records table the store may not create (a caller's connection, ``create=0``):
  ``ConfigurationError`` naming ``idem setup`` and the table;
* a NUL character in a key (PostgreSQL text cannot hold one; the core refuses such keys
  before they get here): ``KeyMissing``;
* anything else: ``StoreUnavailable``, with the original exception as ``__cause__``.

A failing statement of the caller's own (``complete(with_items=...)``) is not a store outage:
unless it failed for a connection-level reason (``OperationalError``, ``InterfaceError``, a
dropped connection), its SQLAlchemy exception reaches the caller as it is
(:func:`callers_statement` marks it so).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from idem_core.errors import ConfigurationError, IdempotencyError, KeyMissing, StoreUnavailable

#: what a store operation may raise that means "the database did not do it": SQLAlchemy's
#: errors (driver errors arrive wrapped in its ``DBAPIError``), and socket errors, timeouts
#: included (``TimeoutError`` is an ``OSError``). Each store adds its driver's ``Error``.
TRANSIENT: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError)

_MISSING_TABLE = ("no such table", "does not exist", "doesn't exist", "undefinedtable")
_NUL = ("nul (0x00)", "0x00 bytes", "null character not permitted")
_TIMED_OUT = ("timed out", "timeout expired")
# Set on an exception from a caller's ``with_items`` statement: True when it is the caller's
# own error, False when it says the connection or the server failed.
_CALLERS = "_idem_callers_statement"


def transient_for(dialect: Any) -> tuple[type[BaseException], ...]:
    """:data:`TRANSIENT` and the dialect's driver ``Error`` (psycopg, PyMySQL, sqlite3...)."""
    dbapi = getattr(dialect, "loaded_dbapi", None)
    error = getattr(dbapi, "Error", None)
    if isinstance(error, type) and issubclass(error, BaseException):
        return (*TRANSIENT, error)
    return TRANSIENT


def _original(exc: BaseException) -> BaseException:
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def missing_table(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _MISSING_TABLE)


def own_missing_table(exc: BaseException) -> bool:
    """A statement of the store's own found no records table (not a caller's statement)."""
    return getattr(exc, _CALLERS, None) is None and missing_table(exc)


def timed_out(exc: BaseException) -> bool:
    """A read or connect deadline expired: the server is silent, not merely restarted."""
    orig = _original(exc)
    if isinstance(orig, TimeoutError) or isinstance(exc, TimeoutError):
        return True
    text = str(orig).lower()
    return any(marker in text for marker in _TIMED_OUT)


def retryable(exc: BaseException) -> bool:
    """A connection the server dropped (e.g. a pooled one after a restart): the operation
    runs once more on a new connection. Every program is safe to run again (claims carry
    their ``attempt``; a repeated complete/release/renew is recognised by the core). A
    silent server is not retried: that would double the caller's wait."""
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated) and not timed_out(exc)


def callers_statement(exc: BaseException) -> bool:
    """Whether ``exc`` is a caller's own statement failing for its own reasons."""
    return getattr(exc, _CALLERS, None) is True


def mark_callers(exc: BaseException) -> None:
    """``exc`` came from a caller's statement: it is the caller's error unless it says the
    connection or the server failed (then it is the store's: ``StoreUnavailable``)."""
    outage = isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
    )
    setattr(exc, _CALLERS, not outage)


def translate(exc: BaseException, where: str, *, table: str) -> IdempotencyError:
    """The idem-core error for ``exc``, raised by the caller ``from exc``."""
    orig = _original(exc)
    if own_missing_table(exc):
        return ConfigurationError(
            f"{where}: the records table {table!r} does not exist; create it with "
            f"`idem setup URL` (or store.setup(), or your migrations: idem_sql.records_table) "
            f"({type(orig).__name__}: {orig})"
        )
    text = str(orig).lower()
    if getattr(exc, _CALLERS, None) is None and any(marker in text for marker in _NUL):
        return KeyMissing(f"{where}: a key or value contains a NUL character, which is refused")
    said = str(orig) or ("no answer in time" if isinstance(orig, TimeoutError) else "")
    detail = f"{type(orig).__name__}: {said}".strip()
    return StoreUnavailable(f"{where}: {detail}")
