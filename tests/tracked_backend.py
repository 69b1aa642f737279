"""``tracked://``: a test backend whose records live in one memory store but which behaves
like a networked one (not in-process: each event loop gets a store of its own, each is
owned and closed). Every open and close is recorded, with the loop it happened on; a store
refuses use after close and from another loop than its own, as a network driver would."""

from __future__ import annotations

import asyncio
from typing import Any

from idem_core.memory import AsyncMemoryStore, MemoryStore
from idem_core.registry import register


class TrackedStore(AsyncMemoryStore):
    def __init__(self, backend: Tracked, store: MemoryStore) -> None:
        super().__init__(store)
        self.backend = backend
        self.loop = asyncio._get_running_loop()
        self.closed = False

    async def claim(self, request: Any) -> Any:
        if self.closed:
            raise AssertionError("a closed store was used")
        if asyncio.get_running_loop() is not self.loop:
            raise AssertionError("a store was used from another event loop than its own")
        return await super().claim(request)

    async def close(self) -> None:
        self.closed = True
        self.backend.closed.append(self)


class SyncTracked(MemoryStore):
    def __init__(self, backend: Tracked) -> None:
        super().__init__()
        self.backend = backend
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.backend.closed_sync.append(self)


class Tracked:
    """Opens stores that refuse use after close and from another loop than their own."""

    extra = ""

    def __init__(self) -> None:
        self.records = MemoryStore()
        self.opened: list[TrackedStore] = []
        self.closed: list[TrackedStore] = []
        self.opened_sync: list[SyncTracked] = []
        self.closed_sync: list[SyncTracked] = []

    def open(self, url: str, *, client: Any = None, **options: Any) -> SyncTracked:
        store = SyncTracked(self)
        self.opened_sync.append(store)
        return store

    def open_async(self, url: str, *, client: Any = None, **options: Any) -> TrackedStore:
        store = TrackedStore(self, self.records)
        self.opened.append(store)
        return store


def install() -> Tracked:
    """A fresh ``tracked://`` backend, registered (each test gets its own)."""
    backend = Tracked()
    register("tracked", backend)
    return backend
