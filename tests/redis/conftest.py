"""Redis servers for the Redis store's tests.

* the machine's Redis at 127.0.0.1:6379 (``IDEM_TEST_REDIS_URL`` overrides), shared with
  others, so every key carries a prefix unique to this run and nothing is flushed;
* a three-master Redis Cluster on free loopback ports, started once per session and stopped
  at the end;
* standalone servers started per test (module) for faults and command counts, where the test
  may kill, pause or restart the server and count every command it processed.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from redis_servers import RedisCluster, RedisServer, redis_binaries, with_params
from support import port_open, server_missing

RUN = uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared server's URL, with a key prefix unique to this test run."""
    url = os.environ.get("IDEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    parts = urlsplit(url)
    if parts.scheme in {"redis", "rediss"}:
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        if not port_open(host, port):
            server_missing("Redis", f"nothing listens on {host}:{port} (IDEM_TEST_REDIS_URL)")
    return with_params(url, prefix=f"idemtest:{RUN}:")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    missing = redis_binaries()
    if missing:
        server_missing("Redis Cluster", missing)
    nodes = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        nodes.start()
    except Exception as exc:
        nodes.stop()
        server_missing("Redis Cluster", f"could not be started: {exc}")
    yield nodes
    nodes.stop()


@pytest.fixture(scope="session")
def cluster_url(cluster: RedisCluster) -> str:
    return with_params(cluster.url, prefix=f"idemtest:{RUN}:")


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A standalone Redis only this test uses, durable (AOF, fsync always) so that a restart
    keeps what it acknowledged."""
    missing = redis_binaries()
    if missing:
        server_missing("redis-server", missing)
    server = RedisServer(tmp_path / "redis", None, "--appendonly", "yes", "--appendfsync", "always")
    try:
        server.start()
    except Exception as exc:
        server.stop()
        server_missing("redis-server", f"could not be started: {exc}")
    yield server
    server.stop()
