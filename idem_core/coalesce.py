"""Coalescing: concurrent operations of one process share round trips.

A store hands :class:`Batcher` (threads) or :class:`AsyncBatcher` (one event loop) a ``flush``
function that runs N operations in ONE round trip and returns one outcome per operation, in
order: the value, or the exception that operation raised. If ``flush`` itself raises, every
operation of that flush raises that exception.

* An operation that finds fewer than ``flights`` flushes in flight and nothing queued is
  flushed at once, inline, alone: at concurrency 1 latency is what it was (no task, no thread
  hop).
* Otherwise it queues; when a flush ends, everything queued (up to ``max_batch``) goes in the
  next flush, started at once (threads: one of the waiting submitters runs it; asyncio: a task).
* A cancelled async submitter never cancels anyone else's operation; an operation already sent
  may still take effect, which the store treats as a lost reply.
* A flush is bounded by the store's own timeouts: nothing here waits with a timeout of its own.

The twins share their decisions (:class:`_Plan`: run inline or queue, what the next flush
takes, how outcomes are read); each only blocks or awaits in its own way.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeAlias, TypeVar, cast

from . import _process
from .errors import StoreUnavailable

Op = TypeVar("Op")
R = TypeVar("R")
Item = TypeVar("Item")

#: runs its ops in one round trip; answers each, in order, with its value or its exception
Flush: TypeAlias = Callable[[Sequence[Op]], Sequence[R | BaseException]]
AsyncFlush: TypeAlias = Callable[[Sequence[Op]], Awaitable[Sequence[R | BaseException]]]

__all__ = ["AsyncBatcher", "Batcher"]


def _outcomes(results: Sequence[R | BaseException], n: int) -> Sequence[R | BaseException]:
    if len(results) != n:
        # A store bug, not a store outage: every op learns of it, none gets another's answer.
        raise RuntimeError(f"a coalesced flush returned {len(results)} outcomes for {n} operations")
    return results


def _failed(exc: BaseException, n: int) -> list[BaseException]:
    """Every op of a flush that raised ``exc``. A flush interrupted by KeyboardInterrupt,
    SystemExit or cancellation may have reached the store: the other ops see a lost reply
    (StoreUnavailable), which the store's callers already know how to handle, rather than an
    interruption that was not theirs."""
    if isinstance(exc, Exception):
        return [exc] * n
    lost = StoreUnavailable("the round trip carrying this operation was interrupted")
    lost.__cause__ = exc
    return [lost] * n


def _value(outcome: R | BaseException) -> R:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


class _Plan(Generic[Item]):
    """The decisions both twins share; the caller holds whatever guards the state."""

    def __init__(self, max_batch: int, flights: int) -> None:
        if max_batch < 1 or flights < 1:
            raise ValueError("max_batch and flights must be at least 1")
        self.max_batch = max_batch
        self.flights = flights
        self._forget()
        _process.reset_in_child(self)

    def _forget(self) -> None:
        self._queue: deque[Item] = deque()
        self._in_flight = 0

    def _starts_inline(self) -> bool:
        """Claim a flight for the caller's op alone if one is free and nobody is waiting."""
        if self._in_flight < self.flights and not self._queue:
            self._in_flight += 1
            return True
        return False

    def _take(self) -> list[Item] | None:
        """The next flush's items, with its flight claimed, if a flight is free."""
        batch: list[Item] = []
        queue = self._queue
        while queue and self._in_flight < self.flights:
            while queue and len(batch) < self.max_batch:
                item = queue.popleft()
                if not self._gone(item):
                    batch.append(item)
            if batch:
                self._in_flight += 1
                return batch
        return None

    def _gone(self, item: Item) -> bool:
        """An item whose submitter left before it was sent: it is not sent."""
        return False

    def _after_fork_in_child(self) -> None:
        self.reset()

    def reset(self) -> None:
        """In a forked child: forget in-flight and queued state without touching it (the
        threads and tasks waiting on it belong to the parent)."""
        self._forget()


# -- threads -----------------------------------------------------------------------------------

_QUEUED, _LEADS, _SENT = 0, 1, 2


class _Slot(Generic[Op, R]):
    """One queued op and the lock its submitter blocks on until it is answered or leads."""

    __slots__ = ("batch", "op", "outcome", "signal", "state")

    def __init__(self, op: Op) -> None:
        self.op = op
        self.state = _QUEUED
        self.outcome: R | BaseException | None = None
        self.batch: list[_Slot[Op, R]] = []  # the flush this slot leads, once it leads one
        # A bare Lock, held until released by whoever answers: cheaper than an Event (no
        # Condition), and released exactly once.
        self.signal = threading.Lock()
        self.signal.acquire()


class Batcher(_Plan[_Slot[Op, R]], Generic[Op, R]):
    """Coalesces the operations of many threads into shared round trips."""

    def __init__(self, flush: Flush[Op, R], *, max_batch: int = 256, flights: int = 1) -> None:
        self._flush = flush
        super().__init__(max_batch, flights)

    def _forget(self) -> None:
        super()._forget()
        self._lock = threading.Lock()  # a parent's thread may have held it at fork time

    def submit(self, op: Op) -> R:
        """Run ``op`` in a round trip and return its value, or raise its exception."""
        with self._lock:
            inline = self._starts_inline()
            if not inline:
                slot: _Slot[Op, R] = _Slot(op)
                self._queue.append(slot)
        if inline:
            try:
                results = self._flush((op,))
            finally:
                self._ended()
            return _value(_outcomes(results, 1)[0])
        try:
            slot.signal.acquire()
        except BaseException:  # interrupted (KeyboardInterrupt) while waiting
            self._abandon(slot)
            raise
        if slot.state == _LEADS:
            return _value(self._lead(slot.batch))
        return _value(cast("R | BaseException", slot.outcome))  # set before the signal

    def _lead(self, batch: list[_Slot[Op, R]]) -> R | BaseException:
        """Run one flush for ``batch`` (this thread's own op first), answer the others, and
        return this thread's outcome."""
        outcomes: list[R | BaseException]
        try:
            outcomes = list(_outcomes(self._flush([s.op for s in batch]), len(batch)))
        except BaseException as exc:
            outcomes = list(_failed(exc, len(batch)))
            outcomes[0] = exc  # the interruption, if it is one, is this thread's own
        self._ended()
        for slot, outcome in zip(batch[1:], outcomes[1:], strict=True):
            slot.outcome = outcome
            slot.signal.release()
        return outcomes[0]

    def _ended(self) -> None:
        """A flush ended: hand the next one, if anyone waits, to its first submitter."""
        with self._lock:
            self._in_flight -= 1
            batch = self._take()
            if batch is not None:
                self._lead_with(batch)

    def _lead_with(self, batch: list[_Slot[Op, R]]) -> None:
        for slot in batch:
            slot.state = _SENT
        leader = batch[0]
        leader.state = _LEADS
        leader.batch = batch
        leader.signal.release()

    def _abandon(self, slot: _Slot[Op, R]) -> None:
        with self._lock:
            if slot.state == _QUEUED:
                self._queue.remove(slot)
            elif slot.state == _LEADS:
                # Chosen to lead but never started: the rest of its batch still goes.
                rest = slot.batch[1:]
                if rest:
                    self._lead_with(rest)
                else:
                    self._in_flight -= 1
                    batch = self._take()
                    if batch is not None:
                        self._lead_with(batch)
            # _SENT: someone else's flush carries it; its answer is simply not read.


# -- asyncio -----------------------------------------------------------------------------------


class AsyncBatcher(_Plan[tuple[Op, "asyncio.Future[Any]"]], Generic[Op, R]):
    """Coalesces the operations of many tasks of one event loop into shared round trips."""

    def __init__(self, flush: AsyncFlush[Op, R], *, max_batch: int = 256, flights: int = 1) -> None:
        self._flush = flush
        super().__init__(max_batch, flights)

    def _forget(self) -> None:
        super()._forget()
        # The loop holds tasks only weakly: these are the flushes running in tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    def _gone(self, item: tuple[Op, asyncio.Future[Any]]) -> bool:
        return item[1].done()  # its submitter was cancelled

    async def submit(self, op: Op) -> R:
        """Run ``op`` in a round trip and return its value, or raise its exception."""
        if self._starts_inline():
            try:
                results = await self._flush((op,))
            finally:
                self._ended()
            return _value(_outcomes(results, 1)[0])
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        # Cancelling this await cancels only ``future``: the flush skips it if unsent, and
        # otherwise runs on for the others.
        return await future

    async def _run(self, batch: list[tuple[Op, asyncio.Future[Any]]]) -> None:
        interrupted: BaseException | None = None
        outcomes: Sequence[R | BaseException]
        try:
            outcomes = _outcomes(await self._flush([op for op, _ in batch]), len(batch))
        except BaseException as exc:
            outcomes = _failed(exc, len(batch))
            if not isinstance(exc, Exception):
                interrupted = exc
        self._ended()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if interrupted is not None:
            raise interrupted

    def _ended(self) -> None:
        self._in_flight -= 1
        batch = self._take()
        if batch is not None:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
