"""The conformance suite: subclass :class:`StoreSuite` or :class:`AsyncStoreSuite` in a test
module and provide a ``store`` (or ``astore``) fixture; pytest collects every check.

Optional fixtures: ``advance(seconds)`` moves the store's clock (the default sleeps, as a
server clock needs); ``store_url`` lets child processes open the same store for the process
race, and lets the async suite open stores by URL from several event loops (the default,
None, skips those checks).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

from ..api import Idempotency
from ..record import ClaimOutcome
from .faults import AsyncFaultyStore, FaultyStore
from .race import process_race, task_race, thread_race
from .scenarios import SCENARIOS, AsyncView, Scenario, _faults
from .step_scenarios import STEP_SCENARIOS


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

    def test_opened_by_url_used_from_many_event_loops(
        self, store_url: str | None, key: str
    ) -> None:
        """One module-level ``Idempotency`` opened by URL, used from ``asyncio.run()`` after
        ``asyncio.run()`` (a Lambda invocation, a pytest-asyncio test each) and from threads
        running loops of their own: each loop gets a store of its own, and every loop sees
        the same records. (What the abandoned stores print is the next check's business.)"""
        with _Noise():
            _many_loops(_url(store_url), key)

    def test_stores_of_closed_loops_are_dropped_quietly(
        self, store_url: str | None, key: str
    ) -> None:
        """The store of a loop that has closed cannot be closed (no coroutine runs there any
        more): it is dropped, and dropping it prints nothing (no ResourceWarning, no
        "Exception ignored", no error logged), at once or when it is collected."""
        with _Noise() as noise:
            _many_loops(_url(store_url), key)
        assert not noise.heard, "abandoned stores made noise:\n" + "\n".join(noise.heard)


def _url(store_url: str | None) -> str:
    if store_url is None:
        pytest.skip("no store_url fixture: this store cannot be opened by URL")
    return store_url


def _many_loops(store_url: str, key: str) -> None:
    idem = Idempotency.from_url(store_url, namespace=f"loops{uuid.uuid4().hex[:8]}")
    runs: list[str] = []

    async def run(k: str) -> str:
        runs.append(k)
        await asyncio.sleep(0)
        return f"done {k}"

    handler = cast(Callable[[str], Coroutine[Any, Any, str]], idem.idempotent(key="k")(run))

    assert asyncio.run(handler(key)) == f"done {key}"
    assert asyncio.run(handler(key)) == f"done {key}"  # a new loop: replayed
    assert runs == [key]

    results: dict[int, list[str]] = {}

    def thread(i: int) -> None:
        async def both() -> list[str]:
            return [await handler(key), await handler(f"{key}-{i}")]

        results[i] = asyncio.run(both())

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: [f"done {key}", f"done {key}-{i}"] for i in range(3)}
    assert sorted(runs) == sorted([key] + [f"{key}-{i}" for i in range(3)])

    async def last() -> None:
        try:
            assert await handler(key) == f"done {key}"
        finally:
            await idem.aclose()

    asyncio.run(last())
    assert asyncio.run(handler(key)) == f"done {key}"  # closed is not finished
    idem.close()


class _Noise:
    """Collects what dropped stores may print while the block runs and when it ends (after
    a garbage collection): warnings, unraisable exceptions, log records at WARNING and up."""

    def __init__(self) -> None:
        self.heard: list[str] = []

    def __enter__(self) -> _Noise:
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        self._hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        self._handler = _Heard(self.heard)
        logging.getLogger().addHandler(self._handler)
        return self

    def _unraisable(self, info: Any) -> None:
        self.heard.append(f"Exception ignored in {info.object!r}: {info.exc_value!r}")

    def __exit__(self, *exc: object) -> None:
        try:
            gc.collect()
        finally:
            logging.getLogger().removeHandler(self._handler)
            sys.unraisablehook = self._hook
            self._warnings.__exit__(None, None, None)
        self.heard.extend(f"{w.category.__name__}: {w.message}" for w in self._caught)


class _Heard(logging.Handler):
    def __init__(self, heard: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.heard = heard

    def emit(self, record: logging.LogRecord) -> None:
        self.heard.append(f"logged {record.levelname} {record.name}: {record.getMessage()}")


def _sync_test(fn: Scenario) -> Callable[..., None]:
    def test(self: Any, store: Any, advance: Callable[[float], None], key: str) -> None:
        asyncio.run(fn(AsyncView(store), advance, key))

    return test


def _async_test(fn: Scenario) -> Callable[..., Any]:
    async def test(self: Any, astore: Any, advance: Callable[[float], None], key: str) -> None:
        await fn(astore, advance, key)

    return test


for _name, _fn in {**SCENARIOS, **STEP_SCENARIOS}.items():
    for _cls, _make in ((StoreSuite, _sync_test), (AsyncStoreSuite, _async_test)):
        _test = _make(_fn)
        _test.__name__ = f"test_{_name}"
        _test.__doc__ = _fn.__doc__
        _test.__qualname__ = f"{_cls.__name__}.test_{_name}"
        setattr(_cls, _test.__name__, _test)
