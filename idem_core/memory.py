"""``memory://``: the in-process store, and the reference the conformance suite runs on first.

Thread-safe (one lock around each transition) and asyncio-safe (no awaits while it is held).
Every operation is O(1): expired records are dropped when touched, and each write also looks
at the few least recently written records, so memory does not grow with dead keys.

``max_size`` bounds the records kept *after* their call: only a completed, released or
expired record (or one whose lease has lapsed, which any claim may take over) is ever
evicted, oldest first. A record in progress is never evicted, since its key would be free
and a duplicate would run beside the first call: when every record is in progress, the store
holds more than ``max_size`` (at most the number of calls running at once) until they end.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections import OrderedDict
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

_named: dict[str, MemoryStore] = {}
_named_lock = threading.Lock()


def _new_named_lock() -> None:
    # A thread of the parent may have held it at the fork: the child would wait forever.
    global _named_lock
    _named_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_named_lock)


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
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # sync waiters; writes notify only when there are some
        self._last_fence = 0
        #: keys whose call ended (completed or released), oldest first: eviction candidates
        self._ended: OrderedDict[str, None] = OrderedDict()
        #: key -> step name -> (until, data); see :mod:`idem_core.steps`
        self._steps: dict[str, dict[str, tuple[int, bytes]]] = {}
        _process.reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        # The child keeps its copy of the records; the lock may have been held by a thread
        # that does not exist in the child.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0

    def __len__(self) -> int:
        return len(self._records)

    def _insert(self, record: Record, now: int) -> None:
        records = self._records
        records[record.key] = record
        # The dict is ordered by creation: drop the oldest record if it has expired.
        oldest = next(iter(records.values()))
        if oldest.expires_at <= now and oldest is not record:
            del records[oldest.key]
            self._ended.pop(oldest.key, None)
            self._steps.pop(oldest.key, None)
        if self._max_size is not None and len(records) > self._max_size:
            self._evict(now)

    def _evict(self, now: int) -> None:
        """Drop one record whose call is over, if there is one (the lock is held)."""
        records, ended = self._records, self._ended
        while ended:
            key, _ = ended.popitem(last=False)
            rec = records.get(key)
            # Checked again: the key may have been claimed anew since its call ended.
            if rec is not None and _evictable(rec, now):
                del records[key]
                self._steps.pop(key, None)
                return
        # No ended call: a record nobody holds any more (lapsed lease, expired) may go, seen
        # among the oldest few only, so a claim stays O(1).
        for key, rec in list(itertools.islice(records.items(), 8)):
            if _evictable(rec, now):
                del records[key]
                self._steps.pop(key, None)
                return

    def _live(self, key: str, now: int) -> Record | None:
        rec = self._records.get(key)
        if rec is not None and rec.expires_at <= now:
            return None
        return rec

    def claim(self, request: ClaimRequest) -> ClaimResult:
        with self._lock:
            now = self._clock()
            current = self._records.get(request.key)
            if current is not None and not machine.takeable(current, now):
                return ClaimResult(machine.classify(current, request, now), current)
            outcome, record = machine.new_claim(current, request, now, self._last_fence + 1)
            self._last_fence = record.fence
            if current is None:
                self._insert(record, now)
            else:
                self._records[record.key] = record
                self._changed_now()
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
        with self._lock:
            now = self._clock()
            current = self._records.get(key)
            if machine.holds(current, fence, now):
                assert current is not None
                rec = machine.completed(current, result, ttl, now)
                self._records[key] = rec
                if self._max_size is not None:
                    self._ended[key] = None
                if self._waiting:
                    self._changed.notify_all()
                return rec
            return machine.after_failed_complete(current, key, fence, now)

    def release(self, key: str, fence: int) -> None:
        with self._lock:
            now = self._clock()
            current = self._records.get(key)
            if machine.holds(current, fence, now):
                assert current is not None
                self._records[key] = machine.released(current, now)
                if self._max_size is not None:
                    self._ended[key] = None
                self._changed_now()
                return
            machine.after_failed_release(current, key, fence, now)

    def renew(self, key: str, fence: int, lease: float) -> Record:
        with self._lock:
            now = self._clock()
            current = self._records.get(key)
            if machine.holds(current, fence, now):
                assert current is not None
                rec = machine.renewed(current, lease, now)
                self._records[key] = rec
                return rec
            return machine.after_failed_renew(current, key, fence, now)

    def get(self, key: str) -> Record | None:
        with self._lock:
            return self._live(key, self._clock())

    def delete(self, key: str) -> None:
        with self._lock:
            self._records.pop(key, None)
            self._ended.pop(key, None)
            self._steps.pop(key, None)
            self._changed_now()

    def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        """Record step ``name`` of ``key`` for the holder of ``fence`` (see idem_core.steps)."""
        with self._lock:
            now = self._clock()
            if not machine.holds(self._records.get(key), fence, now):
                machine.after_failed_renew(self._records.get(key), key, fence, now)
            steps = self._steps.setdefault(key, {})
            if any(u <= now for u, _ in steps.values()):  # a dead generation's steps
                steps = self._steps[key] = {n: v for n, v in steps.items() if v[0] > now}
            steps[name] = (until, bytes(data))

    def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        with self._lock:
            return dict(self._steps.get(key, ()))

    def _changed_now(self) -> None:
        """Called with the lock held after a write that can end a wait."""
        if self._waiting:
            self._changed.notify_all()

    def _held(self, key: str, fence: int, now: int) -> Record | None:
        rec = self._records.get(key)
        if rec is not None and machine.holds(rec, fence, now) and rec.lease_expires_at > now:
            return rec
        return None

    def wait_for_change(self, key: str, fence: int, timeout: float) -> None:
        """Return once ``key`` is no longer held with a live lease by ``fence`` (completed,
        released, deleted, taken over or lapsed), or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._waiting += 1
            try:
                while True:
                    now = self._clock()
                    rec = self._held(key, fence, now)
                    remaining = deadline - time.monotonic()
                    if rec is None or remaining <= 0:
                        return
                    # Wake up by the lease's end too: a lapse is no write, nobody notifies it.
                    lease_left = (rec.lease_expires_at - now) / MICROS
                    self._changed.wait(min(remaining, max(lease_left, 0.001)))
            finally:
                self._waiting -= 1

    def now(self) -> int:
        return self._clock()

    def scan(self, where: ScanFilter, page_size: int = DEFAULT_PAGE) -> Iterator[list[Record]]:
        """Pages of the records ``where`` selects, without results (see
        :mod:`idem_core.scanning`); the key list is taken once, each page under the lock."""
        with self._lock:
            keys = list(self._records)
        for start in range(0, len(keys), page_size):
            page: list[Record] = []
            with self._lock:
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
