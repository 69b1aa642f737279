"""The core's conformance suite, sync and async, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pool_watch import PoolWatch, assert_no_leak

from idem_core.registry import open_async_store, open_store
from idem_core.testing import AsyncStoreSuite, StoreSuite


class TestSQLStore(StoreSuite):
    @pytest.fixture
    def store_url(self, db_url: str) -> str:
        return db_url

    @pytest.fixture
    def store(self, db_url: str) -> Iterator[Any]:
        store = open_store(db_url)
        watch = PoolWatch(store.engine)
        yield store
        assert_no_leak(store, watch)


class TestAsyncSQLStore(AsyncStoreSuite):
    @pytest.fixture
    async def astore(self, db_url: str) -> AsyncIterator[Any]:
        store = open_async_store(db_url)
        yield store
        assert store.engine.sync_engine.pool.checkedout() == 0, "a connection leaked"
        await store.close()
