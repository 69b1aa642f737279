"""Two real DynamoDB servers on loopback, started once per session: moto's server (returns the
old item when a condition fails) and AWS DynamoDB Local (does not, so the GetItem fallback
runs). Tests that take ``server`` run on both."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Iterator

import pytest
from ddb_servers import (
    DDB_LOCAL,
    FAKE_ENV,
    ROOT,
    SHARED_TABLE,
    TABLE,
    Server,
    start,
    stop,
    wait,
)
from idem_dynamodb.store import DynamoDBStore
from support import server_missing


@pytest.fixture(scope="session")
def _aws_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in FAKE_ENV}
    os.environ.update(FAKE_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def _servers(
    _aws_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server | str]]:
    """Both servers start together (DynamoDB Local's JVM is the slow one); each entry is a
    ready Server or the reason it is missing."""
    tmp = tmp_path_factory.mktemp("dynamodb-servers")
    servers: dict[str, Server | str] = {}
    started: list[Server] = []
    if importlib.util.find_spec("moto.server") is not None:
        # moto_server, made atomic per request (see idem_bench/moto_atomic.py).
        argv = [sys.executable, "-m", "idem_bench.moto_atomic"]
        argv += ["-H", "127.0.0.1", "-p", "{port}"]
        started.append(start("moto", argv, ROOT, True, tmp))
    else:
        servers["moto"] = "moto[server] is not installed: run `make setup`"
    java = shutil.which("java")
    if java is None:
        servers["dynamodb-local"] = "java is not installed (Java 17 runs DynamoDB Local)"
    elif not (DDB_LOCAL / "DynamoDBLocal.jar").exists():
        servers["dynamodb-local"] = f"{DDB_LOCAL}/DynamoDBLocal.jar is missing: run `make setup`"
    else:
        argv = [java, "-Djava.library.path=DynamoDBLocal_lib", "-jar", "DynamoDBLocal.jar"]
        argv += ["-inMemory", "-port", "{port}"]
        started.append(start("dynamodb-local", argv, DDB_LOCAL, False, tmp))
    deadline = time.monotonic() + 90
    try:
        for server in started:
            problem = wait(server, deadline)
            if problem is None:
                for table, options in ((TABLE, {}), (SHARED_TABLE, {"sort_key": "sk"})):
                    with server.open(table, **options) as store:
                        store.setup()
                servers[server.name] = server
            else:
                servers[server.name] = problem
        yield servers
    finally:
        for server in started:
            stop(server)


def _server(servers: dict[str, Server | str], name: str) -> Server:
    found = servers[name]
    if isinstance(found, str):
        server_missing(name, found)
    assert isinstance(found, Server)
    return found


@pytest.fixture(scope="session", params=["moto", "dynamodb-local"])
def server(request: pytest.FixtureRequest, _servers: dict[str, Server | str]) -> Server:
    return _server(_servers, str(request.param))


@pytest.fixture(scope="session")
def moto(_servers: dict[str, Server | str]) -> Server:
    return _server(_servers, "moto")


@pytest.fixture(scope="session")
def dynamodb_local(_servers: dict[str, Server | str]) -> Server:
    return _server(_servers, "dynamodb-local")


@pytest.fixture
def store(server: Server) -> Iterator[DynamoDBStore]:
    """A store on the real clocks."""
    with server.open() as s:
        yield s
