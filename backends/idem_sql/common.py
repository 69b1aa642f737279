"""What the sync and async SQL stores decide alike: no I/O here.

The twins (:mod:`idem_sql.store`, :mod:`idem_sql.aio`) only get a connection, run
statements and hand the outcome to this code: what an error becomes (:meth:`_Common._after`),
whether a result fits (:meth:`_Common._check_result`), what ``setup`` and ``diagnostics``
do on a SQLAlchemy ``Connection`` (the async store runs them through ``run_sync``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import MetaData, Table, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from idem_core.errors import ResultNotSerializable

from .errors import (
    callers_statement,
    mark_callers,
    own_missing_table,
    retryable,
    transient_for,
    translate,
)
from .ops import SQL, Program, Rows
from .schema import MAX_KEY_LENGTH, records_table

T = TypeVar("T")

RETRY = "retry"
SETUP = "setup"

# Largest encoded result each database takes in one statement, minus room for the rest of
# the statement. PostgreSQL: a bytea and a protocol message are at most 1 GiB, and psycopg
# sends bytes hex-escaped (2 characters a byte). SQLite: SQLITE_MAX_LENGTH (1e9 bytes) for
# the whole row. MySQL/MariaDB: learnt from the server's max_allowed_packet (see
# ``mysql_limit``).
_MARGIN = 64 * 1024
_FIXED_LIMITS = {
    "postgresql": (2**30 - 2**20) // 2,
    "sqlite": 1_000_000_000 - _MARGIN,
}
#: what a MySQL/MariaDB store assumes until it has read max_allowed_packet (the smallest
#: default among supported servers: 4 MiB, MySQL 5.7 / MariaDB 10.1)
MYSQL_DEFAULT_PACKET = 4 * 1024 * 1024


def mysql_limit(max_allowed_packet: int) -> int:
    """The largest result a MySQL/MariaDB store sends: the driver escapes bytes (PyMySQL
    doubles ``\\0 ' " \\\\`` and a few more) or sends them as hex (aiomysql), so a result takes
    up to twice its size in the statement, which must fit in ``max_allowed_packet``."""
    return max(0, (int(max_allowed_packet) - _MARGIN) // 2)


def fixed_limit(dialect_name: str) -> int | None:
    return _FIXED_LIMITS.get(dialect_name)


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


def execute_item(conn: Connection, item: Any) -> None:
    """One of the caller's ``with_items`` statements; its own failure stays the caller's."""
    try:
        if isinstance(item, tuple):
            conn.execute(*item)
        else:
            conn.execute(item)
    except SQLAlchemyError as exc:
        mark_callers(exc)
        raise


async def aexecute_item(conn: AsyncConnection, item: Any) -> None:
    try:
        if isinstance(item, tuple):
            await conn.execute(*item)
        else:
            await conn.execute(item)
    except SQLAlchemyError as exc:
        mark_callers(exc)
        raise


def setup_on(conn: Connection, table: Table) -> bool:
    """Create the table and its index on ``conn`` if missing; whether it existed."""
    existed = inspect(conn).has_table(table.name)
    try:
        table.metadata.create_all(conn, tables=[table], checkfirst=True)
    except DBAPIError:
        # Another process created it between our check and our CREATE.
        if not inspect(conn).has_table(table.name):
            raise
    if conn.in_transaction():
        conn.commit()
    return existed


_MIGRATE_MYSQL = "ALTER TABLE {t} MODIFY `key` VARBINARY(1020) NOT NULL"


def key_column_on(conn: Connection, table: str) -> str:
    """How the table's key column compares keys: byte for byte, or what is wrong with it
    (a table created by an older version: MySQL's ``VARCHAR … utf8mb4_bin`` ignores
    trailing spaces) and the statement that fixes it."""
    name = conn.dialect.name
    if name in ("mysql", "mariadb"):
        row = conn.execute(
            text(
                "SELECT DATA_TYPE, COLLATION_NAME FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t AND COLUMN_NAME = 'key'"
            ),
            {"t": table},
        ).first()
        if row is None:
            return "table missing (idem setup URL creates it)"
        if str(row[0]).lower() in ("varbinary", "binary"):
            return f"{row[0]}: keys compare byte for byte"
        return (
            f"MIGRATE: {row[0]} {row[1]} ignores trailing spaces ('k ' replays 'k'); "
            f"run: {_MIGRATE_MYSQL.format(t=table)}"
        )
    if name == "postgresql":
        row = conn.execute(
            text(
                "SELECT c.collname, c.collisdeterministic FROM pg_attribute a "
                "JOIN pg_collation c ON c.oid = a.attcollation "
                "WHERE a.attrelid = to_regclass(:t) AND a.attname = 'key'"
            ),
            {"t": table},
        ).first()
        if row is None:
            return "table missing (idem setup URL creates it)"
        if row[1]:
            return f"varchar, collation {row[0]} (deterministic): keys compare byte for byte"
        return (
            f"MIGRATE: collation {row[0]} is nondeterministic; run: ALTER TABLE {table} "
            'ALTER COLUMN key TYPE VARCHAR(255) COLLATE "C"'
        )
    if name == "sqlite":
        row = conn.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"), {"t": table}
        ).first()
        if row is None:
            return "table missing (idem setup URL creates it)"
        if "collate" in str(row[0]).lower():
            return "MIGRATE: the key column has a COLLATE clause; recreate the table"
        return "VARCHAR, BINARY collation: keys compare byte for byte"
    return "?"


class _Common:
    """Attributes and decisions shared by :class:`SQLStore` and :class:`AsyncSQLStore`."""

    max_key_length = MAX_KEY_LENGTH
    server_clock = True

    def __init__(self, sql: SQL, *, create: bool, bound: bool, label: str) -> None:
        self.sql = sql
        self._create = create and not bound
        self._bound = bound
        self._label = label
        self.table: Table = records_table(MetaData(), sql.table)
        self._transient = transient_for(sql.dialect)
        self._limit = fixed_limit(sql.dialect.name)

    @property
    def max_result_size(self) -> int:
        """Bytes of encoded result :meth:`complete` accepts; a larger one is refused with
        ``ResultNotSerializable`` before anything is written (the claim stays as it was).
        On MySQL/MariaDB it follows the server's ``max_allowed_packet`` once a connection
        has read it."""
        if self._limit is None:
            return mysql_limit(MYSQL_DEFAULT_PACKET)
        return self._limit

    def _learn_packet(self, max_allowed_packet: Any) -> None:
        if max_allowed_packet is not None:
            self._limit = mysql_limit(int(max_allowed_packet))

    def _check_result(self, key: str, result: bytes) -> None:
        if len(result) > self.max_result_size:
            raise ResultNotSerializable(
                f"{self._label}: the result for {key!r} is {len(result)} bytes encoded; "
                f"this store takes at most {self.max_result_size} (max_result_size)"
            )

    def _after(self, exc: BaseException, tried: set[str], *, retry: bool, create: bool) -> str:
        """What to do once an operation raised one of ``self._transient``: run it again
        (:data:`RETRY`), create the table and run it again (:data:`SETUP`), or raise the
        idem-core error (or the caller's own, for a failing statement of theirs)."""
        if callers_statement(exc):
            raise exc
        if retry and not self._bound and RETRY not in tried and retryable(exc):
            tried.add(RETRY)
            return RETRY
        if create and self._create and SETUP not in tried and own_missing_table(exc):
            tried.add(SETUP)
            return SETUP
        raise translate(exc, self._label, table=self.sql.table) from exc

    def _setup_result(self, existed: bool) -> str:
        if existed:
            return f"table {self.sql.table} already exists; ensured its indexes"
        return f"created table {self.sql.table} and index on expires_at"

    def _diagnostics_on(self, conn: Connection) -> dict[str, object]:
        info = conn.dialect.server_version_info
        claim_path = {
            "postgresql": "one statement (CTE: snapshot read + INSERT ON CONFLICT RETURNING)",
            "sqlite": "INSERT ON CONFLICT RETURNING; a key this store claimed before: read first",
            "mysql": "INSERT ON DUPLICATE KEY UPDATE + one read",
            "mariadb": "INSERT ON DUPLICATE KEY UPDATE + one read",
        }.get(self.sql.dialect.name, "?")
        key_column = key_column_on(conn, self.sql.table)
        if conn.in_transaction() and not self._bound:
            conn.commit()
        return {
            "dialect": self.sql.dialect.name,
            "driver": self.sql.dialect.driver,
            "server_version": ".".join(map(str, info or ())),
            "table": self.sql.table,
            "key_column": key_column,
            "max_key_length": MAX_KEY_LENGTH,
            "max_result_size": self.max_result_size,
            "claim_path": claim_path,
            "clock": "database",
            "bound": self._bound,
        }
