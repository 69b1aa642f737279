"""Operators' tools (issue 15) on moto and DynamoDB Local: the API, the commands on 10,000
items written with BatchWriteItem, Scan pages of bounded size, and the Query path of a
shared (sort-keyed) table."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from ddb_servers import Server

from idem_core import Record, open_store

sys.path.insert(0, str(Path(__file__).parent.parent))

from ops_scenarios import api_scenario, bulk_scenario, cli, errors_scenario


@pytest.fixture(params=["own", "shared"])
def ops_url(request: pytest.FixtureRequest, server: Server) -> str:
    table = f"idem_ops_{uuid.uuid4().hex[:10]}"
    # One Scan page of 1,000 items takes moto about 3 s: more than the default read timeout.
    if request.param == "shared":
        return server.url(table, sort_key="sk", namespace="ops", read_timeout=60)
    return server.url(table, read_timeout=60)


@pytest.fixture
def store(ops_url: str) -> Iterator[Any]:
    s = open_store(ops_url)
    s.setup()
    yield s
    try:
        s.client.delete_table(TableName=s.settings.table)
    finally:
        s.close()


def _loader(store: Any) -> Any:
    def load(records: Sequence[Record]) -> None:
        client, table = store.client, store.settings.table
        for start in range(0, len(records), 25):
            chunk = records[start : start + 25]
            pending = [{"PutRequest": {"Item": store.plans.codec.item(r)}} for r in chunk]
            while pending:
                reply = client.batch_write_item(RequestItems={table: pending})
                pending = reply.get("UnprocessedItems", {}).get(table, [])

    return load


def test_api(store: Any) -> None:
    api_scenario(store)


# moto serves one request at a time and filters the whole table for every page: a listing
# of 10,000 items takes it about 30 s, so it runs the shorter scenario.
@pytest.mark.timeout(900)
def test_commands_on_10000_items(
    ops_url: str, store: Any, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    # 1,000 items a page (about 200 KB, under DynamoDB's 1 MB per Scan page)
    moto = "moto" in request.node.callspec.id
    bulk_scenario(ops_url, store, _loader(store), capsys, "bulk:", page=1000, thorough=not moto)
    _, _, err = cli(capsys, "ls", ops_url, "--limit", "1")
    assert ("whole table" in err) == (store.settings.sort_key is None)


def test_errors(ops_url: str, store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    errors_scenario(ops_url, capsys)


def test_async_api(ops_url: str, store: Any) -> None:
    import asyncio

    from ops_scenarios import async_api_scenario

    from idem_core import Idempotency

    async def main() -> None:
        idem = Idempotency.from_url(ops_url, namespace="ops")
        try:
            await async_api_scenario(idem)
        finally:
            await idem.aclose()

    asyncio.run(main())
