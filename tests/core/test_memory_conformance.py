"""The conformance suite on memory://, the reference store, with a manual clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from idem_core.clock import ManualClock
from idem_core.memory import AsyncMemoryStore, MemoryStore
from idem_core.testing import AsyncStoreSuite, StoreSuite


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def advance(clock: ManualClock) -> Callable[[float], None]:
    return clock.advance


class TestMemoryStore(StoreSuite):
    @pytest.fixture
    def advance(self, clock: ManualClock) -> Callable[[float], None]:
        return clock.advance

    @pytest.fixture
    def store(self, clock: ManualClock) -> Iterator[MemoryStore]:
        return MemoryStore(clock=clock)


class TestMemoryStoreSystemClock(StoreSuite):
    """The same rules on the real clock, as a server-clock store sees them."""

    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore()


class TestAsyncMemoryStore(AsyncStoreSuite):
    @pytest.fixture
    def store_url(self) -> str:
        return "memory://"

    @pytest.fixture
    def advance(self, clock: ManualClock) -> Callable[[float], None]:
        return clock.advance

    @pytest.fixture
    def astore(self, clock: ManualClock) -> AsyncMemoryStore:
        return AsyncMemoryStore(clock=clock)
