"""Store lifetimes: given vs opened stores, one async store per event loop, fork, close.

``tracked://`` (``tests/tracked_backend.py``) keeps its records in one memory store but
behaves like a networked backend, and records every open and close with its event loop.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from tracked_backend import Tracked, install

from idem_core import AlreadyInProgress, ConfigurationError, EventKind, Idempotency
from idem_core.memory import AsyncMemoryStore, MemoryStore
from idem_core.registry import register
from idem_core.testing import assert_idempotent


@pytest.fixture
def tracked() -> Tracked:
    return install()


def _counting(idem: Idempotency, scope: str = "handler") -> tuple[list[str], Any]:
    runs: list[str] = []

    @idem.idempotent(key="k", scope=scope)
    async def handler(k: str) -> str:
        runs.append(k)
        await asyncio.sleep(0)
        return f"done {k}"

    return runs, handler


# -- one async store per event loop ----------------------------------------------------------


def test_each_event_loop_gets_a_store_of_its_own(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace="loops")
    runs, handler = _counting(idem)

    assert asyncio.run(handler("a")) == "done a"
    assert asyncio.run(handler("a")) == "done a"  # today: "Event loop is closed" on Redis...
    assert runs == ["a"]
    assert len(tracked.opened) == 2
    assert tracked.opened[0].loop is not tracked.opened[1].loop

    async def same_loop() -> None:
        for k in ("b", "c", "b"):
            await handler(k)
        assert idem.astore is idem.astore

    asyncio.run(same_loop())
    assert len(tracked.opened) == 3
    # The stores of closed loops are dropped, unclosed (nothing can await their close).
    assert len(idem._stores._loops) == 1
    assert tracked.closed == []


# A module-level object, as in every doc example, used by tests that each get their own
# pytest-asyncio event loop.
_MODULE_BACKEND = install()
MODULE_IDEM = Idempotency.from_url("tracked://", namespace="module")


@pytest.mark.parametrize("test_case", [1, 2, 3])
async def test_a_module_level_object_serves_each_tests_event_loop(test_case: int) -> None:
    register("tracked", _MODULE_BACKEND)  # other tests install their own
    store = MODULE_IDEM.astore
    assert store.loop is asyncio.get_running_loop()  # type: ignore[attr-defined]
    async with MODULE_IDEM.aclaim(f"case-{test_case}") as call:
        await call.complete(test_case)
    async with MODULE_IDEM.aclaim(f"case-{test_case}") as call:
        assert call.replayed and call.result == test_case


def test_threads_with_loops_of_their_own_share_the_records(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace="threads")
    runs, handler = _counting(idem)
    barrier = threading.Barrier(4)
    results: dict[int, list[str]] = {}

    def thread(i: int) -> None:
        async def main() -> list[str]:
            barrier.wait(10)  # every loop runs at once
            out = [await handler(f"t{i}")]
            for _ in range(20):
                try:
                    out.append(await handler("shared"))
                except AlreadyInProgress:
                    out.append("busy")
            return out

        results[i] = asyncio.run(main())

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i in range(4):
        assert results[i][0] == f"done t{i}"
        assert set(results[i][1:]) <= {"done shared", "busy"}
    assert sorted(runs) == ["shared", "t0", "t1", "t2", "t3"]
    assert len({id(s.loop) for s in tracked.opened}) == len(tracked.opened) == 4


def test_aclose_closes_the_running_loops_store_only(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace="aclose")
    runs, handler = _counting(idem)
    asyncio.run(handler("a"))  # loop 1: its store is abandoned when the loop closes
    other_loop_ready, finish = threading.Event(), threading.Event()

    def other() -> None:
        async def main() -> None:
            await handler("b")
            other_loop_ready.set()
            await asyncio.to_thread(finish.wait, 10)  # this loop stays open meanwhile
            assert await handler("b") == "done b"  # still open: only its own loop closes it

        asyncio.run(main())

    t = threading.Thread(target=other)
    t.start()
    other_loop_ready.wait(10)

    async def close_here() -> None:
        await handler("c")
        await idem.aclose()

    asyncio.run(close_here())
    finish.set()
    t.join(10)
    assert [s.loop for s in tracked.closed] == [tracked.opened[2].loop]
    assert not tracked.opened[1].closed
    assert runs == ["a", "b", "c"]


def test_closed_is_not_finished_and_async_with_closes(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace="reopen")
    runs, handler = _counting(idem)

    async def main() -> None:
        async with idem:
            assert await handler("a") == "done a"
        assert len(tracked.closed) == 1
        # The next call opens a new store on this loop: the object stays usable.
        assert await handler("a") == "done a"
        assert len(tracked.opened) == 2
        await idem.aclose()

    asyncio.run(main())
    assert runs == ["a"]
    assert len(tracked.closed) == 2

    @idem.idempotent(key="k")
    def sync(k: str) -> str:
        runs.append(k)
        return k

    with idem:
        sync("x")
    assert tracked.closed_sync == tracked.opened_sync[:1]
    sync("y")  # reopened
    assert len(tracked.opened_sync) == 2
    idem.close()


def test_given_stores_are_used_as_they_are_and_never_closed() -> None:
    records = MemoryStore()

    class Counting(AsyncMemoryStore):
        closes = 0

        async def close(self) -> None:
            Counting.closes += 1

    given = Counting(records)
    idem = Idempotency(astore=given, namespace="given")
    runs, handler = _counting(idem)

    async def main() -> None:
        assert idem.astore is given
        await handler("a")
        await idem.aclose()

    asyncio.run(main())
    asyncio.run(main())
    assert runs == ["a"]
    assert Counting.closes == 0
    # Outside any loop a given store is still the given store.
    assert idem.astore is given
    with pytest.raises(ConfigurationError, match="only an async store"):
        idem.store  # noqa: B018


def test_an_opened_async_store_needs_a_running_loop(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace="noloop")
    with pytest.raises(ConfigurationError, match="event loop"):
        idem.astore  # noqa: B018


# -- memory:// -------------------------------------------------------------------------------


def test_memory_records_are_shared_by_every_loop_and_thread() -> None:
    idem = Idempotency.from_url("memory://", namespace="mem")
    runs, handler = _counting(idem)

    @idem.idempotent(key="k", scope="handler")
    def sync(k: str) -> str:
        runs.append(f"sync {k}")
        return f"done {k}"

    assert asyncio.run(handler("a")) == "done a"
    assert asyncio.run(handler("a")) == "done a"
    t = threading.Thread(target=lambda: asyncio.run(handler("a")))
    t.start()
    t.join(10)
    assert sync("a") == "done a"
    assert runs == ["a"]


def test_close_never_loses_memory_records() -> None:
    idem = Idempotency.from_url("memory://", namespace="mem")
    runs, handler = _counting(idem)

    @idem.idempotent(key="k")
    def sync(k: str) -> str:
        runs.append(k)
        return k

    sync("a")
    idem.close()  # today: every record is thrown away, and the next call runs again
    sync("a")

    async def main() -> None:
        await handler("b")
        await idem.aclose()
        await handler("b")

    asyncio.run(main())
    idem.close()
    asyncio.run(handler("b"))
    assert runs == ["a", "b"]


# -- fork ------------------------------------------------------------------------------------


def _child(idem: Idempotency, q: Any) -> None:
    store = idem.store
    q.put((type(store).__name__, store.closed, len(store.backend.opened_sync), store.get("x")))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_drops_the_parents_stores_unclosed(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace="fork")
    parent = idem.store
    lock = idem._stores._lock
    lock.acquire()  # as if another thread were opening a store at the moment of the fork
    try:
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(idem, q))
        p.start()
        name, closed, opened, _ = q.get(timeout=10)
        p.join(10)
    finally:
        lock.release()
    assert name == "SyncTracked" and not closed
    assert opened == 2  # the child opened its own (the parent's one, inherited, plus it)
    assert tracked.closed_sync == []  # nobody closed the parent's store
    assert idem.store is parent


# -- the local cache -------------------------------------------------------------------------


def test_local_cache_hits_are_replays() -> None:
    events: list[Any] = []
    idem = Idempotency.from_url("memory://", local_cache=16, on_event=events.append)

    @idem.idempotent(key="k")
    def fn(k: str) -> str:
        return k.upper()

    @idem.idempotent(key="k")
    async def afn(k: str) -> str:
        return k.lower()

    for _ in range(3):
        fn("a")
    for _ in range(3):
        asyncio.run(afn("B"))
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.CLAIMED) == 2
    assert kinds.count(EventKind.REPLAYED) == 4  # today: 0, every hit was silent


def test_assert_idempotent_with_a_local_cache() -> None:
    idem = Idempotency.from_url("memory://", local_cache=64, namespace=uuid.uuid4().hex[:8])
    applied: list[str] = []

    @idem.consumer(dedup_id=lambda m: m["id"])
    def handle(message: dict[str, str]) -> str:
        applied.append(message["id"])
        return message["id"]

    report = assert_idempotent(handle, {"id": "m1"})
    assert report.result == "m1"
    assert applied == ["m1", "m1"]  # once for the pair of calls, once for the concurrent ones


# -- no noise on exit ------------------------------------------------------------------------

_SCRIPT = """
import asyncio, threading, sys
from idem_core import Idempotency

idem = Idempotency.from_url(sys.argv[1], namespace="exit")

@idem.idempotent(key="k")
async def handler(k: str) -> str:
    await asyncio.sleep(0)
    return k

for i in range(3):  # one asyncio.run() per Lambda invocation
    assert asyncio.run(handler("a")) == "a"
threads = [threading.Thread(target=asyncio.run, args=(handler(f"t{i}"),)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("ok")
"""


@pytest.mark.parametrize(
    "kind",
    [
        "memory",
        "sqlite",
    ],
)
def test_many_event_loops_then_exit_print_nothing(kind: str, tmp_path: Path) -> None:
    url = "memory://" if kind == "memory" else f"sqlite+aiosqlite:///{tmp_path}/idem.db"
    if kind == "sqlite":
        # The async store creates its table on first use; make it first, from a sync store.
        Idempotency.from_url(url.replace("+aiosqlite", "")).store.close()
    script = tmp_path / "loops.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    proc = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", str(script), url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    gc.collect()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""
