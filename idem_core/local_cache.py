"""``Idempotency(local_cache=N)``: completed records kept in this process, so a hot replay
costs no round trip. A hit is a replay like any other: it emits ``replayed``."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from . import _process
from .record import MICROS, Record


class LocalCache:
    """A per-process LRU of completed records (only completed records: they never change
    until they expire)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Record] = OrderedDict()
        self._lock = threading.Lock()
        _process.reset_in_child(self)

    def put(self, key: str, record: Record) -> None:
        with self._lock:
            self._items[key] = record
            self._items.move_to_end(key)
            if len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, key: str, fp: str) -> Record | None:
        with self._lock:
            rec = self._items.get(key)
            if rec is None:
                return None
            # Judged by this process's clock: a cache entry never outlives its record by more
            # than the skew between this machine and the store.
            if rec.expires_at <= time.time() * MICROS:
                del self._items[key]
                return None
            if rec.fingerprint != fp:
                return None  # the store decides: it reports the mismatch
            self._items.move_to_end(key)
            return rec

    def discard(self, key: str) -> None:
        """Forget ``key`` (its record was deleted from the store)."""
        with self._lock:
            self._items.pop(key, None)

    def _after_fork_in_child(self) -> None:
        # The records stay valid; the lock may have been held by a thread the child lacks.
        self._lock = threading.Lock()
