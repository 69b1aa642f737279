"""``sqlite://``, ``postgresql://``, ``mysql://``, ``mariadb://``: the SQL backend's entry point.

Nothing from SQLAlchemy or a driver is imported until a store is opened, so a missing
driver is reported as the extra to install, for the URL at hand.

URL options (query parameters, removed before the URL reaches SQLAlchemy):

``table``            records table name (a plain identifier), default ``idem_records``
``pool_size``        pooled connections kept open (SQLAlchemy ``pool_size``)
``max_overflow``     extra connections opened under load (``max_overflow``)
``pool_timeout``     seconds to wait for a pooled connection (``pool_timeout``)
``pool_recycle``     seconds after which a pooled connection is replaced (``pool_recycle``)
``busy_timeout``     SQLite only: milliseconds to wait for the write lock, default 5000
``create``           ``1`` (default): create the table on first use if it is missing; ``0``: never
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from idem_core.errors import ConfigurationError
from idem_core.registry import import_driver

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from .store import AsyncSQLStore, SQLStore

_OPTIONS = {
    "table",
    "pool_size",
    "max_overflow",
    "pool_timeout",
    "pool_recycle",
    "busy_timeout",
    "create",
}
_INT_OPTIONS = {"pool_size", "max_overflow", "pool_recycle", "busy_timeout"}
_FLOAT_OPTIONS = {"pool_timeout"}

# (sync driver, async driver) SQLAlchemy uses for each database when the URL names none,
# and which sync driver an async one pairs with (and back), so one URL opens both stores.
_DEFAULT = {
    "sqlite": ("pysqlite", "aiosqlite"),
    "postgresql": ("psycopg", "psycopg"),
    "mysql": ("pymysql", "aiomysql"),
    "mariadb": ("pymysql", "aiomysql"),
}
_ASYNC_DRIVERS = {"aiosqlite", "asyncpg", "psycopg_async", "aiomysql", "asyncmy"}
_SYNC_DRIVERS = {"pysqlite", "psycopg", "psycopg2", "pymysql", "mysqldb", "mysqlconnector"}
_MODULES = {
    "pysqlite": "sqlite3",
    "aiosqlite": "aiosqlite",
    "psycopg": "psycopg",
    "psycopg_async": "psycopg",
    "psycopg2": "psycopg2",
    "asyncpg": "asyncpg",
    "pymysql": "pymysql",
    "aiomysql": "aiomysql",
    "asyncmy": "asyncmy",
    "mysqldb": "MySQLdb",
    "mysqlconnector": "mysql.connector",
}
_EXTRAS = {"sqlite": "sql", "postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def _database(scheme: str) -> str:
    base = scheme.split("+", 1)[0].lower()
    return "postgresql" if base == "postgres" else base


def _extra(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else url
    return _EXTRAS.get(_database(scheme), "sql")


def driver_url(url: str, *, asynchronous: bool) -> tuple[str, str, str]:
    """(SQLAlchemy URL without our options, database, driver) for the sync or async store."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"not a SQL store URL: {url!r}")
    scheme, rest = url.split("://", 1)
    database = _database(scheme)
    if database not in _DEFAULT:
        raise ConfigurationError(f"idem_sql does not handle {scheme!r} URLs")
    driver = scheme.split("+", 1)[1].lower() if "+" in scheme else ""
    sync_default, async_default = _DEFAULT[database]
    if asynchronous and (not driver or driver in _SYNC_DRIVERS):
        driver = async_default
    elif not asynchronous and (not driver or driver in _ASYNC_DRIVERS):
        driver = sync_default
    if database == "postgresql" and driver == "psycopg_async":
        driver = "psycopg"
    return f"{database}+{driver}://{rest}", database, driver


def _split_options(sa_url: URL, options: dict[str, Any]) -> tuple[URL, dict[str, Any]]:
    found: dict[str, Any] = {k: v for k, v in sa_url.query.items() if k in _OPTIONS}
    found = {k: (v[-1] if isinstance(v, tuple) else v) for k, v in found.items()}
    found.update(options)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigurationError(f"unknown SQL store options: {', '.join(sorted(unknown))}")
    parsed: dict[str, Any] = {}
    for key, value in found.items():
        try:
            if key in _INT_OPTIONS:
                parsed[key] = int(value)
            elif key in _FLOAT_OPTIONS:
                parsed[key] = float(value)
            elif key == "create":
                parsed[key] = str(value).lower() not in {"0", "false", "no", "off"}
            else:
                parsed[key] = str(value)
        except ValueError as exc:
            raise ConfigurationError(f"SQL store option {key}={value!r} is not valid") from exc
    return sa_url.difference_update_query(_OPTIONS), parsed


def _engine_args(database: str, sa_url: URL, opts: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {
        "isolation_level": "AUTOCOMMIT",
        # Autocommit connections have nothing to roll back on check-in: skip that round trip.
        "pool_reset_on_return": None,
        "skip_autocommit_rollback": True,
    }
    for name in ("pool_size", "max_overflow", "pool_timeout", "pool_recycle"):
        if name in opts:
            args[name] = opts[name]
    if database == "sqlite":
        db = sa_url.database
        if not db or db == ":memory:" or "mode=memory" in str(sa_url):
            from sqlalchemy.pool import StaticPool

            # One in-memory database is one connection: share it.
            args["poolclass"] = StaticPool
            args["connect_args"] = {"check_same_thread": False}
            for name in ("pool_size", "max_overflow", "pool_timeout"):
                args.pop(name, None)
    return args


def _sqlite_pragmas(engine: Any, busy_ms: int) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()


class SQLBackend:
    """Opens :class:`~idem_sql.store.SQLStore` / :class:`~idem_sql.store.AsyncSQLStore`."""

    extra = "sql"

    def _prepare(self, url: str, asynchronous: bool, client: Any, options: dict[str, Any]) -> Any:
        extra = _extra(url) if isinstance(url, str) else "sql"
        import_driver("sqlalchemy", extra)
        from sqlalchemy.engine import make_url

        from .ops import sql_for

        target, database, driver = driver_url(url, asynchronous=asynchronous)
        try:
            sa_url = make_url(target)
        except Exception as exc:
            raise ConfigurationError(f"not a valid SQL URL: {url!r} ({exc})") from exc
        sa_url, opts = _split_options(sa_url, options)
        if client is None:
            import_driver(_MODULES.get(driver, driver), extra)
        table = opts.get("table", "idem_records")
        return sa_url, database, opts, table, sql_for

    def open(self, url: str, *, client: Any = None, **options: Any) -> SQLStore:
        sa_url, database, opts, table, sql_for = self._prepare(url, False, client, options)
        from sqlalchemy import create_engine
        from sqlalchemy.engine import Connection, Engine
        from sqlalchemy.exc import ArgumentError

        from .store import SQLStore, own

        create = opts.get("create", True)
        label = f"{database} store"
        if isinstance(client, Connection):
            return SQLStore(
                sql_for(client.dialect, table), connection=client, create=create, label=label
            )
        if isinstance(client, Engine):
            given = client.execution_options(isolation_level="AUTOCOMMIT")
            return SQLStore(sql_for(given.dialect, table), engine=given, create=create, label=label)
        if client is not None:
            raise ConfigurationError(
                f"client must be a sqlalchemy Engine or Connection, not {type(client).__name__}"
            )
        try:
            engine = create_engine(sa_url, **_engine_args(database, sa_url, opts))
        except (ArgumentError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot open {url!r}: {exc}") from exc
        if database == "sqlite":
            _sqlite_pragmas(engine, opts.get("busy_timeout", 5000))
        own(engine)
        return SQLStore(
            sql_for(engine.dialect, table),
            engine=engine,
            owns_engine=True,
            create=create,
            label=label,
        )

    def open_async(self, url: str, *, client: Any = None, **options: Any) -> AsyncSQLStore:
        sa_url, database, opts, table, sql_for = self._prepare(url, True, client, options)
        from sqlalchemy.exc import ArgumentError
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

        from .store import AsyncSQLStore, own

        create = opts.get("create", True)
        label = f"{database} store"
        if isinstance(client, AsyncConnection):
            return AsyncSQLStore(
                sql_for(client.dialect, table), connection=client, create=create, label=label
            )
        if isinstance(client, AsyncEngine):
            given = client.execution_options(isolation_level="AUTOCOMMIT")
            return AsyncSQLStore(
                sql_for(given.dialect, table), engine=given, create=create, label=label
            )
        if client is not None:
            raise ConfigurationError(
                "client must be a sqlalchemy AsyncEngine or AsyncConnection, "
                f"not {type(client).__name__}"
            )
        try:
            engine = create_async_engine(sa_url, **_engine_args(database, sa_url, opts))
        except (ArgumentError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot open {url!r}: {exc}") from exc
        if database == "sqlite":
            _sqlite_pragmas(engine.sync_engine, opts.get("busy_timeout", 5000))
        own(engine.sync_engine)
        return AsyncSQLStore(
            sql_for(engine.dialect, table),
            engine=engine,
            owns_engine=True,
            create=create,
            label=label,
        )


BACKEND = SQLBackend()
