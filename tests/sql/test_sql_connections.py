"""The sync store's connections: it keeps pooled DBAPI connections checked out between calls,
gives them all back on close(), runs them in autocommit even on the caller's engine (and
resets them before they go back), and a forked child never touches its parent's."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from typing import Any

from pool_watch import PoolWatch
from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import NullPool

from idem_core.record import ClaimOutcome, ClaimRequest, Status
from idem_core.registry import open_store


def req(key: str) -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=30, ttl=60)


def in_autocommit(dbapi_connection: Any) -> bool:
    flag = getattr(dbapi_connection, "autocommit", None)
    if callable(flag):  # PyMySQL: autocommit() sets, get_autocommit() reads
        return bool(dbapi_connection.get_autocommit())
    if flag is not None:  # psycopg, and sqlite3 on Python 3.12+
        return bool(flag)
    return dbapi_connection.isolation_level is None


def test_callers_engine_is_used_in_autocommit_and_left_as_it_was(
    db: str, base_url: str, db_url: str
) -> None:
    engine = create_engine(base_url)
    watch = PoolWatch(engine)
    table = db_url.split("table=", 1)[1]
    store = open_store(db_url, client=engine)
    store.setup()
    key = f"conn-{uuid.uuid4().hex}"
    try:
        res = store.claim(req(key))
        assert res.outcome is ClaimOutcome.CLAIMED
        with store.dbapi_connection() as conn:
            assert in_autocommit(conn)
        # Committed without any COMMIT from us: another connection sees it at once.
        with engine.connect() as other:
            found = other.execute(
                text(f"SELECT status FROM {table} WHERE fence = :f"), {"f": res.fence}
            )
            assert [row[0] for row in found] == [Status.IN_PROGRESS.value]
        store.complete(key, res.fence, b"r", 60)
        assert store.idle_connections <= 1, "the caller's pool is the caller's"
    finally:
        store.close()
    assert watch.out == 0
    with engine.connect() as conn:  # not disposed, and back at its own isolation level
        assert not in_autocommit(conn.connection.dbapi_connection)
        conn.execute(text("SELECT 1"))
    engine.dispose()


def test_null_pool_keeps_nothing_between_calls(base_url: str, db_url: str) -> None:
    engine = create_engine(base_url, poolclass=NullPool)
    watch = PoolWatch(engine)
    store = open_store(db_url, client=engine)
    try:
        store.setup()
        assert store.claim(req(f"conn-{uuid.uuid4().hex}")).outcome is ClaimOutcome.CLAIMED
        assert store.idle_connections == 0
        assert watch.out == 0
    finally:
        store.close()
        engine.dispose()


def test_forked_child_leaves_the_parents_connections_alone(db_url: str) -> None:
    store = open_store(db_url)
    store.setup()
    try:
        first = store.claim(req(f"fork-{uuid.uuid4().hex}"))
        assert store.idle_connections == 1
        with store.dbapi_connection() as conn:
            parents = id(conn)
        child_key = f"fork-{uuid.uuid4().hex}"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 1
            try:
                ok = store.idle_connections == 0
                with store.dbapi_connection() as conn:
                    ok = ok and id(conn) != parents
                ok = ok and store.claim(req(child_key)).outcome is ClaimOutcome.CLAIMED
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's connection survived the child: still the same one, still working.
        with store.dbapi_connection() as conn:
            assert id(conn) == parents
        assert store.claim(req(child_key)).outcome is ClaimOutcome.IN_PROGRESS
        store.complete(first.record.key, first.fence, b"x", 60)
    finally:
        store.close()


def test_threads_share_the_cache_within_the_pools_bounds(db_url: str) -> None:
    store = open_store(db_url + "&pool_size=2&max_overflow=0&pool_timeout=30")
    watch = PoolWatch(store.engine)
    store.setup()
    peak = 0
    errors: list[BaseException] = []
    run = uuid.uuid4().hex[:8]

    def worker(n: int) -> None:
        nonlocal peak
        try:
            for i in range(40):
                key = f"thr-{run}-{n}-{i}"
                res = store.claim(req(key))
                peak = max(peak, watch.out)
                store.complete(key, res.fence, b"x", 60)
                assert store.claim(req(key)).outcome is ClaimOutcome.COMPLETED
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert errors == []
        assert peak <= 2
        assert store.idle_connections <= 2
    finally:
        store.close()
    assert watch.out == 0


def test_statement_listeners_still_see_every_statement(db_url: str) -> None:
    """Tracing and counting hooks on the engine keep working: the store then runs its
    statements through SQLAlchemy's Connection, as they expect."""
    store = open_store(db_url)
    watch = PoolWatch(store.engine)
    store.setup()
    key = f"ev-{uuid.uuid4().hex}"
    res = store.claim(req(key))
    seen: list[str] = []

    def before(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        assert conn.engine is not None
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", before)
    try:
        store.complete(key, res.fence, b"x", 60)
        assert store.claim(req(key)).outcome is ClaimOutcome.COMPLETED
        assert seen, "the listener saw nothing"
        assert store.idle_connections == 0
    finally:
        event.remove(store.engine, "before_cursor_execute", before)
        store.close()
    assert watch.out == 0


def test_a_pool_of_one_serves_the_calls_that_need_a_sqlalchemy_connection(
    base_url: str,
) -> None:
    """setup (also when a first call finds no table), diagnostics and completion with the
    caller's statements check a Connection out of the pool: the cache gives its one back."""
    table = f"idem_one_{uuid.uuid4().hex[:8]}"
    url = f"{base_url}?table={table}&pool_size=1&max_overflow=0&pool_timeout=3"
    store = open_store(url)
    watch = PoolWatch(store.engine)
    try:
        key = f"one-{uuid.uuid4().hex}"
        res = store.claim(req(key))  # no table yet: created on the way
        assert res.outcome is ClaimOutcome.CLAIMED
        assert store.idle_connections == 1
        assert store.diagnostics()["table"] == table
        assert "already exists" in store.setup()
        store.claim(req(f"one-{uuid.uuid4().hex}"))
        record = store.complete(key, res.fence, b"x", 60, with_items=[text("SELECT 1")])
        assert record.status is Status.COMPLETED
        assert store.claim(req(key)).outcome is ClaimOutcome.COMPLETED
    finally:
        with contextlib.suppress(Exception), store.dbapi_connection() as conn:
            cursor = conn.cursor()
            cursor.execute(f"DROP TABLE IF EXISTS {table}")
            cursor.close()
        store.close()
    assert watch.out == 0
