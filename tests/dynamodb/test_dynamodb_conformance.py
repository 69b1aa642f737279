"""The core's conformance suite, sync and async, on moto's server and on DynamoDB Local.

A ManualClock (starting at the real time, so TTL values are sensible) is advanced instead of
sleeping. It is both the store's wall clock and its monotonic clock, with the default skew
allowance (300 s): every takeover in these scenarios is the one of a store that watched the
lease unchanged for its duration, never the wall-clock fallback.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from ddb_servers import Server
from idem_dynamodb.aio import AsyncDynamoDBStore
from idem_dynamodb.backend import BACKEND
from idem_dynamodb.store import DynamoDBStore

from idem_core.clock import ManualClock
from idem_core.testing import AsyncStoreSuite, StoreSuite


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(time.time())


class TestDynamoDBStore(StoreSuite):
    @pytest.fixture
    def advance(self, clock: ManualClock) -> Callable[[float], None]:
        return clock.advance

    @pytest.fixture
    def store(self, server: Server, clock: ManualClock) -> Iterator[DynamoDBStore]:
        with server.open(clock=clock, monotonic=clock) as s:
            yield s

    @pytest.fixture
    def store_url(self, server: Server) -> str:
        return server.url()


class TestAsyncDynamoDBStore(AsyncStoreSuite):
    @pytest.fixture
    def store_url(self, server: Server) -> str:
        return server.url(skew_allowance=0)

    @pytest.fixture
    def advance(self, clock: ManualClock) -> Callable[[float], None]:
        return clock.advance

    @pytest.fixture
    async def astore(self, server: Server, clock: ManualClock) -> AsyncIterator[AsyncDynamoDBStore]:
        s = BACKEND.open_async(server.url(), clock=clock, monotonic=clock)
        yield s
        await s.close()


class TestSharedTable(StoreSuite):
    """The same rules in a table shared through a sort key (a static partition per namespace)."""

    @pytest.fixture
    def advance(self, clock: ManualClock) -> Callable[[float], None]:
        return clock.advance

    @pytest.fixture
    def store(self, server: Server, clock: ManualClock) -> Iterator[DynamoDBStore]:
        with server.open(
            "idem_shared", sort_key="sk", namespace="conf", clock=clock, monotonic=clock
        ) as s:
            yield s

    @pytest.fixture
    def store_url(self, server: Server) -> str:
        return server.url("idem_shared", sort_key="sk", namespace="conf")
