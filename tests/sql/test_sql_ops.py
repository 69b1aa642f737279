"""Operators' tools (issue 15) on SQLite, PostgreSQL and MariaDB: the API, the commands on
10,000 rows, keyset pages of bounded size, and a server that is down."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from idem_core import Record, open_store
from idem_core.scanning import ScanFilter

sys.path.insert(0, str(Path(__file__).parent.parent))

from ops_scenarios import api_scenario, bulk_scenario, cli, errors_scenario


@pytest.fixture
def ops_url(db_url: str) -> str:
    return db_url


@pytest.fixture
def store(ops_url: str) -> Iterator[Any]:
    s = open_store(ops_url)
    s.setup()
    yield s
    s.close()


def _loader(store: Any) -> Any:
    def load(records: Sequence[Record]) -> None:
        rows = [{name: getattr(rec, name) for name in rec.__struct_fields__} for rec in records]
        binary = store.engine.dialect.name in ("mysql", "mariadb")  # VARBINARY keys
        for row in rows:
            row["status"] = row["status"].value
            if binary:
                row["key"] = row["key"].encode()
        with store.engine.begin() as conn:  # one executemany
            conn.execute(store.table.insert(), rows)

    return load


def test_api(store: Any) -> None:
    api_scenario(store)


def test_commands_on_10000_rows(
    ops_url: str, store: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    head = f"bulk{uuid.uuid4().hex[:6]}:"
    bulk_scenario(ops_url, store, _loader(store), capsys, head)


def test_prefix_is_exact_and_keys_with_escapes(store: Any) -> None:
    """The prefix is compared exactly: case, ``%``/``_`` and ``\\`` are themselves."""
    head = f"px{uuid.uuid4().hex[:6]}"
    now = store.now()
    keys = [f"{head}:A\\:b", f"{head}:a\\:b", f"{head}:%", f"{head}:_x", f"{head}é:1"]
    _loader(store)(
        [
            Record(k, _completed(), "0" * 32, 1, 0, now + 60_000_000, "a", now, now, None)
            for k in keys
        ]
    )
    for prefix, expected in (
        (f"{head}:A", [keys[0]]),
        (f"{head}:a\\", [keys[1]]),
        (f"{head}:%", [keys[2]]),
        (f"{head}:_", [keys[3]]),
        (f"{head}é", [keys[4]]),
    ):
        found = [r.key for p in store.scan(ScanFilter(prefix=prefix), 2) for r in p]
        assert found == expected, prefix


def _completed() -> Any:
    from idem_core import Status

    return Status.COMPLETED


def test_errors(ops_url: str, store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    errors_scenario(ops_url, capsys)


def test_server_down_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://postgres@127.0.0.1:1/test?connect_timeout=1"
    for argv in (["ls", url], ["stuck", url], ["inspect", url, "k"], ["forget", url, "k"]):
        code, _out, err = cli(capsys, *argv)
        assert code == 2 and "StoreUnavailable" in err and err.count("\n") == 1, err


def test_async_api(ops_url: str, store: Any) -> None:
    import asyncio

    from ops_scenarios import async_api_scenario

    from idem_core import Idempotency

    async def main() -> None:
        idem = Idempotency.from_url(ops_url, namespace=f"aops{uuid.uuid4().hex[:6]}")
        try:
            await async_api_scenario(idem)
        finally:
            await idem.aclose()

    asyncio.run(main())
