"""``memory://``: the in-process store, and the reference the conformance suite runs on first.

Thread-safe and asyncio-safe (no awaits while a lock is held). Each key's operations are atomic
under one of ``STRIPES`` locks, chosen by the key's hash: threads working on different keys
never wait for each other. One store-wide lock was a convoy: a thread that lost the GIL while
holding it stopped every other thread, and throughput fell as threads were added. What spans
keys (the record dict, eviction candidates) relies on single dict operations, which the
interpreter makes atomic.

Every operation is O(1): expired records are dropped when touched, and each write also looks
at the few least recently written records, so memory does not grow with dead keys.

``max_size`` bounds the records kept *after* their call: only a completed, released or
expired record (or one whose lease has lapsed, which any claim may take over) is ever
evicted, oldest first. A record in progress is never evicted, since its key would be free
and a duplicate would run beside the first call: when every record is in progress, the store
holds more than ``max_size`` (at most the number of calls running at once) until they end.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec.structs

from . import _process, machine
from .clock import Clock, system_clock
from .errors import ConfigurationError
from .record import MICROS, ClaimRequest, ClaimResult, Record, Status
from .registry import url_options
from .scanning import DEFAULT_PAGE, ScanFilter

#: locks per store (a power of two): enough that 64 threads rarely meet on one
STRIPES = 64
_MASK = STRIPES - 1

_named: dict[str, MemoryStore] = {}
_named_lock = threading.Lock()


def _new_named_lock() -> None:
    # A thread of the parent may have held it at the fork: the child would wait forever.
    global _named_lock
    _named_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_named_lock)


class _Stripe:
    """The lock of the keys that hash to it, their sync waiters, and the last fence handed
    out to them (a key always lands on the same stripe: its fences grow across deletion)."""

    __slots__ = ("changed", "last_fence", "lock", "waiting")

    def __init__(self, last_fence: int = 0) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.waiting = 0  # writes notify only when there are waiters
        self.last_fence = last_fence

    def changed_now(self) -> None:
        """Called with the lock held after a write that can end a wait."""
        if self.waiting:
            self.changed.notify_all()


class MemoryStore:
    """Records in a dict, judged by an injectable client clock."""

    max_key_length = 1 << 16
    server_clock = False

    def __init__(self, *, clock: Clock = system_clock, max_size: int | None = None) -> None:
        if max_size is not None and max_size < 1:
            raise ConfigurationError("max_size must be at least 1")
        self._clock = clock
        self._max_size = max_size
        self._records: dict[str, Record] = {}
        self._stripes = [_Stripe() for _ in range(STRIPES)]
        #: held by the one thread evicting for ``max_size``; ``_owed`` holds one item per
        #: insert that found the store over its bound (appends and pops are atomic)
        self._evicting = threading.Lock()
        self._owed: deque[None] = deque()
        #: keys whose call ended (completed or released), oldest first: eviction candidates
        self._ended: OrderedDict[str, None] = OrderedDict()
        #: key -> step name -> (until, data); see :mod:`idem_core.steps`
        self._steps: dict[str, dict[str, tuple[int, bytes]]] = {}
        _process.reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        # The child keeps its copy of the records and fences; a lock may have been held by a
        # thread that does not exist in the child.
        self._stripes = [_Stripe(s.last_fence) for s in self._stripes]
        self._evicting = threading.Lock()

    def _stripe(self, key: str) -> _Stripe:
        return self._stripes[hash(key) & _MASK]

    def __len__(self) -> int:
        return len(self._records)

    def _forget(self, key: str) -> None:
        """Drop everything kept for ``key`` (its stripe's lock is held)."""
        self._records.pop(key, None)
        self._ended.pop(key, None)
        self._steps.pop(key, None)

    def _inserted(self, record: Record, now: int) -> None:
        """Housekeeping after a new key's record was inserted, its lock released (so that
        taking another key's lock here can never deadlock)."""
        records = self._records
        # The dict is ordered by creation: drop the oldest record if it has expired.
        try:
            oldest = next(iter(records.values()))
        except RuntimeError:  # another thread wrote between iter() and next(): next time
            oldest = record
        if oldest is not record and oldest.expires_at <= now:
            key = oldest.key
            with self._stripe(key).lock:
                if records.get(key) is oldest:  # unchanged since seen
                    self._forget(key)
        if self._max_size is not None and len(records) > self._max_size:
            self._shrink(self._max_size, now)

    def _shrink(self, max_size: int, now: int) -> None:
        """Evict one record for this insert, as a lone thread would, without two threads
        evicting at once (each would see the same excess and evict for it). A thread that
        finds the eviction busy leaves its debt to the evicting thread, which settles debts
        again after letting go, so none is missed."""
        owed = self._owed
        owed.append(None)
        while owed:
            if not self._evicting.acquire(blocking=False):
                return
            try:
                while owed:
                    owed.pop()
                    if len(self._records) > max_size:
                        self._evict(now)
            finally:
                self._evicting.release()

    def _evict(self, now: int) -> None:
        """Drop one record whose call is over, if there is one."""
        records, ended = self._records, self._ended
        while ended:
            try:
                key, _ = ended.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break
            with self._stripe(key).lock:
                rec = records.get(key)
                # Checked again: the key may have been claimed anew since its call ended.
                if rec is not None and _evictable(rec, now):
                    self._forget(key)
                    return
        # No ended call: a record nobody holds any more (lapsed lease, expired) may go, seen
        # among the oldest few only, so a claim stays O(1).
        try:
            oldest = list(itertools.islice(records.items(), 8))
        except RuntimeError:  # another thread wrote meanwhile: the next write looks again
            return
        for key, rec in oldest:
            if _evictable(rec, now):
                with self._stripe(key).lock:
                    if records.get(key) is rec:
                        self._forget(key)
                        return

    def _live(self, key: str, now: int) -> Record | None:
        rec = self._records.get(key)
        if rec is not None and rec.expires_at <= now:
            return None
        return rec

    def claim(self, request: ClaimRequest) -> ClaimResult:
        key = request.key
        current = self._records.get(key)
        if current is not None:
            # A claim that finds a record it cannot take writes nothing (replays, calls in
            # progress): answered without a lock from one atomic read. Records are replaced,
            # never changed, and one not takeable now was not takeable at the read before.
            now = self._clock()
            if not machine.takeable(current, now):
                return ClaimResult(machine.classify(current, request, now), current)
        stripe = self._stripes[hash(key) & _MASK]
        with stripe.lock:
            now = self._clock()
            current = self._records.get(key)
            if current is not None and not machine.takeable(current, now):
                return ClaimResult(machine.classify(current, request, now), current)
            outcome, record = machine.new_claim(current, request, now, stripe.last_fence + 1)
            stripe.last_fence = record.fence
            self._records[key] = record
            if current is not None:
                stripe.changed_now()
                return ClaimResult(outcome, record)
        self._inserted(record, now)
        return ClaimResult(outcome, record)

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        return [self.claim(r) for r in requests]

    def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        if with_items:
            raise ConfigurationError("memory:// cannot commit with_items with a result")
        stripe = self._stripes[hash(key) & _MASK]
        with stripe.lock:
            now = self._clock()
            current = self._records.get(key)
            if machine.holds(current, fence, now):
                assert current is not None
                rec = machine.completed(current, result, ttl, now)
                self._records[key] = rec
                if self._max_size is not None:
                    self._ended[key] = None
                if stripe.waiting:  # inline: the first call's hot path
                    stripe.changed.notify_all()
                return rec
        return machine.after_failed_complete(current, key, fence, now)

    def release(self, key: str, fence: int) -> None:
        stripe = self._stripes[hash(key) & _MASK]
        with stripe.lock:
            now = self._clock()
            current = self._records.get(key)
            if machine.holds(current, fence, now):
                assert current is not None
                self._records[key] = machine.released(current, now)
                if self._max_size is not None:
                    self._ended[key] = None
                stripe.changed_now()
                return
        machine.after_failed_release(current, key, fence, now)

    def renew(self, key: str, fence: int, lease: float) -> Record:
        with self._stripe(key).lock:
            now = self._clock()
            current = self._records.get(key)
            if machine.holds(current, fence, now):
                assert current is not None
                rec = machine.renewed(current, lease, now)
                self._records[key] = rec
                return rec
        return machine.after_failed_renew(current, key, fence, now)

    def get(self, key: str) -> Record | None:
        # One dict read: atomic without a lock (records are replaced, never changed).
        return self._live(key, self._clock())

    def delete(self, key: str) -> None:
        stripe = self._stripe(key)
        with stripe.lock:
            self._forget(key)
            stripe.changed_now()

    def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        """Record step ``name`` of ``key`` for the holder of ``fence`` (see idem_core.steps)."""
        with self._stripe(key).lock:
            now = self._clock()
            if not machine.holds(self._records.get(key), fence, now):
                machine.after_failed_renew(self._records.get(key), key, fence, now)
            steps = self._steps.setdefault(key, {})
            if any(u <= now for u, _ in steps.values()):  # a dead generation's steps
                steps = self._steps[key] = {n: v for n, v in steps.items() if v[0] > now}
            steps[name] = (until, bytes(data))

    def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        with self._stripe(key).lock:
            return dict(self._steps.get(key, ()))

    def _held(self, key: str, fence: int, now: int) -> Record | None:
        rec = self._records.get(key)
        if rec is not None and machine.holds(rec, fence, now) and rec.lease_expires_at > now:
            return rec
        return None

    def wait_for_change(self, key: str, fence: int, timeout: float) -> None:
        """Return once ``key`` is no longer held with a live lease by ``fence`` (completed,
        released, deleted, taken over or lapsed), or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        stripe = self._stripe(key)
        with stripe.lock:
            stripe.waiting += 1
            try:
                while True:
                    now = self._clock()
                    rec = self._held(key, fence, now)
                    remaining = deadline - time.monotonic()
                    if rec is None or remaining <= 0:
                        return
                    # Wake up by the lease's end too: a lapse is no write, nobody notifies it.
                    lease_left = (rec.lease_expires_at - now) / MICROS
                    stripe.changed.wait(min(remaining, max(lease_left, 0.001)))
            finally:
                stripe.waiting -= 1

    def now(self) -> int:
        return self._clock()

    def scan(self, where: ScanFilter, page_size: int = DEFAULT_PAGE) -> Iterator[list[Record]]:
        """Pages of the records ``where`` selects, without results (see
        :mod:`idem_core.scanning`); the key list is taken once (``list(dict)`` is one atomic
        step), each record read as it is then."""
        keys = list(self._records)
        for start in range(0, len(keys), page_size):
            page: list[Record] = []
            for key in keys[start : start + page_size]:
                rec = self._records.get(key)
                if rec is not None and where.matches(rec):
                    page.append(msgspec.structs.replace(rec, result=None))
            yield page

    def close(self) -> None:
        pass

    def async_twin(self) -> AsyncMemoryStore:
        """An asyncio view of the same records."""
        return AsyncMemoryStore(self)


def _evictable(rec: Record, now: int) -> bool:
    """Whether dropping ``rec`` changes nothing a caller can see, but a replay that is no
    longer possible: it is completed, or any claim could take it now."""
    return rec.status is Status.COMPLETED or machine.takeable(rec, now)


class AsyncMemoryStore:
    """The asyncio twin: the same records and lock, with nothing to await."""

    max_key_length = MemoryStore.max_key_length
    server_clock = False

    def __init__(self, store: MemoryStore | None = None, **options: Any) -> None:
        self.sync = store if store is not None else MemoryStore(**options)

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        return self.sync.claim(request)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        return self.sync.claim_many(requests)

    async def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        return self.sync.complete(key, fence, result, ttl, with_items=with_items)

    async def release(self, key: str, fence: int) -> None:
        self.sync.release(key, fence)

    async def renew(self, key: str, fence: int, lease: float) -> Record:
        return self.sync.renew(key, fence, lease)

    async def get(self, key: str) -> Record | None:
        return self.sync.get(key)

    async def delete(self, key: str) -> None:
        self.sync.delete(key)

    async def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        self.sync.record_step(key, fence, name, data, until)

    async def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        return self.sync.load_steps(key)

    async def now(self) -> int:
        return self.sync.now()

    async def wait_for_change(self, key: str, fence: int, timeout: float) -> None:  # noqa: ASYNC109
        """The asyncio twin: nothing here may block the loop, so it re-reads the record (a
        dict lookup, no I/O) in short sleeps."""
        store = self.sync
        deadline = time.monotonic() + timeout
        pause = 0.001
        while store._held(key, fence, store._clock()) is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            import asyncio  # here, not at the top: a sync cold start need not import it

            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.02)

    async def close(self) -> None:
        pass


class MemoryBackend:
    """``memory://`` is private to the Idempotency that opens it; ``memory://NAME`` is shared
    by every opener in the process. ``?max_size=N`` bounds the number of records."""

    extra = ""
    #: the sync and async stores of one Idempotency must share the same records
    in_process = True

    def open(self, url: str, *, client: Any = None, **options: Any) -> MemoryStore:
        if isinstance(client, MemoryStore):
            return client
        name = urlsplit(url).netloc
        opts: dict[str, Any] = {}
        if "max_size" in (q := url_options(url)):
            try:
                opts["max_size"] = int(q["max_size"])
            except ValueError as exc:
                raise ConfigurationError(f"max_size must be an integer: {url!r}") from exc
        opts.update(options)
        if not name:
            return MemoryStore(**opts)
        with _named_lock:
            if name not in _named:
                _named[name] = MemoryStore(**opts)
            return _named[name]

    def open_async(self, url: str, *, client: Any = None, **options: Any) -> AsyncMemoryStore:
        if isinstance(client, AsyncMemoryStore):
            return client
        return AsyncMemoryStore(self.open(url, client=client, **options))


BACKEND = MemoryBackend()
