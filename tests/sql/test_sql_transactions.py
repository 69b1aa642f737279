"""Transactional completion: the claim and the result commit or roll back with the caller's
own writes, and a concurrent duplicate waits on the row lock, then replays."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pool_watch import PoolWatch, assert_no_leak
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.engine import Engine

from idem_core.record import ClaimOutcome, ClaimRequest, Status
from idem_core.registry import open_store


@pytest.fixture
def store(db_url: str) -> Iterator[Any]:
    store = open_store(db_url)
    watch = PoolWatch(store.engine)
    store.setup()
    yield store
    assert_no_leak(store, watch)


@pytest.fixture
def app(base_url: str) -> Iterator[tuple[Engine, Table]]:
    """The application's own engine (a normal, transactional one) and business table."""
    engine = create_engine(base_url)
    orders = Table(
        f"orders_{uuid.uuid4().hex[:8]}",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key", String(255), nullable=False),
    )
    orders.metadata.create_all(engine)
    yield engine, orders
    orders.drop(engine)
    assert engine.pool.checkedout() == 0
    engine.dispose()


def request(key: str, lease: float = 30.0) -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=lease, ttl=600)


def order_count(engine: Engine, orders: Table, key: str) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(orders.c.id).where(orders.c.key == key)).all())


def test_commit_keeps_result_and_business_rows(store: Any, app: tuple[Engine, Table]) -> None:
    engine, orders = app
    key = f"tx-{uuid.uuid4().hex}"
    with engine.begin() as conn:
        bound = store.bind(conn)
        res = bound.claim(request(key))
        assert res.outcome is ClaimOutcome.CLAIMED
        conn.execute(insert(orders).values(key=key))
        bound.complete(key, res.fence, b"order-1", 600)
    record = store.get(key)
    assert record is not None and record.status is Status.COMPLETED
    assert record.result == b"order-1"
    assert order_count(engine, orders, key) == 1
    again = store.claim(request(key))
    assert again.outcome is ClaimOutcome.COMPLETED and again.record.result == b"order-1"


def test_rollback_leaves_no_record(store: Any, app: tuple[Engine, Table]) -> None:
    engine, orders = app
    key = f"tx-{uuid.uuid4().hex}"
    with pytest.raises(RuntimeError), engine.begin() as conn:
        bound = store.bind(conn)
        res = bound.claim(request(key))
        conn.execute(insert(orders).values(key=key))
        bound.complete(key, res.fence, b"order-1", 600)
        raise RuntimeError("the business transaction fails after completing")
    assert store.get(key) is None
    assert order_count(engine, orders, key) == 0
    assert store.claim(request(key)).outcome is ClaimOutcome.CLAIMED


@pytest.mark.parametrize("first_commits", [True, False])
def test_concurrent_duplicate_waits_then_replays(
    store: Any, app: tuple[Engine, Table], first_commits: bool
) -> None:
    engine, orders = app
    key = f"tx-{uuid.uuid4().hex}"
    claimed = threading.Event()
    hold = 0.6
    outcome: dict[str, Any] = {}

    def first() -> None:
        conn = engine.connect()
        try:
            trans = conn.begin()
            bound = store.bind(conn)
            res = bound.claim(request(key))
            conn.execute(insert(orders).values(key=key))
            bound.complete(key, res.fence, b"first", 600)
            claimed.set()
            time.sleep(hold)
            if first_commits:
                trans.commit()
            else:
                trans.rollback()
        finally:
            claimed.set()
            conn.close()

    def duplicate() -> None:
        claimed.wait(10)
        started = time.monotonic()
        with engine.begin() as conn:
            res = store.bind(conn).claim(request(key))
            outcome["waited"] = time.monotonic() - started
            outcome["result"] = res
            if res.outcome.acquired:
                conn.execute(insert(orders).values(key=key))
                store.bind(conn).complete(key, res.fence, b"second", 600)

    threads = [threading.Thread(target=first), threading.Thread(target=duplicate)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    res = outcome["result"]
    assert outcome["waited"] >= hold * 0.5, "the duplicate did not wait for the first"
    if first_commits:
        assert res.outcome is ClaimOutcome.COMPLETED
        assert res.record.result == b"first"
    else:
        assert res.outcome is ClaimOutcome.CLAIMED
    assert order_count(engine, orders, key) == 1
    record = store.get(key)
    assert record is not None and record.result == (b"first" if first_commits else b"second")
