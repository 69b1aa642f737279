"""The async SQLite store on a database file runs its programs with the sync store's
``sqlite3`` cursors (:mod:`idem_sql.sqlite_aio`), short ones on the loop's thread unless the
database is locked, the rest on one worker thread: the event loop never waits on a locked
database, errors are translated as elsewhere, and closing (or abandoning) the store
leaves no thread, no connection and no warning behind."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, insert, select

from idem_core.errors import StoreUnavailable
from idem_core.record import ClaimOutcome, ClaimRequest, Status
from idem_core.registry import open_async_store, open_store

WORKER_NAME = "idem-sqlite"


def req(key: str | None = None) -> ClaimRequest:
    return ClaimRequest(
        key=key or f"sa-{uuid.uuid4().hex}",
        fingerprint="fp",
        attempt=uuid.uuid4().hex,
        lease=30,
        ttl=60,
    )


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WORKER_NAME]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'async.db'}"


def test_short_calls_run_inline_and_the_rest_on_the_worker(url: str) -> None:
    """Claims, completions and reads run on the loop's thread (the database is not locked);
    a batch of claims runs on the store's worker thread."""
    seen: list[tuple[str, str]] = []

    async def main() -> None:
        store = open_async_store(url)
        assert store.threaded
        event.listen(
            store._worker.engine,
            "connect",
            lambda conn, _rec: conn.set_trace_callback(
                lambda sql: seen.append((threading.current_thread().name, sql))
            ),
        )
        await store.setup()  # on the worker, as it creates the table
        seen.clear()
        first = await store.claim(req())
        assert first.outcome is ClaimOutcome.CLAIMED
        done = await store.complete(first.record.key, first.fence, b"r", 60)
        assert (await store.get(first.record.key)) == done
        short = {name for name, sql in seen if not sql.startswith("PRAGMA")}
        assert short == {threading.current_thread().name}
        seen.clear()
        results = await store.claim_many([req() for _ in range(5)])
        assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED] * 5
        assert {name for name, _ in seen} == {WORKER_NAME}
        await store.close()

    asyncio.run(main())


def test_close_leaves_no_thread_connection_or_warning(url: str) -> None:
    async def main() -> None:
        store = open_async_store(url)
        for _ in range(2):  # closing is not final: the next call starts a worker again
            held = await store.claim(req())  # inline
            await store.release(held.record.key, held.fence)
            await store.claim_many([req(), req()])  # on the worker
            assert len(workers()) == 1
            await store.close()
            assert workers() == []
            assert store._worker.engine.pool.checkedout() == 0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert workers() == []


def test_an_abandoned_store_stops_its_worker(url: str) -> None:
    stores: list[Any] = []

    async def main() -> None:
        store = open_async_store(url)
        await store.claim(req())
        await store.claim_many([req(), req()])
        stores.append(store)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())  # the loop closes; nobody closes the store
        assert len(workers()) == 1
        stores.clear()
        gc.collect()
    assert workers() == []
    assert [str(w.message) for w in caught] == []


def _lock(path: str) -> sqlite3.Connection:
    """Another connection holding the database's write lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_a_locked_database_never_blocks_the_loop(url: str) -> None:
    async def main() -> None:
        store = open_async_store(url)
        await store.setup()
        holder = _lock(url.removeprefix("sqlite:///"))
        gaps: list[float] = []

        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        asyncio.get_running_loop().call_later(0.5, holder.commit)
        claim = asyncio.create_task(store.claim(req()))
        await asyncio.sleep(0.3)
        assert not claim.done()  # waiting for the lock, on the worker
        started = time.monotonic()
        assert await store.get(f"sa-{uuid.uuid4().hex}") is None  # a read: not locked out
        assert time.monotonic() - started < 0.2
        assert (await claim).outcome is ClaimOutcome.CLAIMED
        ticker.cancel()
        holder.close()
        await store.close()
        # The loop ran all along: ticks every 10 ms, never one 0.5 s gap.
        assert len(gaps) >= 10
        assert max(gaps) < 0.25

    asyncio.run(main())


def test_busy_timeout_is_store_unavailable_and_the_store_recovers(url: str) -> None:
    async def main() -> None:
        store = open_async_store(url + "?busy_timeout=100")
        await store.setup()
        holder = _lock(url.removeprefix("sqlite:///"))
        with pytest.raises(StoreUnavailable) as caught:
            await store.claim(req())
        assert isinstance(caught.value.__cause__, Exception)
        holder.rollback()
        holder.close()
        assert (await store.claim(req())).outcome is ClaimOutcome.CLAIMED
        await store.close()

    asyncio.run(main())


def test_a_cancelled_call_leaves_the_worker_usable(url: str) -> None:
    async def main() -> None:
        store = open_async_store(url)
        await store.setup()
        holder = _lock(url.removeprefix("sqlite:///"))
        lost = req()
        claim = asyncio.create_task(store.claim(lost))
        await asyncio.sleep(0.1)
        claim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claim
        holder.commit()
        holder.close()
        # The worker runs jobs in order: once this batch is done, so is the cancelled claim,
        # which the worker finished (a lost reply, as the model allows).
        await store.claim_many([req(), req()])
        record = await store.get(lost.key)
        assert record is not None and record.attempt == lost.attempt
        assert (await store.claim(req())).outcome is ClaimOutcome.CLAIMED
        await store.close()
        assert workers() == []

    asyncio.run(main())


def test_an_in_memory_database_keeps_aiosqlite() -> None:
    async def main() -> None:
        store = open_async_store("sqlite+aiosqlite://")
        assert not getattr(store, "threaded", False)
        assert (await store.claim(req())).outcome is ClaimOutcome.CLAIMED
        await store.close()

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_child_starts_its_own_worker(url: str) -> None:
    async def use(store: Any) -> ClaimOutcome:
        outcomes = {r.outcome for r in await store.claim_many([req(), req()])}  # the worker
        outcomes.add((await store.claim(req())).outcome)  # inline
        return outcomes.pop() if len(outcomes) == 1 else ClaimOutcome.MISMATCH

    store = open_async_store(url)
    assert asyncio.run(use(store)) is ClaimOutcome.CLAIMED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if asyncio.run(use(store)) is ClaimOutcome.CLAIMED else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert asyncio.run(use(store)) is ClaimOutcome.CLAIMED

    async def close() -> None:
        await store.close()

    asyncio.run(close())
    assert workers() == []


def test_a_program_locked_out_midway_finishes_on_the_worker(url: str) -> None:
    """A takeover of a key the store claimed before reads (inline: readers are never locked
    out in WAL mode), then writes: locked, the write and the rest go to the worker."""
    seen: list[tuple[str, str]] = []

    async def main() -> None:
        store = open_async_store(url)
        event.listen(
            store._worker.engine,
            "connect",
            lambda conn, _rec: conn.set_trace_callback(
                lambda sql: seen.append((threading.current_thread().name, sql.split()[0]))
            ),
        )
        key = f"sa-{uuid.uuid4().hex}"
        lapsing = ClaimRequest(key=key, fingerprint="fp", attempt="a1", lease=0.05, ttl=60)
        assert (await store.claim(lapsing)).outcome is ClaimOutcome.CLAIMED
        await asyncio.sleep(0.1)
        holder = _lock(url.removeprefix("sqlite:///"))
        seen.clear()
        claim = asyncio.create_task(store.claim(req(key)))
        await asyncio.sleep(0.2)
        assert not claim.done()
        holder.commit()
        holder.close()
        assert (await claim).outcome is ClaimOutcome.TOOK_OVER
        loop_thread = threading.current_thread().name
        # The inline write found the lock; the worker ran it again, and not the read.
        assert seen == [(loop_thread, "SELECT"), (loop_thread, "UPDATE"), (WORKER_NAME, "UPDATE")]
        await store.close()

    asyncio.run(main())


def test_the_worker_checkpoints_for_the_inline_connection(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from idem_sql import sqlite_aio

    monkeypatch.setattr(sqlite_aio, "_CHECKPOINT_EVERY", 5)
    checkpoints: list[str] = []
    original = sqlite_aio._Worker.checkpoint

    def counted(self: Any) -> None:
        checkpoints.append(threading.current_thread().name)
        original(self)

    monkeypatch.setattr(sqlite_aio._Worker, "checkpoint", counted)

    async def main() -> None:
        store = open_async_store(url)
        for _ in range(12):
            await store.claim(req())
        await store.claim_many([req(), req()])  # after the checkpoints, in the queue
        await store.close()

    asyncio.run(main())
    assert checkpoints == [WORKER_NAME, WORKER_NAME]


def test_setup_and_diagnostics_on_an_unopenable_file_leave_no_thread_behind() -> None:
    """Setup and diagnostics run on the store's worker like every program: through
    aiosqlite, a failed connect left aiosqlite's thread running past the store's close, and it
    later reported to the closed event loop ("Event loop is closed" in another test)."""
    before = {t.ident for t in threading.enumerate()}
    unraised: list[Any] = []
    previous = threading.excepthook
    threading.excepthook = unraised.append

    async def main() -> None:
        store = open_async_store("sqlite:////nonexistent/dir/x.db")
        for call in (store.setup, store.diagnostics):
            with pytest.raises(StoreUnavailable):
                await call()
        await store.close()

    try:
        asyncio.run(main())
        left = [t for t in threading.enumerate() if t.ident not in before]
        for t in left:
            t.join(5)
        assert [t.name for t in left if t.is_alive()] == []
        assert [t.name for t in left if "_connection_worker_thread" in t.name] == []
        assert unraised == []
    finally:
        threading.excepthook = previous


def test_with_items_as_the_async_engines_first_use(url: str) -> None:
    """The table made elsewhere (``idem setup``), the store's claims on its own worker: the
    first statement on the async engine is a completion with the caller's items. It read the
    dialect's isolation level before any connection had set it (AttributeError)."""
    sync = open_store(url)
    sync.setup()
    sync.close()
    orders = Table("orders", MetaData(), Column("id", Integer, primary_key=True))
    engine = create_engine(url)
    orders.metadata.create_all(engine)

    async def main() -> Any:
        store = open_async_store(url)
        held = await store.claim(req())
        done = await store.complete(
            held.record.key, held.fence, b"r", 60, with_items=[insert(orders).values(id=7)]
        )
        await store.close()
        return done

    done = asyncio.run(main())
    assert done.status is Status.COMPLETED
    with engine.connect() as conn:
        assert conn.execute(select(orders.c.id)).scalars().all() == [7]
    engine.dispose()
