"""memory://-specific behaviour beyond the conformance suite: waking waiters, size bounds,
named stores."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from idem_core import ClaimOutcome, ClaimRequest
from idem_core.memory import BACKEND, AsyncMemoryStore, MemoryStore

LONG = 30.0  # a waiter that is not woken would sit this long


def request(key: str) -> ClaimRequest:
    return ClaimRequest(key, "f" * 32, uuid.uuid4().hex, 60.0, 600.0)


def test_waiters_wake_when_the_record_is_completed_or_released() -> None:
    store = MemoryStore()
    for finish in ("complete", "release", "delete"):
        key = f"k-{finish}"
        fence = store.claim(request(key)).fence
        woke = threading.Event()

        def wait(key: str = key, fence: int = fence, woke: threading.Event = woke) -> None:
            store.wait_for_change(key, fence, LONG)
            woke.set()

        t = threading.Thread(target=wait)
        t.start()
        assert not woke.wait(0.05)  # still held: the waiter waits
        if finish == "complete":
            store.complete(key, fence, b"r", 60)
        elif finish == "release":
            store.release(key, fence)
        else:
            store.delete(key)
        assert woke.wait(LONG / 3), finish
        t.join()


def test_wait_returns_at_once_when_not_held_and_by_the_lease_end() -> None:
    store = MemoryStore()
    t0 = time.monotonic()
    store.wait_for_change("nothing", 1, LONG)
    lease = ClaimRequest("short", "f" * 32, "a", 0.05, 600.0)
    fence = store.claim(lease).fence
    store.wait_for_change("short", fence, LONG)  # the lapse wakes it: nobody writes
    assert time.monotonic() - t0 < LONG / 3
    assert store.claim(request("short")).outcome is ClaimOutcome.TOOK_OVER


async def test_async_twin_wakes_without_blocking_the_loop() -> None:
    astore = AsyncMemoryStore()
    res = await astore.claim(request("k"))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    tick = asyncio.ensure_future(ticker())
    waiter = asyncio.ensure_future(astore.wait_for_change("k", res.fence, LONG))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await astore.complete("k", res.fence, b"r", 60)
    await asyncio.wait_for(waiter, LONG / 3)
    tick.cancel()
    assert ticks > 5  # the loop kept running while the waiter waited


def test_size_bound_and_named_stores() -> None:
    store = MemoryStore(max_size=3)
    for i in range(10):
        fence = store.claim(request(f"k{i}")).fence
        store.complete(f"k{i}", fence, b"r", 600)
    assert len(store) == 3
    assert store.get("k9") is not None and store.get("k0") is None
    shared = f"memory://shared-{uuid.uuid4().hex}"
    assert BACKEND.open(shared) is BACKEND.open(shared)
    assert BACKEND.open("memory://") is not BACKEND.open("memory://")
    assert BACKEND.open("memory://?max_size=2")._max_size == 2


def test_size_bound_never_evicts_a_call_in_progress() -> None:
    store = BACKEND.open("memory://?max_size=2")
    held = [store.claim(request(f"busy{i}")) for i in range(3)]
    # Full of calls in progress: the bound is exceeded rather than a key freed under a
    # running call (today the oldest is dropped, and its duplicate runs beside it).
    assert len(store) == 3
    for i in range(3):
        assert store.claim(request(f"busy{i}")).outcome is ClaimOutcome.IN_PROGRESS
    # Ended calls are evicted first, oldest first; released ones count as ended.
    store.complete("busy0", held[0].fence, b"r", 600)
    store.release("busy1", held[1].fence)
    fresh = store.claim(request("fresh"))
    assert len(store) == 3
    assert store.get("busy0") is None
    assert store.get("busy1") is not None and store.get("busy2") is not None
    store.claim(request("fresh2"))
    assert store.get("busy1") is None
    assert store.claim(request("busy2")).outcome is ClaimOutcome.IN_PROGRESS
    assert store.claim(request("fresh")).outcome is ClaimOutcome.IN_PROGRESS
    store.complete("fresh", fresh.fence, b"r", 600)
    store.claim(request("fresh3"))
    assert store.get("fresh") is None  # the only ended call goes
    assert len(store) == 3


def test_size_bound_evicts_lapsed_leases_when_no_call_has_ended() -> None:
    store = MemoryStore(max_size=2)
    store.claim(ClaimRequest("lapsed", "f" * 32, "a", 0.01, 600.0))
    store.claim(request("live"))
    time.sleep(0.02)
    store.claim(request("new"))
    # The lapsed lease could be taken over by any claim: dropping it frees nothing new.
    assert store.get("lapsed") is None
    assert store.claim(request("live")).outcome is ClaimOutcome.IN_PROGRESS
    assert len(store) == 2


def test_completed_keys_do_not_pile_up_as_eviction_candidates() -> None:
    store = MemoryStore(max_size=1000)
    for i in range(5000):
        req = ClaimRequest(f"k{i}", "f" * 32, "a", 60.0, 0.000001)  # expires at once
        fence = store.claim(req).fence
        store.complete(f"k{i}", fence, b"r", 0.000001)
    assert len(store._ended) <= 2


def _claim_in_child(store: MemoryStore, q: Any) -> None:
    q.put(store.claim(request("in-child")).outcome.value)


def test_a_forked_child_is_not_stuck_on_a_lock_held_at_the_fork() -> None:
    import multiprocessing

    store = MemoryStore()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    # as if threads were inside a claim of that key, and evicting, at the moment of the fork
    with store._stripe("in-child").lock, store._evicting:
        p = ctx.Process(target=_claim_in_child, args=(store, q))
        p.start()
        outcome = q.get(timeout=10)
        p.join(10)
    assert outcome == "claimed"


# -- threads: no store-wide lock -------------------------------------------------------------


class _StallingClock:
    """The system clock, except that a call from ``stalled`` blocks until ``go`` is set: a
    thread stopped in the middle of an operation (as when the GIL is taken from it)."""

    def __init__(self) -> None:
        self.stalled: threading.Thread | None = None
        self.inside = threading.Event()
        self.go = threading.Event()

    def __call__(self) -> int:
        if threading.current_thread() is self.stalled:
            self.inside.set()
            assert self.go.wait(LONG)
        return time.time_ns() // 1000


def test_a_thread_stopped_inside_an_operation_holds_up_only_its_own_key() -> None:
    clock = _StallingClock()
    store = MemoryStore(clock=clock)
    stalled = "stalled"
    others = [
        k
        for k in (f"other{i}" for i in range(200))
        if store._stripe(k) is not store._stripe(stalled)
    ]
    t = threading.Thread(target=store.claim, args=(request(stalled),))
    clock.stalled = t
    t.start()
    assert clock.inside.wait(LONG)
    try:
        # Every operation on other keys goes on: a claim, a completion, a read.
        done = threading.Event()

        def other_calls() -> None:
            for key in others[:20]:
                fence = store.claim(request(key)).fence
                store.complete(key, fence, b"r", 60)
                assert store.get(key) is not None
            done.set()

        runner = threading.Thread(target=other_calls, daemon=True)
        runner.start()
        assert done.wait(LONG / 3), "other keys waited for the stalled thread's lock"
        # ...while the stalled key's own operations wait: each key's operations stay atomic.
        same = threading.Thread(target=store.claim, args=(request(stalled),), daemon=True)
        same.start()
        same.join(0.05)
        assert same.is_alive()
    finally:
        clock.go.set()
    t.join(LONG)
    same.join(LONG)
    assert store.claim(request(stalled)).outcome is ClaimOutcome.IN_PROGRESS


def test_many_threads_keep_the_size_bound_and_every_call_in_progress() -> None:
    store = MemoryStore(max_size=50)
    threads, per_thread = 8, 500
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def calls(t: int) -> None:
        try:
            start.wait(LONG)
            for i in range(per_thread):
                key = f"t{t}-{i}"
                res = store.claim(request(key))
                assert res.outcome is ClaimOutcome.CLAIMED
                # in progress: never evicted, whatever the other threads insert meanwhile
                assert store.get(key) is not None
                store.complete(key, res.fence, b"r", 600)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=calls, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(LONG)
    assert not errors
    # at most one extra record per call that was running when its insert found the store full
    assert 50 <= len(store) <= 50 + threads
    store.claim(request("last"))  # a write with nobody running beside it: back to the bound
    assert len(store) == 50
