"""Databases for the SQL store's tests: SQLite in a temp file, and the machine's PostgreSQL
and MariaDB (``IDEM_TEST_POSTGRES_URL`` / ``IDEM_TEST_MYSQL_URL`` override them).

The servers are shared with other test suites and benchmarks, so every run works in a
records table of its own and drops it at the end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).parent))

from support import port_open, server_missing

RUN = uuid.uuid4().hex[:10]
TABLE = f"idem_t_{RUN}"

SERVERS = {
    "postgresql": (
        "PostgreSQL",
        "IDEM_TEST_POSTGRES_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    ),
    "mysql": ("MariaDB", "IDEM_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}


def with_params(url: str, **params: object) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


def server_url(db: str) -> str:
    """The server's base URL (no options), or a loud skip / CI failure when it is down."""
    name, env, default = SERVERS[db]
    url = os.environ.get(env, default)
    parsed = make_url(url)
    host = parsed.host or "127.0.0.1"
    port = parsed.port or (5432 if db == "postgresql" else 3306)
    if not port_open(host, port):
        server_missing(name, f"nothing listens on {host}:{port} ({env})")
    return url


@pytest.fixture(scope="session")
def sqlite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("idem-sqlite") / "idem.db"


def _drop(url: str, table: str) -> None:
    engine = create_engine(url.split("?", 1)[0])
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
            conn.execute(text(f"DROP TABLE IF EXISTS {table}_steps"))  # see idem_sql.steps
    finally:
        engine.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql", "mysql"])
def db(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def base_url(db: str, sqlite_path: Path) -> str:
    """The database's URL, without store options."""
    if db == "sqlite":
        return f"sqlite:///{sqlite_path}"
    return server_url(db)


@pytest.fixture(scope="session")
def db_url(base_url: str) -> Iterator[str]:
    """The store URL for this run's table; the table is dropped at the end of the session."""
    yield with_params(base_url, table=TABLE)
    with contextlib.suppress(Exception):  # the server may have gone; nothing to clean then
        _drop(base_url, TABLE)
