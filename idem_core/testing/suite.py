"""The conformance suite: subclass :class:`StoreSuite` or :class:`AsyncStoreSuite` in a test
module and provide a ``store`` (or ``astore``) fixture; pytest collects every check.

Optional fixtures: ``advance(seconds)`` moves the store's clock (the default sleeps, as a
server clock needs); ``store_url`` lets child processes open the same store for the process
race (the default, None, skips it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from ..record import ClaimOutcome
from .faults import AsyncFaultyStore, FaultyStore
from .race import process_race, task_race, thread_race
from .scenarios import SCENARIOS, AsyncView, Scenario, _faults


def _exactly_one(outcomes: list[ClaimOutcome]) -> None:
    acquired = [o for o in outcomes if o.acquired]
    assert len(acquired) == 1, outcomes
    assert all(o is ClaimOutcome.IN_PROGRESS for o in outcomes if not o.acquired), outcomes


class _Base:
    @pytest.fixture
    def advance(self) -> Callable[[float], None]:
        return time.sleep

    @pytest.fixture
    def store_url(self) -> str | None:
        return None

    @pytest.fixture
    def key(self) -> str:
        return f"conformance-{uuid.uuid4().hex}"


class StoreSuite(_Base):
    """Every rule of :mod:`idem_core.machine`, checked on a sync store."""

    def test_faults_before_and_after_apply(self, store: Any, key: str) -> None:
        faulty = FaultyStore(store)
        asyncio.run(_faults(AsyncView(faulty), faulty, key))

    def test_sixteen_threads_one_claim(self, store: Any, key: str) -> None:
        for i in range(3):
            _exactly_one(thread_race(store, f"{key}-{i}"))

    def test_four_processes_one_claim(self, store_url: str | None, key: str) -> None:
        if store_url is None:
            pytest.skip("this store is in-process: no URL that other processes can open")
        _exactly_one(process_race(store_url, key))

    def test_state_machine_against_reference(self, store: Any) -> None:
        from .model import store_machine  # hypothesis is needed by this test only

        store_machine(store).TestCase().runTest()


class AsyncStoreSuite(_Base):
    """The same rules on an asyncio store."""

    async def test_faults_before_and_after_apply(self, astore: Any, key: str) -> None:
        faulty = AsyncFaultyStore(astore)
        await _faults(faulty, faulty, key)

    async def test_sixteen_tasks_one_claim(self, astore: Any, key: str) -> None:
        for i in range(3):
            _exactly_one(await task_race(astore, f"{key}-{i}"))


def _sync_test(fn: Scenario) -> Callable[..., None]:
    def test(self: Any, store: Any, advance: Callable[[float], None], key: str) -> None:
        asyncio.run(fn(AsyncView(store), advance, key))

    return test


def _async_test(fn: Scenario) -> Callable[..., Any]:
    async def test(self: Any, astore: Any, advance: Callable[[float], None], key: str) -> None:
        await fn(astore, advance, key)

    return test


for _name, _fn in SCENARIOS.items():
    for _cls, _make in ((StoreSuite, _sync_test), (AsyncStoreSuite, _async_test)):
        _test = _make(_fn)
        _test.__name__ = f"test_{_name}"
        _test.__doc__ = _fn.__doc__
        _test.__qualname__ = f"{_cls.__name__}.test_{_name}"
        setattr(_cls, _test.__name__, _test)
