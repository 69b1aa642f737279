"""Idempotency(local_cache=N): the per-process LRU of completed records, under threads."""

from __future__ import annotations

import threading
import time

from idem_core.local_cache import LocalCache
from idem_core.record import MICROS, Record, Status

LONG = 30.0


def completed(key: str, fp: str = "f" * 32) -> Record:
    now = int(time.time() * MICROS)
    return Record(key, Status.COMPLETED, fp, 1, 0, now + 600 * MICROS, "a", now, now, b"r")


class _StallingKey(str):
    """A key whose hashing blocks until ``go`` is set: a thread stopped in the middle of a
    cache operation (as when the GIL is taken from it)."""

    inside = threading.Event()
    go = threading.Event()

    def __hash__(self) -> int:
        self.inside.set()
        assert self.go.wait(LONG)
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)


def test_a_thread_stopped_inside_the_cache_holds_up_no_other_thread() -> None:
    cache = LocalCache(100)
    for i in range(10):
        cache.put(f"k{i}", completed(f"k{i}"))
    stalled = threading.Thread(
        target=cache.put, args=(_StallingKey("slow"), completed("slow")), daemon=True
    )
    stalled.start()
    assert _StallingKey.inside.wait(LONG)
    try:
        done = threading.Event()

        def others() -> None:
            for i in range(10):
                assert cache.get(f"k{i}", "f" * 32) is not None
            cache.put("k10", completed("k10"))
            cache.discard("k0")
            done.set()

        threading.Thread(target=others, daemon=True).start()
        assert done.wait(LONG / 3), "replays waited for another thread inside the cache"
    finally:
        _StallingKey.go.set()
    stalled.join(LONG)
    assert cache.get("slow", "f" * 32) is not None
    assert cache.get("k0", "f" * 32) is None


def test_many_threads_keep_the_bound_and_the_lru_order() -> None:
    cache = LocalCache(64)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def churn(t: int) -> None:
        try:
            start.wait(LONG)
            for i in range(3000):
                key = f"k{(t * 7 + i) % 200}"
                if i % 3 == 0:
                    cache.put(key, completed(key))
                elif i % 3 == 1:
                    rec = cache.get(key, "f" * 32)
                    assert rec is None or rec.key == key
                else:
                    cache.discard(f"k{(t + i) % 200}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LONG)
    assert not errors
    assert len(cache._items) <= 64
    # a lone thread still sees a plain LRU: the least recently used goes first
    cache = LocalCache(2)
    cache.put("a", completed("a"))
    cache.put("b", completed("b"))
    assert cache.get("a", "f" * 32) is not None
    cache.put("c", completed("c"))
    assert cache.get("b", "f" * 32) is None
    assert cache.get("a", "f" * 32) is not None and cache.get("c", "f" * 32) is not None
