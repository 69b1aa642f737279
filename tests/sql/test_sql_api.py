"""End to end through the public API: ``idem.claim(key, payload=..., connection=conn)`` on
SQLite, where the result commits (or rolls back) with the caller's own rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.engine import Engine

from idem_core.api import Idempotency


@pytest.fixture
def app(sqlite_path: Path) -> Iterator[tuple[Idempotency, Engine, Table]]:
    url = f"sqlite:///{sqlite_path}?table=idem_api_{uuid.uuid4().hex[:8]}"
    idem = Idempotency(url=url)
    engine = create_engine(f"sqlite:///{sqlite_path}")
    orders = Table(
        f"orders_{uuid.uuid4().hex[:8]}",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key", String(255), nullable=False),
    )
    orders.metadata.create_all(engine)
    idem.store.setup()
    yield idem, engine, orders
    engine.dispose()
    idem.store.close()


def place_order(idem: Idempotency, engine: Engine, orders: Table, key: str, fail: bool) -> int:
    with engine.begin() as conn:
        with idem.claim(key, payload={"amount": 10}, connection=conn) as call:
            if call.replayed:
                return int(call.result)
            row_id = conn.execute(insert(orders).values(key=key)).inserted_primary_key[0]
            call.complete(row_id)
        if fail:
            raise RuntimeError("the transaction fails after the call completed")
        return int(row_id)


def test_claim_with_connection_commits_and_replays(
    app: tuple[Idempotency, Engine, Table],
) -> None:
    idem, engine, orders = app
    key = f"api-{uuid.uuid4().hex}"
    first = place_order(idem, engine, orders, key, fail=False)
    assert place_order(idem, engine, orders, key, fail=False) == first
    with engine.connect() as conn:
        assert len(conn.execute(select(orders)).all()) == 1


def test_claim_with_connection_rolls_back_with_the_caller(
    app: tuple[Idempotency, Engine, Table],
) -> None:
    idem, engine, orders = app
    key = f"api-{uuid.uuid4().hex}"
    with pytest.raises(RuntimeError):
        place_order(idem, engine, orders, key, fail=True)
    with engine.connect() as conn:
        assert conn.execute(select(orders)).all() == []
    second = place_order(idem, engine, orders, key, fail=False)
    assert place_order(idem, engine, orders, key, fail=False) == second
