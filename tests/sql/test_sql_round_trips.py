"""Round trips per call, counted at the driver: every statement executed, and every COMMIT or
ROLLBACK the driver sends (there must be none: our connections are in autocommit mode)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pool_watch import PoolWatch, assert_no_leak
from sqlalchemy import event, text

from idem_core.record import ClaimOutcome, ClaimRequest
from idem_core.registry import open_store

# Statements per call: (PostgreSQL, SQLite, MySQL/MariaDB). Every store reads first a key it
# claimed before (its replays are one plain read), so taking over such a key costs the read
# too; any other key is written first. MariaDB (10.5+) answers every claim, completion and
# renewal from the write's own RETURNING: one statement each (MySQL 8, without RETURNING,
# takes 2: see test_sql_batch_claims.py); a batch of claims defines the session variables
# the upsert reads back, then runs.
EXPECTED = {
    "claim_first": (1, 1, 1),
    "claim_replay_completed": (1, 1, 1),
    "claim_replay_other_store": (1, 2, 1),
    "claim_conflict_in_progress": (1, 1, 1),
    "claim_takeover": (2, 2, 2),
    "complete": (1, 1, 1),
    "renew": (1, 1, 1),
    "release": (1, 1, 1),
    "get": (1, 1, 1),
    "claim_many_10_new": (1, 1, 2),
}
COLUMN = {"postgresql": 0, "sqlite": 1, "mysql": 2}


class Counter:
    def __init__(self) -> None:
        self.statements = 0
        self.transaction_calls = 0

    def take(self) -> int:
        total = self.statements + self.transaction_calls
        self.statements = self.transaction_calls = 0
        return total


def count_statements(dbapi_connection: Any, counter: Counter) -> None:
    """Count every statement the driver sends (the store runs them on DBAPI cursors)."""

    def seen() -> None:
        counter.statements += 1

    # The store's psycopg connections are a subclass (with a read deadline): look at the MRO.
    modules = [cls.__module__ for cls in type(dbapi_connection).__mro__]
    if modules[0].startswith("sqlite3"):
        dbapi_connection.set_trace_callback(lambda _sql: seen())
    elif any(module.startswith("psycopg") for module in modules):
        base = dbapi_connection.cursor_factory

        class PgCounting(base):  # type: ignore[misc, valid-type]
            def execute(self, *args: Any, **kwargs: Any) -> Any:
                seen()
                return super().execute(*args, **kwargs)

        dbapi_connection.cursor_factory = PgCounting
    else:
        base = dbapi_connection.cursorclass

        class MyCounting(base):  # type: ignore[misc, valid-type]
            def execute(self, *args: Any, **kwargs: Any) -> Any:
                seen()
                return super().execute(*args, **kwargs)

        dbapi_connection.cursorclass = MyCounting


def counting_store(db_url: str, counter: Counter) -> Any:
    store = open_store(db_url)
    engine = store.engine
    event.listen(engine, "connect", lambda conn, _rec: count_statements(conn, counter))

    def _wrap(dbapi_connection: Any) -> None:
        for name in ("commit", "rollback"):
            original = getattr(dbapi_connection, name)

            def call(*args: Any, _original: Any = original) -> Any:
                counter.transaction_calls += 1
                return _original(*args)

            # sqlite3 connections are C objects; SQLite has no network anyway
            with contextlib.suppress(AttributeError, TypeError):
                setattr(dbapi_connection, name, call)

    event.listen(engine, "connect", lambda conn, _rec: _wrap(conn))
    return store


@pytest.fixture
def counted(db_url: str) -> Iterator[tuple[Any, Counter]]:
    counter = Counter()
    store = counting_store(db_url, counter)
    watch = PoolWatch(store.engine)
    store.setup()
    store.now()  # connect and let SQLAlchemy read the server's settings before counting
    counter.take()
    yield store, counter
    assert_no_leak(store, watch)


def req(key: str, lease: float = 30.0) -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=lease, ttl=60)


def test_round_trips(counted: tuple[Any, Counter], db: str, db_url: str) -> None:
    store, counter = counted
    col = COLUMN[db]
    seen: dict[str, int] = {}
    key = f"rt-{uuid.uuid4().hex}"

    res = store.claim(req(key))
    seen["claim_first"] = counter.take()
    assert res.outcome is ClaimOutcome.CLAIMED
    assert store.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
    seen["claim_conflict_in_progress"] = counter.take()
    store.renew(key, res.fence, 30)
    seen["renew"] = counter.take()
    store.complete(key, res.fence, b"done", 60)
    seen["complete"] = counter.take()
    assert store.claim(req(key)).outcome is ClaimOutcome.COMPLETED
    seen["claim_replay_completed"] = counter.take()
    other_store = counting_store(db_url, counter)
    try:
        other_store.now()
        counter.take()
        assert other_store.claim(req(key)).outcome is ClaimOutcome.COMPLETED
        seen["claim_replay_other_store"] = counter.take()
    finally:
        other_store.close()
    store.get(key)
    seen["get"] = counter.take()

    other = f"rt-{uuid.uuid4().hex}"
    held = store.claim(req(other, lease=0.05))
    store.release(other, held.fence)
    counter.take()
    store.claim(req(other, lease=0.05))
    counter.take()
    time.sleep(0.1)
    assert store.claim(req(other)).outcome is ClaimOutcome.TOOK_OVER
    seen["claim_takeover"] = counter.take()
    again = store.claim(req(f"rt-{uuid.uuid4().hex}"))
    counter.take()
    store.release(again.record.key, again.fence)
    seen["release"] = counter.take()

    batch = store.claim_many([req(f"rt-{uuid.uuid4().hex}") for _ in range(10)])
    seen["claim_many_10_new"] = counter.take()
    assert all(r.outcome is ClaimOutcome.CLAIMED for r in batch)

    expected = {name: counts[col] for name, counts in EXPECTED.items()}
    print(f"\nround trips on {db}: {seen}")
    assert seen == expected


def test_postgres_replay_writes_nothing(counted: tuple[Any, Counter], db: str) -> None:
    """A replay or a conflict leaves the row's tuple as it was: no dead tuple, no lock."""
    if db != "postgresql":
        pytest.skip("tuple versions are a PostgreSQL notion")
    store, _ = counted
    key = f"rt-{uuid.uuid4().hex}"
    probe = text(f"SELECT ctid::text, xmin::text, xmax::text FROM {store.sql.t} WHERE key = :k")

    def version() -> tuple[Any, ...]:
        with store.engine.connect() as conn:
            return tuple(conn.execute(probe, {"k": key}).one())

    res = store.claim(req(key))
    before = version()
    assert store.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
    assert version() == before
    store.complete(key, res.fence, b"x", 60)
    done = version()
    for _ in range(3):
        assert store.claim(req(key)).outcome is ClaimOutcome.COMPLETED
    assert version() == done
