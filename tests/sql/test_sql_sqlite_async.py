"""The async SQLite store on a database file runs its programs on one worker thread with the
sync store's ``sqlite3`` cursors (:mod:`idem_sql.sqlite_aio`): the event loop never waits on
a locked database, errors are translated as elsewhere, and closing (or abandoning) the store
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
from sqlalchemy import event

from idem_core.errors import StoreUnavailable
from idem_core.record import ClaimOutcome, ClaimRequest
from idem_core.registry import open_async_store

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


def test_programs_run_on_the_stores_worker_thread(url: str) -> None:
    threads: list[str] = []

    async def main() -> None:
        store = open_async_store(url)
        assert store.threaded
        event.listen(
            store._worker.engine,
            "connect",
            lambda conn, _rec: conn.set_trace_callback(
                lambda _sql: threads.append(threading.current_thread().name)
            ),
        )
        await store.setup()
        first = await store.claim(req())
        assert first.outcome is ClaimOutcome.CLAIMED
        done = await store.complete(first.record.key, first.fence, b"r", 60)
        assert (await store.get(first.record.key)) == done
        results = await store.claim_many([req() for _ in range(5)])
        assert [r.outcome for r in results] == [ClaimOutcome.CLAIMED] * 5
        await store.close()

    asyncio.run(main())
    assert len(threads) >= 4
    assert set(threads) == {WORKER_NAME}


def test_close_leaves_no_thread_connection_or_warning(url: str) -> None:
    async def main() -> None:
        store = open_async_store(url)
        for _ in range(2):  # closing is not final: the next call starts a worker again
            held = await store.claim(req())
            await store.release(held.record.key, held.fence)
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
        key = f"sa-{uuid.uuid4().hex}"
        claim = asyncio.create_task(store.claim(req(key)))
        await asyncio.sleep(0.1)
        claim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claim
        holder.commit()
        holder.close()
        # The worker finished the cancelled claim (a lost reply, as the model allows).
        again = await store.claim(req(key))
        assert again.outcome is ClaimOutcome.IN_PROGRESS
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
        return (await store.claim(req())).outcome

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
