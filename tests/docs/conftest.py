"""The servers documentation pages may name (``<!-- docs-test: server=NAME -->``).

Each fixture returns the environment variables a page's examples run with. The machine's own
servers are only checked; DynamoDB is moto's server, started here on a free loopback port when a
page first needs it (the examples reach it through ``AWS_ENDPOINT_URL_DYNAMODB``, which boto3 and
aiobotocore read themselves, so the examples keep the URLs a reader would write).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import port_open, server_missing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dynamodb"))

from ddb_servers import FAKE_ENV, ROOT, Server, start, stop, wait

#: name -> (host, port) of the machine's servers (see scripts/services.sh)
MACHINE_SERVERS = {
    "redis": ("127.0.0.1", 6379),
    "postgresql": ("127.0.0.1", 5432),
    "mariadb": ("127.0.0.1", 3306),
    "rabbitmq": ("127.0.0.1", 5672),
}


@pytest.fixture(scope="session")
def docs_dynamodb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    argv = [sys.executable, "-m", "idem_bench.moto_atomic", "-H", "127.0.0.1", "-p", "{port}"]
    server: Server = start("moto", argv, ROOT, True, tmp_path_factory.mktemp("docs-moto"))
    try:
        with pytest.MonkeyPatch.context() as mp:  # wait() signs a ListTables request
            for k, v in FAKE_ENV.items():
                mp.setenv(k, v)
            problem = wait(server, time.monotonic() + 60)
        if problem is not None:
            server_missing("moto (DynamoDB)", problem)
        yield {**FAKE_ENV, "AWS_ENDPOINT_URL_DYNAMODB": server.endpoint}
    finally:
        stop(server)


@pytest.fixture
def docs_servers(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment for the servers ``request.param`` names; skips (fails under CI) when
    one is not reachable."""
    env: dict[str, str] = {}
    for name in request.param:
        if name == "dynamodb":
            env.update(request.getfixturevalue("docs_dynamodb"))
            continue
        host, port = MACHINE_SERVERS[name]
        if not port_open(host, port):
            server_missing(name, f"nothing listens on {host}:{port}")
    return env
