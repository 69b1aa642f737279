"""The core's conformance suite on Redis (standalone) and on a three-master Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from idem_core.registry import open_async_store, open_store
from idem_core.testing import AsyncStoreSuite, StoreSuite


class TestRedisStore(StoreSuite):
    @pytest.fixture
    def store_url(self, redis_url: str) -> str:
        return redis_url

    @pytest.fixture
    def store(self, redis_url: str) -> Iterator[Any]:
        store = open_store(redis_url)
        yield store
        store.close()


class TestAsyncRedisStore(AsyncStoreSuite):
    @pytest.fixture
    def store_url(self, redis_url: str) -> str:
        return redis_url

    @pytest.fixture
    async def astore(self, redis_url: str) -> AsyncIterator[Any]:
        store = open_async_store(redis_url)
        yield store
        await store.close()


class TestRedisClusterStore(StoreSuite):
    @pytest.fixture
    def store_url(self, cluster_url: str) -> str:
        return cluster_url

    @pytest.fixture
    def store(self, cluster_url: str) -> Iterator[Any]:
        store = open_store(cluster_url)
        yield store
        store.close()


class TestAsyncRedisClusterStore(AsyncStoreSuite):
    @pytest.fixture
    def store_url(self, cluster_url: str) -> str:
        return cluster_url

    @pytest.fixture
    async def astore(self, cluster_url: str) -> AsyncIterator[Any]:
        store = open_async_store(cluster_url)
        yield store
        await store.close()
