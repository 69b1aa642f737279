"""Operators' tools (issue 15) on Redis standalone and on the Cluster fixture: the API, the
commands on 10,000 records written by pipeline, SCAN pages of bounded size."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from idem_redis import records
from redis_servers import with_params

from idem_core import Record, Status, open_store
from idem_core.scanning import ScanFilter

sys.path.insert(0, str(Path(__file__).parent.parent))

from ops_scenarios import api_scenario, bulk_scenario, errors_scenario


@pytest.fixture(params=["standalone", "cluster"])
def ops_url(request: pytest.FixtureRequest) -> str:
    base = request.getfixturevalue("redis_url" if request.param == "standalone" else "cluster_url")
    # A key prefix of this test's own: the scan walks only what these tests wrote.
    return with_params(base.split("?", 1)[0], prefix=f"idemops:{uuid.uuid4().hex[:10]}:")


@pytest.fixture
def store(ops_url: str) -> Iterator[Any]:
    s = open_store(ops_url)
    yield s
    s.close()


def _loader(store: Any) -> Any:
    def load(batch: Sequence[Record]) -> None:
        client = store.client
        pipe = client.pipeline(transaction=False)
        for i, rec in enumerate(batch):
            name = store.prefix + rec.key
            pipe.set(name, records.encode(rec), pxat=rec.expires_at // 1000 + 1)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()

    return load


def test_api(store: Any) -> None:
    api_scenario(store)


def test_commands_on_10000_records(
    ops_url: str, store: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    bulk_scenario(ops_url, store, _loader(store), capsys, "bulk:")
    _, _, err = __import__("ops_scenarios").cli(capsys, "ls", ops_url, "--limit", "1")
    assert "full walk of the keyspace" in err


def test_prefix_with_glob_characters_is_literal(store: Any) -> None:
    now = store.now()
    keys = ["g*:1", "g?:1", "g[a]:1", "ga:1", "g\\:1"]
    _loader(store)(
        [
            Record(k, Status.COMPLETED, "0" * 32, 1, 0, now + 3_600_000_000, "a", now, now, None)
            for k in keys
        ]
    )
    for prefix, expected in (
        ("g*", ["g*:1"]),
        ("g?", ["g?:1"]),
        ("g[a]", ["g[a]:1"]),
        ("g\\", ["g\\:1"]),
    ):
        found = [r.key for p in store.scan(ScanFilter(prefix=prefix), 10) for r in p]
        assert found == expected, prefix


def test_errors(ops_url: str, store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    errors_scenario(ops_url, capsys)


@pytest.mark.parametrize("command", ["ls", "stuck", "inspect"])
def test_frozen_server_is_one_line_within_the_budget(
    redis_url: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that stops answering mid-way: ``idem ls``/``stuck``/``inspect`` end with
    one StoreUnavailable line within the store's budget ((retries + 1) x timeout = 2 s)."""
    import time

    from fault_proxy import FaultProxy
    from ops_scenarios import cli

    with FaultProxy("127.0.0.1", 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0?timeout=1&connect_timeout=1&retries=1"
        url += f"&prefix=idemops:{uuid.uuid4().hex[:8]}:"
        proxy.blackhole()
        argv = [command, url] + (["k"] if command == "inspect" else [])
        t0 = time.monotonic()
        code, out, err = cli(capsys, *argv)
        took = time.monotonic() - t0
    assert code == 2 and "StoreUnavailable" in err and err.count("\n") == 1 and not out
    assert took < 4.0, took


def test_async_api(ops_url: str) -> None:
    import asyncio

    from ops_scenarios import async_api_scenario

    from idem_core import Idempotency

    async def main() -> None:
        idem = Idempotency.from_url(ops_url, namespace="aops")
        try:
            await async_api_scenario(idem)
        finally:
            await idem.aclose()

    asyncio.run(main())
