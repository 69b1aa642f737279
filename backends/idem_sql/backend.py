"""``sqlite://``, ``postgresql://``, ``mysql://``, ``mariadb://``: the SQL backend's entry point.

Nothing from SQLAlchemy or a driver is imported until a store is opened, so a missing
driver is reported as the extra to install, for the URL at hand.

URL options (query parameters, removed before the URL reaches SQLAlchemy):

``table``            records table name (a plain identifier), default ``idem_records``
``pool_size``        pooled connections kept open (SQLAlchemy ``pool_size``; a SQLite file: 64)
``max_overflow``     extra connections opened under load (``max_overflow``)
``pool_timeout``     seconds to wait for a pooled connection (``pool_timeout``)
``pool_recycle``     seconds after which a pooled connection is replaced (``pool_recycle``)
``busy_timeout``     SQLite only: milliseconds to wait for the write lock, default 5000
``create``           ``1`` (default): create the table on first use if it is missing; ``0``: never
``connect_timeout``  PostgreSQL, MySQL: seconds to open a connection, default 5
``read_timeout``     PostgreSQL, MySQL: seconds a statement may wait for the server, default 10
``coalesce``         ``1`` (default): concurrent calls share round trips (PostgreSQL with
                     psycopg, :mod:`idem_sql.coalesce`); ``0``: one round trip per statement

Other query parameters go to the driver, if they are among the driver's known ones
(:data:`_PASSED`); any other name, a bad port or a bad number is a ``ConfigurationError``
when the store is opened.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from idem_core.errors import ConfigurationError
from idem_core.registry import import_driver

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from .aio import AsyncSQLStore
    from .store import SQLStore

_OPTIONS = {
    "table",
    "pool_size",
    "max_overflow",
    "pool_timeout",
    "pool_recycle",
    "busy_timeout",
    "create",
    "connect_timeout",
    "read_timeout",
    "coalesce",
}
# option: (type, smallest value allowed)
_NUMBERS: dict[str, tuple[type, float]] = {
    "pool_size": (int, 0),
    "max_overflow": (int, -1),
    "pool_timeout": (float, 0),
    "pool_recycle": (int, -1),
    "busy_timeout": (int, 0),
    "connect_timeout": (float, 0.001),
    "read_timeout": (float, 0.001),
}
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS.update({"0": False, "false": False, "no": False, "off": False})
#: defaults, in seconds, for a server-backed store (SQLite has busy_timeout instead)
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0

# Driver parameters a URL may carry to the driver, per database; anything else is refused
# at construction (a typo would otherwise be ignored, or fail at the first call).
_LIBPQ = {
    "application_name",
    "channel_binding",
    "client_encoding",
    "fallback_application_name",
    "gssencmode",
    "gsslib",
    "hostaddr",
    "keepalives",
    "keepalives_count",
    "keepalives_idle",
    "keepalives_interval",
    "krbsrvname",
    "load_balance_hosts",
    "options",
    "passfile",
    "require_auth",
    "requirepeer",
    "service",
    "ssl_max_protocol_version",
    "ssl_min_protocol_version",
    "sslcert",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslkey",
    "sslmode",
    "sslnegotiation",
    "sslpassword",
    "sslrootcert",
    "sslsni",
    "target_session_attrs",
    "tcp_user_timeout",
    "host",
    "port",
    "dbname",
    "user",
    "password",
}
_ASYNCPG = {"ssl", "prepared_statement_cache_size", "prepared_statement_name_func"}
_MYSQL = {
    "charset",
    "binary_prefix",
    "client_flag",
    "compress",
    "init_command",
    "local_infile",
    "program_name",
    "server_public_key",
    "ssl_ca",
    "ssl_capath",
    "ssl_cert",
    "ssl_check_hostname",
    "ssl_cipher",
    "ssl_disabled",
    "ssl_key",
    "ssl_verify_cert",
    "ssl_verify_identity",
    "unix_socket",
    "use_unicode",
    "write_timeout",
}
_SQLITE = {
    "cache",
    "cached_statements",
    "check_same_thread",
    "detect_types",
    "immutable",
    "mode",
    "modeof",
    "nolock",
    "timeout",
    "uri",
    "vfs",
}
_PASSED = {
    "postgresql": _LIBPQ | _ASYNCPG,
    "mysql": _MYSQL,
    "mariadb": _MYSQL,
    "sqlite": _SQLITE,
}

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


def _check_url(url: str, sa_url: URL, database: str) -> None:
    """Refuse what the driver would only trip over at the first call: a bad port, a driver
    parameter nobody knows."""
    try:
        port = sa_url.port
    except ValueError as exc:  # SQLAlchemy parses the port lazily on some versions
        raise ConfigurationError(f"{url!r}: port is not a number ({exc})") from exc
    if port is not None and not 0 < int(port) < 65536:
        raise ConfigurationError(f"{url!r}: port {port} is out of range (1-65535)")
    allowed = _PASSED[database]
    unknown = sorted(k for k in sa_url.query if k not in _OPTIONS and k not in allowed)
    if unknown:
        raise ConfigurationError(
            f"unknown {database} URL parameter(s): {', '.join(unknown)}; store options are "
            f"{', '.join(sorted(_OPTIONS))}, and the driver takes {', '.join(sorted(allowed))}"
        )
    if "write_timeout" in sa_url.query:
        _number("write_timeout", sa_url.query["write_timeout"], float, 0.001)


def _number(key: str, value: Any, kind: type, least: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"SQL store option {key}={value!r} is not a number") from exc
    if not math.isfinite(number) or number < least:
        raise ConfigurationError(
            f"SQL store option {key}={value!r} must be a finite number, at least {least:g}"
        )
    return number


def _split_options(
    sa_url: URL, options: dict[str, Any], database: str
) -> tuple[URL, dict[str, Any]]:
    found: dict[str, Any] = {k: v for k, v in sa_url.query.items() if k in _OPTIONS}
    found = {k: (v[-1] if isinstance(v, tuple) else v) for k, v in found.items()}
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigurationError(f"unknown SQL store options: {', '.join(sorted(unknown))}")
    found.update(options)
    parsed: dict[str, Any] = {}
    for key, value in found.items():
        if key in _NUMBERS:
            kind, least = _NUMBERS[key]
            parsed[key] = _number(key, value, kind, least)
        elif key in ("create", "coalesce"):
            word = str(value).lower()
            if isinstance(value, bool):
                parsed[key] = value
            elif word in _BOOLEANS:
                parsed[key] = _BOOLEANS[word]
            else:
                raise ConfigurationError(f"SQL store option {key}={value!r} is not 0 or 1")
        else:
            parsed[key] = str(value)
    if database == "sqlite":
        for key in ("connect_timeout", "read_timeout"):
            if key in parsed:
                raise ConfigurationError(
                    f"SQL store option {key} does not apply to SQLite (a local file): "
                    "busy_timeout bounds the wait for the write lock"
                )
    else:
        parsed.setdefault("connect_timeout", CONNECT_TIMEOUT)
        parsed.setdefault("read_timeout", READ_TIMEOUT)
    return sa_url.difference_update_query(_OPTIONS), parsed


#: connections kept for a SQLite file (threads of one process: see ``_engine_args``)
SQLITE_POOL_SIZE = 64


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
        else:
            # A connection to a file is a file handle, opened only when a thread needs one;
            # a thread waiting for one of SQLAlchemy's 5 costs far more (docs/benchmarks.md).
            args.setdefault("pool_size", SQLITE_POOL_SIZE)
    else:
        args["connect_args"] = _timeout_args(sa_url.get_driver_name(), opts, set(sa_url.query))
    return args


def _timeout_args(driver: str, opts: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """The connect and read timeouts, in each driver's own terms (``connect_args`` win over
    the URL's parameters: what the URL names (``given``) is left to it)."""
    connect, read = opts["connect_timeout"], opts["read_timeout"]
    if driver in ("psycopg", "psycopg_async"):
        # libpq takes whole seconds (psycopg enforces at least 2). TCP keepalives find an
        # idle pooled connection whose path died before a statement waits on it.
        args: dict[str, Any] = {"connect_timeout": max(2, math.ceil(connect))}
        keepalives = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10}
        keepalives["keepalives_count"] = 3
        args.update({k: v for k, v in keepalives.items() if k not in given})
        return args
    if driver == "asyncpg":
        return {"timeout": connect}
    if driver == "pymysql":
        args = {"connect_timeout": connect, "read_timeout": read}
        if "write_timeout" not in given:
            args["write_timeout"] = read
        return args
    if driver == "aiomysql":
        # aiomysql has no read or write timeout: the store's asyncio deadline bounds reads.
        return {"connect_timeout": connect}
    return {}


def _async_deadline(driver: str, opts: dict[str, Any]) -> float | None:
    """An asyncio deadline per operation, for async drivers without a read timeout."""
    if driver in ("asyncpg", "aiomysql", "asyncmy"):
        return float(opts["connect_timeout"] + opts["read_timeout"])
    return None


def _bound_psycopg(engine: Any, read_timeout: float, asynchronous: bool) -> None:
    """psycopg connections with a read deadline (:mod:`idem_sql.timeouts`)."""
    from sqlalchemy import event

    from .caches import mid_command
    from .timeouts import async_connection_class, sync_connection_class

    @event.listens_for(engine, "handle_error")
    def _replace_mid_command(context: Any) -> None:
        # Statements on SQLAlchemy's Connection (setup, diagnostics, watched statements)
        # follow the caches' rule: a connection left mid-command is not pooled again.
        conn = context.connection
        dbapi = None if conn is None or conn.invalidated else conn.connection.dbapi_connection
        if not context.is_disconnect and dbapi is not None and mid_command(dbapi):
            context.is_disconnect = True

    if asynchronous:
        cls: Any = async_connection_class(read_timeout)

        @event.listens_for(engine, "do_connect")
        def _connect_async(dialect: Any, _rec: Any, cargs: Any, cparams: Any) -> Any:
            # SQLAlchemy's psycopg adapter opens the connection with this factory.
            cparams["async_creator_fn"] = cls.connect
            return None

    else:
        sync_cls: Any = sync_connection_class(read_timeout)

        @event.listens_for(engine, "do_connect")
        def _connect_sync(dialect: Any, _rec: Any, cargs: Any, cparams: Any) -> Any:
            return sync_cls.connect(*cargs, **cparams)


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


def _mysql_session(engine: Any) -> None:
    """Define the session variables a MariaDB claim reads back (:mod:`idem_sql.ops_mysql`)
    once per connection, so that no claim has to ask for them in a second statement."""
    from sqlalchemy import event

    from .ops_mysql import DEFINE

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(DEFINE)
        finally:
            cursor.close()


def _threaded_sqlite(
    engine: Any, sa_url: URL, args: dict[str, Any], opts: dict[str, Any], sql: Any
) -> AsyncSQLStore:
    """The async SQLite store whose programs run on a thread with a sync engine on the same
    file (:mod:`idem_sql.sqlite_aio`)."""
    from sqlalchemy import create_engine

    from .caches import own
    from .sqlite_aio import AsyncSQLiteStore

    runner = create_engine(sa_url.set(drivername="sqlite+pysqlite"), **args)
    _sqlite_pragmas(runner, opts.get("busy_timeout", 5000))
    own(engine.sync_engine)
    own(runner)
    return AsyncSQLiteStore(
        sql,
        engine=engine,
        owns_engine=True,
        create=opts.get("create", True),
        label="sqlite store",
        runner=runner,
    )


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
            what = "the port is not a number" if "int()" in str(exc) else str(exc)
            raise ConfigurationError(f"not a valid SQL URL: {url!r} ({what})") from exc
        _check_url(url, sa_url, database)
        sa_url, opts = _split_options(sa_url, options, database)
        if driver in ("aiomysql", "asyncmy"):
            # PyMySQL's write_timeout, for the sync store of the same URL; aiomysql has none
            # (the async store's deadline covers it).
            sa_url = sa_url.difference_update_query(["write_timeout"])
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
        coalesce = opts.get("coalesce", True)
        label = f"{database} store"
        if isinstance(client, Connection):
            return SQLStore(
                sql_for(client.dialect, table), connection=client, create=create, label=label
            )
        if isinstance(client, Engine):
            given = client.execution_options(isolation_level="AUTOCOMMIT")
            return SQLStore(
                sql_for(given.dialect, table),
                engine=given,
                create=create,
                label=label,
                coalesce=coalesce,
            )
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
        elif database in ("mysql", "mariadb"):
            _mysql_session(engine)
        elif engine.dialect.driver == "psycopg":
            _bound_psycopg(engine, opts["read_timeout"], asynchronous=False)
        own(engine)
        return SQLStore(
            sql_for(engine.dialect, table),
            engine=engine,
            owns_engine=True,
            create=create,
            label=label,
            coalesce=coalesce,
        )

    def open_async(self, url: str, *, client: Any = None, **options: Any) -> AsyncSQLStore:
        sa_url, database, opts, table, sql_for = self._prepare(url, True, client, options)
        from sqlalchemy.exc import ArgumentError
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

        from .aio import AsyncSQLStore
        from .caches import own

        create = opts.get("create", True)
        coalesce = opts.get("coalesce", True)
        label = f"{database} store"
        if isinstance(client, AsyncConnection):
            return AsyncSQLStore(
                sql_for(client.dialect, table), connection=client, create=create, label=label
            )
        if isinstance(client, AsyncEngine):
            given = client.execution_options(isolation_level="AUTOCOMMIT")
            return AsyncSQLStore(
                sql_for(given.dialect, table),
                engine=given,
                create=create,
                label=label,
                coalesce=coalesce,
            )
        if client is not None:
            raise ConfigurationError(
                "client must be a sqlalchemy AsyncEngine or AsyncConnection, "
                f"not {type(client).__name__}"
            )
        args = _engine_args(database, sa_url, opts)
        try:
            engine = create_async_engine(sa_url, **args)
        except (ArgumentError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot open {url!r}: {exc}") from exc
        if database == "sqlite":
            _sqlite_pragmas(engine.sync_engine, opts.get("busy_timeout", 5000))
            if "poolclass" not in args:  # a file, not one in-memory connection
                return _threaded_sqlite(engine, sa_url, args, opts, sql_for(engine.dialect, table))
        elif database in ("mysql", "mariadb"):
            _mysql_session(engine.sync_engine)
        elif engine.dialect.driver == "psycopg":
            _bound_psycopg(engine.sync_engine, opts["read_timeout"], asynchronous=True)
        own(engine.sync_engine)
        return AsyncSQLStore(
            sql_for(engine.dialect, table),
            engine=engine,
            owns_engine=True,
            create=create,
            label=label,
            deadline=_async_deadline(engine.dialect.driver, opts),
            coalesce=coalesce,
        )


BACKEND = SQLBackend()
