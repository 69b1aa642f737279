"""Transactional steps: a step's business write and its recorded result commit together."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.engine import Connection, Engine

from idem_core import Idempotency, LeaseLost
from idem_core.record import ClaimOutcome
from idem_core.registry import open_store


@pytest.fixture
def store(db_url: str) -> Iterator[Any]:
    store = open_store(db_url)
    store.setup()
    yield store
    store.close()


@pytest.fixture
def app(base_url: str) -> Iterator[tuple[Engine, Table]]:
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
    engine.dispose()


def _count(engine: Engine, orders: Table, key: str) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(orders.c.id).where(orders.c.key == key)).all())


def _write(conn: Connection, orders: Table, key: str) -> int:
    return int(conn.execute(insert(orders).values(key=key)).inserted_primary_key[0])


def test_step_commits_with_the_business_write(store: Any, app: tuple[Engine, Table]) -> None:
    engine, orders = app
    idem = Idempotency(store, namespace=f"tx{uuid.uuid4().hex[:6]}")
    key = uuid.uuid4().hex
    with idem.claim(key) as call:
        with engine.begin() as conn:
            row = call.step("write", lambda: _write(conn, orders, key), connection=conn)
        call.complete(row)
    assert _count(engine, orders, key) == 1
    assert set(store.load_steps(call.key)) == {"write"}


def test_rolled_back_step_is_not_recorded_and_runs_again(
    store: Any, app: tuple[Engine, Table]
) -> None:
    engine, orders = app
    idem = Idempotency(store, namespace=f"tx{uuid.uuid4().hex[:6]}")
    key = uuid.uuid4().hex
    with pytest.raises(RuntimeError, match="after the step"), idem.claim(key) as call:
        with engine.begin() as conn:
            call.step("write", lambda: _write(conn, orders, key), connection=conn)
            raise RuntimeError("after the step, before the commit")
    assert _count(engine, orders, key) == 0
    assert store.load_steps(call.key) == {}  # the step's row rolled back with the order
    ran = []
    with idem.claim(key) as retry:
        assert retry.outcome is ClaimOutcome.CLAIMED  # the first call released the key

        def write_again(conn: Connection) -> int:
            ran.append(1)
            return _write(conn, orders, key)

        with engine.begin() as conn:
            retry.step("write", lambda: write_again(conn), connection=conn)
        retry.complete("ok")
    assert ran == [1] and _count(engine, orders, key) == 1


def test_zombie_step_rolls_back_its_transaction(store: Any, app: tuple[Engine, Table]) -> None:
    engine, orders = app
    ns = f"tx{uuid.uuid4().hex[:6]}"
    zombie_idem = Idempotency(store, namespace=ns, lease=0.3)
    key = uuid.uuid4().hex
    zombie = zombie_idem.claim(key).enter()
    zombie.step("stock", lambda: 1)

    time.sleep(0.6)  # the lease lapses (the database's clock judges it)
    heir = Idempotency(store, namespace=ns).claim(key).enter()
    assert heir.outcome is ClaimOutcome.TOOK_OVER
    with pytest.raises(LeaseLost), engine.begin() as conn:
        zombie.step("write", lambda: _write(conn, orders, key), connection=conn)
    assert _count(engine, orders, key) == 0  # the zombie's order rolled back with its step
    assert heir.step("stock", lambda: 2) == 1
    with engine.begin() as conn:
        heir.step("write", lambda: _write(conn, orders, key), connection=conn)
    heir.complete("done")
    assert _count(engine, orders, key) == 1
    assert set(store.load_steps(heir.key)) == {"stock", "write"}


def test_purge_deletes_the_steps_of_expired_records_only(store: Any) -> None:
    from idem_core.record import ClaimRequest

    def claim(key: str, life: float) -> Any:
        return store.claim(ClaimRequest(key, "fp", uuid.uuid4().hex, life, life))

    dead, live = f"dead-{uuid.uuid4().hex}", f"live-{uuid.uuid4().hex}"
    d, lv = claim(dead, 0.3), claim(live, 60)
    store.record_step(dead, d.fence, "one", b"\x011", d.record.expires_at)
    store.record_step(live, lv.fence, "one", b"\x011", lv.record.expires_at)
    time.sleep(0.6)
    store.purge_expired()
    assert store.load_steps(dead) == {}
    assert set(store.load_steps(live)) == {"one"}
    store.delete(live)
    assert store.load_steps(live) == {}  # deleted with its record
