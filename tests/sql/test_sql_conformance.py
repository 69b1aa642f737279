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
    def store_url(self, db_url: str) -> str:
        return db_url

    @pytest.fixture
    async def astore(self, db: str, db_url: str) -> AsyncIterator[Any]:
        store = open_async_store(db_url)
        # psycopg 3 (PostgreSQL's default async driver) runs on the driver's connections.
        assert store.fast_path is (db == "postgresql")
        watch = PoolWatch(store.engine.sync_engine)
        yield store
        assert store.engine.sync_engine.pool.checkedout() == store.idle_connections, "a leak"
        await store.close()
        assert watch.out == 0, "close() kept a connection"


class TestMySQL8Statements(StoreSuite):
    """MariaDB made to take MySQL 8's statements (no ``INSERT ... RETURNING``: a claim reads
    back what its upsert did); child processes in the process race take MariaDB's."""

    @pytest.fixture
    def store_url(self, db_url: str) -> str:
        return db_url

    @pytest.fixture
    def store(self, db: str, db_url: str) -> Iterator[Any]:
        if db != "mysql":
            pytest.skip("MySQL 8's statements are for MySQL/MariaDB")
        store = open_store(db_url)
        store.sql._has_returning = False
        watch = PoolWatch(store.engine)
        yield store
        assert_no_leak(store, watch)
