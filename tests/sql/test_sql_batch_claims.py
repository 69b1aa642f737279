"""Batch claims: a fixed number of statements whatever the batch's size (PostgreSQL, SQLite,
MariaDB), and
the same answers as one claim after another, for every kind of key a batch can meet. Also the
MariaDB statement forms the claim counts depend on: the placeholder row a completion on a
missing key writes and removes, a connection whose session variables were never defined, and
the MySQL 8 path (no ``INSERT ... RETURNING``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pool_watch import PoolWatch, assert_no_leak
from sqlalchemy import create_engine, text
from test_sql_round_trips import Counter, counting_store

from idem_core.errors import LeaseLost
from idem_core.record import ClaimOutcome, ClaimRequest
from idem_core.registry import open_store

# Kinds of key in a mixed batch, each with the outcome one claim after another gives.
KINDS = {
    "new": ClaimOutcome.CLAIMED,
    "completed": ClaimOutcome.COMPLETED,
    "in_progress": ClaimOutcome.IN_PROGRESS,
    "mismatch": ClaimOutcome.MISMATCH,
    "expired": ClaimOutcome.CLAIMED,
    "released": ClaimOutcome.CLAIMED,
    "lapsed": ClaimOutcome.TOOK_OVER,
    "again_new": ClaimOutcome.IN_PROGRESS,  # the batch's own "new" key, a second time
    "again_lapsed": ClaimOutcome.IN_PROGRESS,  # the batch's own "lapsed" key, a second time
}
# Statements for a batch of any size: PostgreSQL's one multi-row claim (a key the batch
# repeats is settled from that statement's rows); SQLite's upsert, read and take, then the read
# that settles a key the batch itself took; MariaDB's variables, then the upsert.
MIXED_STATEMENTS = {"postgresql": 1, "sqlite": 4, "mysql": 2}
NEW_STATEMENTS = {"postgresql": 1, "sqlite": 1, "mysql": 2}


def req(key: str, *, lease: float = 30.0, ttl: float = 60.0, fp: str = "fp") -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint=fp, attempt=uuid.uuid4().hex, lease=lease, ttl=ttl)


def _mysql_without_returning(store: Any) -> None:
    """Make a MariaDB store take MySQL 8's statements (no INSERT ... RETURNING)."""
    store.sql._has_returning = False


@pytest.fixture(params=["returning", "mysql8"])
def flavour(request: pytest.FixtureRequest, db: str) -> str:
    if request.param == "mysql8" and db != "mysql":
        pytest.skip("MySQL 8's statements are for MySQL/MariaDB")
    return str(request.param)


@pytest.fixture
def counted(db_url: str, flavour: str) -> Iterator[tuple[Any, Counter]]:
    counter = Counter()
    store = counting_store(db_url, counter)
    watch = PoolWatch(store.engine)
    store.setup()
    store.now()
    if flavour == "mysql8":
        _mysql_without_returning(store)
    counter.take()
    yield store, counter
    assert_no_leak(store, watch)


def _prepare(store: Any, n: int) -> list[tuple[str, ClaimRequest]]:
    """A batch of ``n`` requests, cycling through :data:`KINDS`, the records in place."""
    kinds = list(KINDS)
    plan: list[tuple[str, str]] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind.startswith("again_"):
            source = kind.removeprefix("again_")
            key = next(k for name, k in reversed(plan) if name == source)
        else:
            key = f"batch-{kind}-{uuid.uuid4().hex}"
        plan.append((kind, key))
    short: list[str] = []
    for kind, key in plan:
        if kind in ("completed", "mismatch"):
            held = store.claim(req(key))
            store.complete(key, held.fence, b"result", 60)
        elif kind == "in_progress":
            store.claim(req(key))
        elif kind == "expired":
            store.claim(req(key, lease=0.05, ttl=0.05))
            short.append(key)
        elif kind == "released":
            held = store.claim(req(key))
            store.release(key, held.fence)
        elif kind == "lapsed":
            store.claim(req(key, lease=0.05))
            short.append(key)
    if short:
        time.sleep(0.15)
    return [(kind, req(key, fp="other" if kind == "mismatch" else "fp")) for kind, key in plan]


def _check(store: Any, batch: list[tuple[str, ClaimRequest]], results: list[Any]) -> None:
    assert [r.outcome for r in results] == [KINDS[kind] for kind, _ in batch]
    for (_kind, request), result in zip(batch, results, strict=True):
        record = store.get(request.key)
        assert record is not None
        if result.outcome.acquired:
            assert result.record == record
            assert record.attempt == request.attempt
        else:
            assert result.record.fence == record.fence
            assert record.attempt != request.attempt


@pytest.mark.parametrize("n", [1, 10, 100])
def test_new_keys_fixed_statements(
    counted: tuple[Any, Counter], db: str, flavour: str, n: int
) -> None:
    store, counter = counted
    results = store.claim_many([req(f"batch-{uuid.uuid4().hex}") for _ in range(n)])
    statements = counter.take()
    assert all(r.outcome is ClaimOutcome.CLAIMED for r in results)
    print(f"\n{db}/{flavour}: claim_many({n}) of new keys: {statements} statements")
    if flavour == "mysql8":
        return  # MySQL 8: 2n
    assert statements == (1 if n == 1 else NEW_STATEMENTS[db])


@pytest.mark.parametrize("n", [9, 27, 99])
def test_mixed_keys_fixed_statements(
    counted: tuple[Any, Counter], db: str, flavour: str, n: int
) -> None:
    store, counter = counted
    batch = _prepare(store, n)
    counter.take()
    results = store.claim_many([request for _, request in batch])
    statements = counter.take()
    print(f"\n{db}/{flavour}: claim_many({n}) of mixed keys: {statements} statements")
    _check(store, batch, results)
    if flavour != "mysql8":
        assert statements == MIXED_STATEMENTS[db]


def test_same_answers_as_one_by_one(db_url: str, flavour: str) -> None:
    """The batch and the same claims made one at a time, on twin sets of records."""
    store = open_store(db_url)
    if flavour == "mysql8":
        _mysql_without_returning(store)
    try:
        batch = _prepare(store, 18)
        twins = _prepare(store, 18)
        one_by_one = [store.claim(request).outcome for _, request in twins]
        together = [r.outcome for r in store.claim_many([request for _, request in batch])]
        assert together == one_by_one
    finally:
        store.close()


def test_one_key_many_times(db: str, db_url: str) -> None:
    """A key repeated through a batch gets, request by request, what claims one after another
    get: the first claims it, the rest find it held (or take it over, on a lease of 0)."""
    store = open_store(db_url)
    counter = Counter()
    counting = counting_store(db_url, counter)
    try:
        counting.now()
        for lease, fps in ((30.0, ["fp", "fp", "other", "fp"] * 10), (0.0, ["fp"] * 3)):
            keys = [f"batch-rep-{uuid.uuid4().hex}" for _ in range(2)]
            batch, twins = ([req(key, lease=lease, fp=fp) for fp in fps] for key in keys)
            one_by_one = [store.claim(request).outcome for request in twins]
            counter.take()
            together = counting.claim_many(batch)
            statements = counter.take()
            assert [r.outcome for r in together] == one_by_one
            assert together[0].outcome is ClaimOutcome.CLAIMED
            if db == "postgresql" and lease:
                assert statements == 1
            final = store.get(keys[0])
            assert final is not None
            assert together[-1].record.fence == final.fence
    finally:
        counting.close()
        store.close()


def _race(stores: list[Any], keys: list[str], lease: float) -> list[Any]:
    """Every store's batch of all ``keys`` (ten twice), each in its own order, at once."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(len(stores))

    def run(store: Any) -> list[Any]:
        mine = keys + random.sample(keys, 10)
        random.shuffle(mine)
        barrier.wait()
        return list(store.claim_many([req(k, lease=lease) for k in mine]))

    with ThreadPoolExecutor(len(stores)) as pool:
        return [r for rs in pool.map(run, stores) for r in rs]


def test_concurrent_batches_one_owner_per_key(db: str, db_url: str) -> None:
    """Batches racing on the same keys (in their own orders, some twice): every key is
    claimed by exactly one request; then, its lease lapsed, taken over by exactly one.
    (MariaDB's multi-row upsert locks rows in the order of its VALUES: unsorted, two
    batches crossing keys deadlocked, error 1213.)"""
    stores = [open_store(db_url) for _ in range(4)]
    keys = [f"batch-race-{uuid.uuid4().hex}" for _ in range(40)]
    try:
        for lease, wanted in ((1.5, ClaimOutcome.CLAIMED), (30.0, ClaimOutcome.TOOK_OVER)):
            won = [r for r in _race(stores, keys, lease) if r.outcome.acquired]
            assert sorted(r.record.key for r in won) == sorted(keys)
            assert {r.outcome for r in won} == {wanted}
            time.sleep(1.6)  # the first round's leases lapse
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("n", [9, 27, 99])
async def test_postgres_async_fixed_statements(db: str, db_url: str, n: int) -> None:
    """The async store (psycopg's AsyncConnection) runs the same program: a batch of new keys
    and a mixed batch take as many statements as on the sync store, whatever their size."""
    if db != "postgresql":
        pytest.skip("PostgreSQL's async store")
    from sqlalchemy import event

    from idem_core.registry import open_async_store

    sync = open_store(db_url)
    store = open_async_store(db_url)
    assert store.engine.dialect.driver == "psycopg"
    statements: list[str] = []
    event.listen(
        store.engine.sync_engine,
        "before_cursor_execute",
        lambda _conn, _cur, sql, *_rest: statements.append(sql),
    )
    try:
        batch = _prepare(sync, n)
        await store.now()
        statements.clear()
        results = await store.claim_many([request for _, request in batch])
        assert len(statements) == MIXED_STATEMENTS[db], len(statements)
        _check(sync, batch, results)
        statements.clear()
        fresh = await store.claim_many([req(f"batch-{uuid.uuid4().hex}") for _ in range(n)])
        assert [r.outcome for r in fresh] == [ClaimOutcome.CLAIMED] * n
        assert len(statements) == NEW_STATEMENTS[db], len(statements)
    finally:
        await store.close()
        sync.close()


def _rows(db_url: str, key: str) -> int:
    engine = create_engine(db_url.split("?", 1)[0])
    table = db_url.split("table=", 1)[1].split("&", 1)[0]
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(f"SELECT COUNT(*) FROM {table} WHERE `key` = :k"), {"k": key}
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_complete_and_renew_on_missing_key_leave_no_row(db: str, db_url: str) -> None:
    """MariaDB completes with an upsert: on a key with no row it inserts a placeholder,
    which the same call deletes; the caller gets LeaseLost, as from an UPDATE."""
    if db != "mysql":
        pytest.skip("the placeholder row is MariaDB's")
    store = open_store(db_url)
    try:
        key = f"batch-gone-{uuid.uuid4().hex}"
        with pytest.raises(LeaseLost, match="gone"):
            store.complete(key, 12345, b"x", 60)
        with pytest.raises(LeaseLost, match="gone"):
            store.renew(key, 12345, 30)
        assert _rows(db_url, key) == 0
        assert store.claim(req(key)).outcome is ClaimOutcome.CLAIMED
    finally:
        store.close()


def test_fresh_connection_takeover(db: str, db_url: str) -> None:
    """On a caller's engine (no session set-up of ours), a connection's first claim reads
    session variables that did not exist when it was prepared: a takeover is still one."""
    if db != "mysql":
        pytest.skip("session variables are MySQL's")
    store = open_store(db_url)
    try:
        keys = [f"batch-fresh-{uuid.uuid4().hex}" for _ in range(3)]
        for key in keys:
            store.claim(req(key, lease=0.05))
    finally:
        store.close()
    time.sleep(0.15)
    for claim in (
        lambda s: [s.claim(req(keys[0]))],
        lambda s: s.claim_many([req(keys[1]), req(keys[2])]),
    ):
        engine = create_engine(db_url.split("?", 1)[0])
        theirs = open_store(db_url, client=engine)
        try:
            assert [r.outcome for r in claim(theirs)] in (
                [ClaimOutcome.TOOK_OVER],
                [ClaimOutcome.TOOK_OVER] * 2,
            )
        finally:
            theirs.close()
            engine.dispose()


async def test_mariadb_async_statements(db: str, db_url: str) -> None:
    """aiomysql (through SQLAlchemy's AsyncConnection): a first call takes 2 statements, a
    replay 1, a batch of claims 2 whatever its size."""
    if db != "mysql":
        pytest.skip("MariaDB's statements")
    from sqlalchemy import event

    from idem_core.registry import open_async_store

    store = open_async_store(db_url)
    statements: list[str] = []
    event.listen(
        store.engine.sync_engine,
        "before_cursor_execute",
        lambda _conn, _cur, sql, *_rest: statements.append(sql),
    )
    try:
        await store.setup()
        await store.now()
        statements.clear()
        key = f"batch-async-{uuid.uuid4().hex}"
        held = await store.claim(req(key))
        await store.complete(key, held.fence, b"done", 60)
        assert len(statements) == 2, statements
        statements.clear()
        assert (await store.claim(req(key))).outcome is ClaimOutcome.COMPLETED
        assert len(statements) == 1, statements
        for n in (10, 100):
            statements.clear()
            results = await store.claim_many([req(f"batch-{uuid.uuid4().hex}") for _ in range(n)])
            assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED] * n
            assert len(statements) == 2, statements
    finally:
        await store.close()
