"""``Idempotency(local_cache=N)``: completed records kept in this process, so a hot replay
costs no round trip. A hit is a replay like any other: it emits ``replayed``.

No lock: each step is one operation on an ``OrderedDict``, which the interpreter makes
atomic. A lock held across the steps was a convoy under threads (a thread that lost the GIL
inside it stopped every replay of the process). Between two steps another thread may act;
each step tolerates it, and the worst outcome is one record fewer than ``size`` cached.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .record import MICROS, Record


class LocalCache:
    """A per-process LRU of completed records (only completed records: they never change
    until they expire)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Record] = OrderedDict()

    def put(self, key: str, record: Record) -> None:
        items = self._items
        items[key] = record
        try:
            items.move_to_end(key)
        except KeyError:  # discarded meanwhile by another thread
            return
        if len(items) > self.size:
            try:  # noqa: SIM105  (try is cheaper than contextlib.suppress on the hot path)
                items.popitem(last=False)
            except KeyError:  # emptied meanwhile
                pass

    def get(self, key: str, fp: str) -> Record | None:
        items = self._items
        rec = items.get(key)
        if rec is None:
            return None
        # Judged by this process's clock: a cache entry never outlives its record by more
        # than the skew between this machine and the store.
        if rec.expires_at <= time.time() * MICROS:
            if items.get(key) is rec:  # not replaced meanwhile (a racing pop is harmless)
                items.pop(key, None)
            return None
        if rec.fingerprint != fp:
            return None  # the store decides: it reports the mismatch
        try:  # noqa: SIM105  (try is cheaper than contextlib.suppress on the hot path)
            items.move_to_end(key)
        except KeyError:  # discarded meanwhile: this replay still stands
            pass
        return rec

    def discard(self, key: str) -> None:
        """Forget ``key`` (its record was deleted from the store)."""
        self._items.pop(key, None)
