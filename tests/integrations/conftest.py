"""Stores for the integration tests: memory://, the machine's Redis, DynamoDB on moto's server.

Integrations use only the public API, so the same flows run on every store URL; the servers
are real (Redis at 127.0.0.1:6379, moto's server started here on a free loopback port).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_ports import free_port
from support import port_open, server_missing

from idem_core import Idempotency

RUN = uuid.uuid4().hex[:10]
ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("IDEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's DynamoDB server, one request applied at a time as DynamoDB applies each write
    atomically (see benchmarks/idem_bench/moto_atomic.py)."""
    os.environ.update({k: os.environ.get(k, v) for k, v in FAKE_AWS.items()})
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    argv = [sys.executable, "-m", "idem_bench.moto_atomic"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                server_missing("moto server", f"did not start; see {log}")
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_ready: set[str] = set()


def _dynamodb_url(endpoint: str) -> str:
    from idem_core.registry import open_store

    url = f"dynamodb://idem_integrations?region=us-east-1&endpoint_url={endpoint}"
    if url not in _ready:
        store = open_store(url)
        try:
            store.setup()  # type: ignore[attr-defined]
        finally:
            store.close()
        _ready.add(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not port_open("127.0.0.1", 6379) and "IDEM_TEST_REDIS_URL" not in os.environ:
        server_missing("Redis", "nothing listens on 127.0.0.1:6379")
    sep = "&" if "?" in REDIS_URL else "?"
    return f"{REDIS_URL}{sep}prefix=idemtest:{RUN}:"


@pytest.fixture(params=["memory", "redis", "dynamodb"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A URL per store kind; the integration's flow must hold on each."""
    if request.param == "memory":
        return f"memory://integrations-{uuid.uuid4().hex[:8]}"
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return _dynamodb_url(str(request.getfixturevalue("moto_endpoint")))


@pytest.fixture
def idem(store_url: str) -> Iterator[Idempotency]:
    """An Idempotency on each store, in a namespace of its own."""
    idem = Idempotency.from_url(store_url, namespace=f"t{uuid.uuid4().hex[:12]}")
    yield idem
    idem.close()


@pytest.fixture
def memory_idem() -> Iterator[Idempotency]:
    idem = Idempotency.from_url("memory://", namespace=f"t{uuid.uuid4().hex[:12]}")
    yield idem
    idem.close()
