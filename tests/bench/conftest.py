"""Real servers for the bench's scenario tests: the machine's PostgreSQL, MariaDB and Redis
(shared, so every scenario works in tables and key prefixes of its own), SQLite in a temporary
folder, and moto and DynamoDB Local started by the bench's own server finder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from idem_bench import targets
from idem_bench.targets import Target
from support import port_open, server_missing

SERVERS = {
    "postgresql": (
        "PostgreSQL",
        "IDEM_TEST_POSTGRES_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        5432,
    ),
    "mariadb": ("MariaDB", "IDEM_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test", 3306),
    "redis": ("Redis", "IDEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0", 6379),
}


def server_target(name: str) -> Target:
    label, env, default, port = SERVERS[name]
    url = os.environ.get(env, default)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or port
    if not port_open(host, port):
        server_missing(label, f"nothing listens on {host}:{port} ({env})")
    target = targets.target_for_url(url, name)
    # as --local finds it: a server others use (the bench starts a private Redis for fills)
    target.shared = True
    return target


@pytest.fixture(params=["sqlite", "postgresql", "mariadb", "redis"])
def keyspace_target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "sqlite":
        return Target("sqlite", f"sqlite:///{tmp_path / 'bench.db'}", "sql", database="sqlite")
    return server_target(str(request.param))


@pytest.fixture
def redis_target() -> Target:
    """The machine's Redis as --local finds it (shared). A fixture, not an import: in a whole
    run, ``conftest`` names whichever folder's conftest was imported first."""
    return server_target("redis")


@pytest.fixture(scope="session")
def ddb_servers() -> Iterator[dict[str, Target | str]]:
    servers = targets.Servers()
    found: dict[str, Target | str] = {}
    try:
        for name in ("moto", "dynamodb-local"):
            target = servers.dynamodb(name)
            found[name] = target if target is not None else servers.skipped.get(name, "?")
        yield found
    finally:
        servers.stop()


@pytest.fixture(params=["moto", "dynamodb-local"])
def ddb_target(request: pytest.FixtureRequest, ddb_servers: dict[str, Target | str]) -> Target:
    found = ddb_servers[str(request.param)]
    if isinstance(found, str):
        server_missing(str(request.param), found)
    assert isinstance(found, Target)
    return found
