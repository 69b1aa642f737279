"""idem_core.coalesce: concurrent operations share round trips (threads and asyncio).

Flushes here stand in for a store's round trip; they block on an Event when a test needs a
flush in flight, so every interleaving below is forced, not hoped for.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from idem_core.coalesce import AsyncBatcher, Batcher, _Slot
from idem_core.errors import StoreUnavailable

WAIT = 10.0  # seconds: only ever reached when a test is about to fail


def _until(check: Callable[[], bool]) -> None:
    """Poll private state that has no event to wait on (a submitter joining the queue)."""
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.0005)


# -- threads -----------------------------------------------------------------------------------


class Flush:
    """Answers op -> op * 10 (an Exception op is answered with itself); holds the calls
    listed in ``hold`` until ``release`` is set; raises ``fail[i]`` from call i."""

    def __init__(self, hold: Sequence[int] = (), fail: dict[int, BaseException] | None = None):
        self.calls: list[tuple[list[Any], int]] = []
        self.hold = set(hold)
        self.fail = fail or {}
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, ops: Sequence[Any]) -> list[Any]:
        with self._lock:
            i = len(self.calls)
            self.calls.append((list(ops), threading.get_ident()))
        if i in self.hold:
            self.entered.set()
            assert self.release.wait(WAIT)
        if i in self.fail:
            raise self.fail[i]
        return [op if isinstance(op, BaseException) else op * 10 for op in ops]

    def sizes(self) -> list[int]:
        return [len(ops) for ops, _ in self.calls]


class Submitter(threading.Thread):
    def __init__(self, batcher: Batcher[Any, Any], op: Any) -> None:
        super().__init__(daemon=True)
        self.batcher, self.op = batcher, op
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.batcher.submit(self.op)
        except BaseException as exc:
            self.error = exc

    def result(self) -> Any:
        self.join(WAIT)
        assert not self.is_alive(), "a submitter was stranded"
        if self.error is not None:
            raise self.error
        return self.value


def _hold_first(b: Batcher[Any, Any], flush: Flush, op: Any = 0) -> Submitter:
    """Start a submitter whose flush stays in flight until ``flush.release``."""
    first = Submitter(b, op)
    first.start()
    assert flush.entered.wait(WAIT)
    return first


def _queue(b: Batcher[Any, Any], ops: Sequence[Any]) -> list[Submitter]:
    """Submitters that join the queue one after another, in this order."""
    out = []
    for op in ops:
        s = Submitter(b, op)
        n = len(b._queue)
        s.start()
        _until(lambda n=n: len(b._queue) == n + 1)  # type: ignore[misc]
        out.append(s)
    return out


def test_alone_it_flushes_inline_on_the_callers_thread() -> None:
    flush = Flush()
    b: Batcher[int, int] = Batcher(flush)
    assert b.submit(1) == 10
    assert b.submit(2) == 20
    me = threading.get_ident()
    assert flush.calls == [([1], me), ([2], me)]


def test_ops_queued_behind_a_flush_go_together_in_order_each_with_its_own_answer() -> None:
    flush = Flush(hold=[0])
    b: Batcher[int, int] = Batcher(flush)
    first = _hold_first(b, flush)
    waiting = _queue(b, [1, 2, 3, 4])
    flush.release.set()
    assert first.result() == 0
    assert [s.result() for s in waiting] == [10, 20, 30, 40]
    assert [ops for ops, _ in flush.calls] == [[0], [1, 2, 3, 4]]
    # one of the waiting submitters ran it: the first in the queue
    assert flush.calls[1][1] == waiting[0].ident


def test_a_per_op_exception_reaches_only_its_op() -> None:
    flush = Flush(hold=[0])
    b: Batcher[Any, int] = Batcher(flush)
    first = _hold_first(b, flush)
    bad = KeyError("mine")
    waiting = _queue(b, [1, bad, 3])
    flush.release.set()
    first.result()
    assert waiting[0].result() == 10
    with pytest.raises(KeyError) as info:
        waiting[1].result()
    assert info.value is bad
    assert waiting[2].result() == 30
    assert flush.sizes() == [1, 3]


def test_a_flush_that_raises_fails_every_op_of_that_flush_and_strands_none() -> None:
    lost = ConnectionError("connection lost")
    flush = Flush(hold=[0], fail={1: lost})
    b: Batcher[int, int] = Batcher(flush, max_batch=2)
    first = _hold_first(b, flush)
    waiting = _queue(b, [1, 2, 3])
    flush.release.set()
    assert first.result() == 0
    for s in waiting[:2]:
        with pytest.raises(ConnectionError) as info:
            s.result()
        assert info.value is lost
    assert waiting[2].result() == 30  # queued behind the failed flush: still sent
    assert flush.sizes() == [1, 2, 1]


def test_an_inline_flush_that_raises_raises_to_its_caller_and_the_queue_still_goes() -> None:
    flush = Flush(hold=[0], fail={0: TimeoutError("slow")})
    b: Batcher[int, int] = Batcher(flush)
    first = _hold_first(b, flush)
    waiting = _queue(b, [1, 2])
    flush.release.set()
    with pytest.raises(TimeoutError):
        first.result()
    assert [s.result() for s in waiting] == [10, 20]


def test_max_batch_bounds_each_flush() -> None:
    flush = Flush(hold=[0])
    b: Batcher[int, int] = Batcher(flush, max_batch=3)
    first = _hold_first(b, flush)
    waiting = _queue(b, range(1, 8))
    flush.release.set()
    first.result()
    assert [s.result() for s in waiting] == [i * 10 for i in range(1, 8)]
    assert flush.sizes() == [1, 3, 3, 1]
    assert [ops for ops, _ in flush.calls][1:] == [[1, 2, 3], [4, 5, 6], [7]]


def test_flights_allow_that_many_flushes_at_once() -> None:
    release = threading.Event()
    both = threading.Barrier(2, timeout=WAIT)
    calls: list[list[int]] = []

    def flush(ops: Sequence[int]) -> list[int]:
        calls.append(list(ops))
        if len(calls) <= 2:
            both.wait()  # both flushes are in flight at the same time, or this times out
            assert release.wait(WAIT)
        return [op * 10 for op in ops]

    b: Batcher[int, int] = Batcher(flush, flights=2)
    a, c = Submitter(b, 1), Submitter(b, 2)
    a.start()
    c.start()
    _until(lambda: len(calls) == 2)
    waiting = _queue(b, [3, 4])  # no flight free: they queue
    release.set()
    assert [a.result(), c.result()] == [10, 20]
    assert [s.result() for s in waiting] == [30, 40]
    assert sorted(map(sorted, calls[:2])) == [[1], [2]]
    assert calls[2:] == [[3, 4]]  # the first flight to end took the whole queue


def test_a_wrong_number_of_outcomes_fails_every_op_rather_than_mismatching() -> None:
    calls: list[list[int]] = []
    gate = threading.Event()

    def flush(ops: Sequence[int]) -> list[int]:
        calls.append(list(ops))
        if len(calls) == 1:
            assert gate.wait(WAIT)
        return [1]

    b: Batcher[int, int] = Batcher(flush)
    first = Submitter(b, 0)
    first.start()
    _until(lambda: len(calls) == 1)
    waiting = _queue(b, [1, 2])
    gate.set()
    assert first.result() == 1
    for s in waiting:
        with pytest.raises(RuntimeError, match="2 operations"):
            s.result()


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_a_submitter_interrupted_while_queued_leaves_the_queue() -> None:
    flush = Flush(hold=[0])
    b: Batcher[int, int] = Batcher(flush)
    first = _hold_first(b, flush)
    main = threading.get_ident()
    seen: list[BaseException] = []

    def interrupt() -> None:
        _until(lambda: len(b._queue) == 1)
        signal.pthread_kill(main, signal.SIGINT)

    killer = threading.Thread(target=interrupt)
    killer.start()
    try:
        b.submit(99)
    except KeyboardInterrupt as exc:
        seen.append(exc)
    killer.join(WAIT)
    assert seen and len(b._queue) == 0
    later = _queue(b, [5])
    flush.release.set()
    first.result()
    assert later[0].result() == 50
    assert [ops for ops, _ in flush.calls] == [[0], [5]]  # 99 was never sent


def test_a_leader_that_leaves_before_starting_hands_its_flush_on() -> None:
    flush = Flush()
    b: Batcher[int, int] = Batcher(flush)
    # A flush in flight and a submitter (no thread: it is about to be interrupted) queued
    # first, a real one behind it.
    b._in_flight = 1
    ghost: _Slot[int, int] = _Slot(99)
    b._queue.append(ghost)
    behind = _queue(b, [2])[0]
    # The flush ends and hands the next one to the ghost, which is interrupted before it
    # starts it: the rest of its batch still goes, led by the next submitter.
    with b._lock:
        b._in_flight -= 1
        batch = b._take()
        assert batch is not None
        b._lead_with(batch)
    b._abandon(ghost)
    assert behind.result() == 20
    assert [ops for ops, _ in flush.calls] == [[2]]  # 99 was never sent
    assert b._in_flight == 0 and not b._queue


def _fork_child_submits(b: Batcher[int, int], q: Any) -> None:
    q.put(b.submit(7))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_forgets_the_parents_flights_and_queue() -> None:
    flush = Flush(hold=[0])
    b: Batcher[int, int] = Batcher(flush)
    first = _hold_first(b, flush)
    waiting = _queue(b, [1])
    b._lock.acquire()  # as if a thread were inside submit at the moment of the fork
    try:
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_fork_child_submits, args=(b, q))
        p.start()
        # the parent's flush is still in flight and its op still queued: without the reset,
        # the child would queue behind a flush that never ends there
        assert q.get(timeout=WAIT) == 70
        p.join(WAIT)
        assert p.exitcode == 0
    finally:
        b._lock.release()
    flush.release.set()
    assert first.result() == 0
    assert waiting[0].result() == 10


# -- asyncio -----------------------------------------------------------------------------------


class AFlush:
    """The async twin of :class:`Flush`: also records the task each flush runs in."""

    def __init__(self, hold: Sequence[int] = (), fail: dict[int, BaseException] | None = None):
        self.calls: list[tuple[list[Any], asyncio.Task[Any] | None]] = []
        self.hold = set(hold)
        self.fail = fail or {}
        self.entered: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.release: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)

    async def __call__(self, ops: Sequence[Any]) -> list[Any]:
        i = len(self.calls)
        self.calls.append((list(ops), asyncio.current_task()))
        if i in self.hold:
            self.entered[i].set()
            await self.release[i].wait()
        if i in self.fail:
            raise self.fail[i]
        return [op if isinstance(op, BaseException) else op * 10 for op in ops]

    def ops(self) -> list[list[Any]]:
        return [ops for ops, _ in self.calls]


async def _ahold_first(a: AsyncBatcher[Any, Any], flush: AFlush) -> asyncio.Task[Any]:
    first = asyncio.create_task(a.submit(0))
    await flush.entered[0].wait()
    return first


async def _aqueue(a: AsyncBatcher[Any, Any], ops: Sequence[Any]) -> list[asyncio.Task[Any]]:
    tasks = []
    for op in ops:
        tasks.append(asyncio.create_task(a.submit(op)))
        await asyncio.sleep(0)  # let it reach the queue: queue order is creation order
    assert len(a._queue) == len(ops)
    return tasks


async def test_async_alone_it_flushes_inline_in_the_callers_task() -> None:
    flush = AFlush()
    a: AsyncBatcher[int, int] = AsyncBatcher(flush)
    before = asyncio.all_tasks()
    assert await a.submit(1) == 10
    assert await a.submit(2) == 20
    me = asyncio.current_task()
    assert flush.calls == [([1], me), ([2], me)]
    assert asyncio.all_tasks() == before  # no task was created


async def test_async_queued_ops_go_together_in_order_each_with_its_own_answer() -> None:
    flush = AFlush(hold=[0])
    a: AsyncBatcher[int, int] = AsyncBatcher(flush)
    first = await _ahold_first(a, flush)
    waiting = await _aqueue(a, [1, 2, 3])
    flush.release[0].set()
    assert await first == 0
    assert await asyncio.gather(*waiting) == [10, 20, 30]
    assert flush.ops() == [[0], [1, 2, 3]]
    assert flush.calls[1][1] not in (first, *waiting)  # sent by a task of its own


async def test_async_a_per_op_exception_reaches_only_its_op() -> None:
    flush = AFlush(hold=[0])
    a: AsyncBatcher[Any, int] = AsyncBatcher(flush)
    first = await _ahold_first(a, flush)
    bad = KeyError("mine")
    waiting = await _aqueue(a, [1, bad, 3])
    flush.release[0].set()
    await first
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert results == [10, bad, 30]
    assert results[1] is bad


async def test_async_a_flush_that_raises_fails_every_op_of_it_and_strands_none() -> None:
    lost = ConnectionError("connection lost")
    flush = AFlush(hold=[0], fail={1: lost})
    a: AsyncBatcher[int, int] = AsyncBatcher(flush, max_batch=2)
    first = await _ahold_first(a, flush)
    waiting = await _aqueue(a, [1, 2, 3])
    flush.release[0].set()
    assert await first == 0
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert results[0] is lost and results[1] is lost
    assert results[2] == 30
    assert flush.ops() == [[0], [1, 2], [3]]


async def test_async_max_batch_bounds_each_flush() -> None:
    flush = AFlush(hold=[0])
    a: AsyncBatcher[int, int] = AsyncBatcher(flush, max_batch=3)
    first = await _ahold_first(a, flush)
    waiting = await _aqueue(a, range(1, 8))
    flush.release[0].set()
    await first
    assert await asyncio.gather(*waiting) == [i * 10 for i in range(1, 8)]
    assert flush.ops() == [[0], [1, 2, 3], [4, 5, 6], [7]]


async def test_async_flights_allow_that_many_flushes_at_once() -> None:
    flush = AFlush(hold=[0, 1])
    a: AsyncBatcher[int, int] = AsyncBatcher(flush, flights=2)
    one = asyncio.create_task(a.submit(1))
    two = asyncio.create_task(a.submit(2))
    await asyncio.sleep(0)
    assert flush.ops() == [[1], [2]]  # both in flight, each inline in its own task
    assert [task for _, task in flush.calls] == [one, two]
    waiting = await _aqueue(a, [3, 4])
    flush.release[0].set()
    assert await one == 10
    # the flight that ended took the whole queue, while the other is still in flight
    assert await asyncio.gather(*waiting) == [30, 40]
    assert flush.ops()[2:] == [[3, 4]]
    assert not two.done()
    flush.release[1].set()
    assert await two == 20


async def test_async_a_cancelled_queued_submitter_is_not_sent_and_cancels_nobody() -> None:
    flush = AFlush(hold=[0])
    a: AsyncBatcher[int, int] = AsyncBatcher(flush)
    first = await _ahold_first(a, flush)
    waiting = await _aqueue(a, [1, 2, 3])
    waiting[1].cancel()
    await asyncio.sleep(0)
    flush.release[0].set()
    assert await first == 0
    assert await waiting[0] == 10
    assert await waiting[2] == 30
    assert waiting[1].cancelled()
    assert flush.ops() == [[0], [1, 3]]


async def test_async_a_submitter_cancelled_after_its_op_was_sent_cancels_nobody() -> None:
    flush = AFlush(hold=[0, 1])
    a: AsyncBatcher[int, int] = AsyncBatcher(flush)
    first = await _ahold_first(a, flush)
    waiting = await _aqueue(a, [1, 2])
    flush.release[0].set()
    assert await first == 0
    await flush.entered[1].wait()  # the second flush, carrying 1 and 2, is in flight
    waiting[0].cancel()
    flush.release[1].set()
    assert await waiting[1] == 20
    assert waiting[0].cancelled()
    assert flush.ops() == [[0], [1, 2]]


async def test_async_cancelling_the_inline_submitter_strands_no_queued_op() -> None:
    flush = AFlush(hold=[0])
    a: AsyncBatcher[int, int] = AsyncBatcher(flush)
    first = await _ahold_first(a, flush)
    waiting = await _aqueue(a, [1, 2])
    first.cancel()  # cancels its own flush, which carried only its own op
    flush.release[0].set()
    assert await asyncio.gather(*waiting) == [10, 20]
    assert first.cancelled()
    assert flush.ops() == [[0], [1, 2]]


async def test_async_a_cancelled_flush_task_fails_its_ops_as_lost_replies_strands_none() -> None:
    flush = AFlush(hold=[0, 1])
    a: AsyncBatcher[int, int] = AsyncBatcher(flush, max_batch=2)
    first = await _ahold_first(a, flush)
    waiting = await _aqueue(a, [1, 2, 3])
    flush.release[0].set()
    assert await first == 0
    await flush.entered[1].wait()  # the flush task carrying 1 and 2 is in flight
    (task,) = a._tasks
    task.cancel()  # e.g. the loop shutting down
    results = await asyncio.gather(*waiting[:2], return_exceptions=True)
    for r in results:
        assert isinstance(r, StoreUnavailable)
        assert isinstance(r.__cause__, asyncio.CancelledError)
    assert await waiting[2] == 30
    assert flush.ops() == [[0], [1, 2], [3]]


def _fork_child_async(a: AsyncBatcher[int, int], q: Any) -> None:
    q.put(asyncio.run(a.submit(7)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
async def test_async_a_forked_child_forgets_the_parents_flights_and_queue() -> None:
    flush = AFlush(hold=[0])
    a: AsyncBatcher[int, int] = AsyncBatcher(flush)
    first = await _ahold_first(a, flush)
    waiting = await _aqueue(a, [1])

    def fork_and_wait() -> Any:
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_fork_child_async, args=(a, q))
        p.start()
        try:
            return q.get(timeout=WAIT)
        finally:
            p.join(WAIT)

    # forked from this loop's thread while a flush is in flight and an op is queued
    assert fork_and_wait() == 70
    flush.release[0].set()
    assert await first == 0
    assert await waiting[0] == 10


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(Flush(), max_batch=0)
    with pytest.raises(ValueError, match="at least 1"):
        AsyncBatcher(AFlush(), flights=0)


# -- many submitters at once -------------------------------------------------------------------


class Decider:
    """A flush over ``(who, i)`` ops that records what it answered each op: a ValueError for
    every 17th op, a whole-flush ConnectionError when the flush carries a 53rd op."""

    def __init__(self) -> None:
        self.answered: dict[Any, Any] = {}
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def decide(self, ops: Sequence[tuple[int, int]]) -> list[Any] | BaseException:
        with self._lock:
            self.sizes.append(len(ops))
            assert not any(op in self.answered for op in ops), "an op was sent twice"
            if any(i % 53 == 52 for _, i in ops):
                exc = ConnectionError(f"flush of {len(ops)} lost")
                self.answered.update((op, exc) for op in ops)
                return exc
            out = [ValueError(op) if op[1] % 17 == 16 else op for op in ops]
            self.answered.update(zip(ops, out, strict=True))
            return out


def test_many_threads_each_get_exactly_their_own_outcome() -> None:
    decider = Decider()

    def flush(ops: Sequence[tuple[int, int]]) -> list[Any]:
        time.sleep(0.0002)  # a round trip: other threads queue meanwhile
        out = decider.decide(ops)
        if isinstance(out, BaseException):
            raise out
        return out

    b: Batcher[tuple[int, int], tuple[int, int]] = Batcher(flush, max_batch=8)
    got: dict[Any, Any] = {}
    start = threading.Barrier(16)

    def submitter(who: int) -> None:
        start.wait(WAIT)
        for i in range(150):
            try:
                got[(who, i)] = b.submit((who, i))
            except (ValueError, ConnectionError) as exc:
                got[(who, i)] = exc

    threads = [threading.Thread(target=submitter, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
        assert not t.is_alive(), "a submitter was stranded"
    assert len(got) == 16 * 150
    for op, outcome in got.items():
        assert outcome is decider.answered[op]  # its own answer, from the flush that sent it
    assert max(decider.sizes) > 1  # they did share round trips
    assert max(decider.sizes) <= 8
    assert b._in_flight == 0 and not b._queue


async def test_many_tasks_each_get_their_own_outcome_and_cancellation_is_theirs_alone() -> None:
    decider = Decider()

    async def flush(ops: Sequence[tuple[int, int]]) -> list[Any]:
        await asyncio.sleep(0)  # a round trip: other tasks queue meanwhile
        await asyncio.sleep(0)
        out = decider.decide(ops)
        if isinstance(out, BaseException):
            raise out
        return out

    a: AsyncBatcher[tuple[int, int], tuple[int, int]] = AsyncBatcher(flush, max_batch=8)
    got: dict[Any, Any] = {}

    async def one(op: tuple[int, int]) -> None:
        try:
            got[op] = await a.submit(op)
        except (ValueError, ConnectionError) as exc:
            got[op] = exc

    tasks = {(w, i): asyncio.create_task(one((w, i))) for w in range(16) for i in range(60)}
    cancelled = set()
    for n, (op, task) in enumerate(tasks.items()):
        if n % 7 == 3:
            await asyncio.sleep(0)
            task.cancel()
            cancelled.add(op)
    await asyncio.wait(tasks.values(), timeout=WAIT)
    assert all(t.done() for t in tasks.values()), "a submitter was stranded"
    for op, task in tasks.items():
        if task.cancelled():
            assert op in cancelled
            continue
        assert got[op] is decider.answered[op]
    assert set(got) | cancelled == set(tasks)
    # a cancelled op was sent at most once, and only if it had been sent before its cancel
    assert set(decider.answered) >= set(got)
    assert max(decider.sizes) > 1
    assert a._in_flight == 0 and not a._queue and not a._tasks
