"""Prove your own handlers idempotent: ``assert_idempotent`` and pytest fixtures.

::

    # conftest.py
    from idem_core.testing import idempotency, lambda_context  # noqa: F401  (fixtures)

    # test_handler.py
    from idem_core.testing import assert_idempotent

    def test_order_handler(lambda_context):
        assert_idempotent(app.handler, event, lambda_context, changed=other_event)

The handler runs against whatever store its ``Idempotency`` uses: ``memory://`` in unit
tests, or a real URL (``IDEM_TEST_URL``) in integration tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..api import Idempotency
from ..errors import AlreadyInProgress, ConfigurationError, PayloadMismatch
from ..events import Event, EventKind

_UNSET: Any = object()


@dataclasses.dataclass
class IdempotencyReport:
    """What :func:`assert_idempotent` observed."""

    #: the stored key the handler used
    key: str
    #: the first call's result
    result: Any
    #: results of the concurrent calls that returned (the others met AlreadyInProgress)
    concurrent_results: list[Any]
    #: how many concurrent calls met AlreadyInProgress
    in_progress: int
    #: every decision seen, in order
    events: list[Event]


class _Recorder:
    """One hook per ``Idempotency``, added once; listeners come and go (hooks cannot be
    removed through the public API)."""

    def __init__(self) -> None:
        self.listeners: list[list[Event]] = []
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            for events in self.listeners:
                events.append(event)

    @contextlib.contextmanager
    def listen(self) -> Iterator[list[Event]]:
        events: list[Event] = []
        with self.lock:
            self.listeners.append(events)
        try:
            yield events
        finally:
            with self.lock:
                self.listeners.remove(events)


_recorders: dict[int, tuple[Idempotency, _Recorder]] = {}
_recorders_lock = threading.Lock()


def _recorder(idem: Idempotency) -> _Recorder:
    with _recorders_lock:
        found = _recorders.get(id(idem))
        if found is None or found[0] is not idem:
            found = (idem, _Recorder())
            idem.on_event(found[1])
            _recorders[id(idem)] = found
        return found[1]


def _idem_of(handler: Callable[..., Any], idem: Idempotency | None) -> Idempotency:
    if idem is not None:
        return idem
    found = getattr(handler, "idempotency", None)
    if isinstance(found, Idempotency):
        return found
    raise ConfigurationError(
        f"pass idem=... : {getattr(handler, '__qualname__', handler)!r} does not say which "
        "Idempotency it uses (only lambda_handler, batch_handler and consumer wrappers do)"
    )


def _executions(events: list[Event]) -> list[Event]:
    return [e for e in events if e.kind in (EventKind.CLAIMED, EventKind.TOOK_OVER)]


def _stale_key(events: list[Event]) -> str | None:
    """The key of a record left by an earlier test (the first call replayed it): it is
    deleted so the checks start from a fresh record, on a shared store too."""
    if _executions(events):
        return None
    replays = [e.key for e in events if e.kind is EventKind.REPLAYED]
    return replays[0] if replays else None


def _forget(idem: Idempotency, key: str) -> None:
    """The record is about to be deleted: this process's local cache must forget it too."""
    if idem._cache is not None:
        idem._cache.discard(key)


def _check_one_run(events: list[Event], phase: str) -> str:
    runs = _executions(events)
    assert len(runs) == 1, (
        f"{phase}: the handler ran {len(runs)} times, expected once "
        f"(decisions: {[e.kind.value for e in events]})"
    )
    keys = {e.key for e in events}
    assert len(keys) == 1, f"{phase}: the calls used different keys: {sorted(keys)}"
    return runs[0].key


def assert_idempotent(
    handler: Callable[..., Any],
    event: Any,
    *args: Any,
    changed: Any = _UNSET,
    idem: Idempotency | None = None,
    concurrency: int = 8,
    equal: Callable[[Any, Any], bool] | None = None,
    **kwargs: Any,
) -> IdempotencyReport:
    """Call ``handler(event, *args, **kwargs)`` and assert it is idempotent:

    1. twice in a row (after deleting a record an earlier run left for the same key): the
       second call replays, the handler runs once, the results are equal;
    2. ``concurrency`` times at once on a fresh record (the first one is deleted): the handler
       runs once, every other call replays an equal result or meets ``AlreadyInProgress``;
    3. with ``changed`` (the same key, a different payload), if given: ``PayloadMismatch``.

    ``idem`` is the handler's ``Idempotency`` (found on ``lambda_handler``, ``batch_handler``
    and ``consumer`` wrappers). ``equal`` compares results (default ``==``).
    For ``async def`` handlers use :func:`aassert_idempotent`.
    """
    if inspect.iscoroutinefunction(handler):
        raise ConfigurationError("use `await aassert_idempotent(...)` for async handlers")
    idem = _idem_of(handler, idem)
    same = equal or (lambda a, b: a == b)
    recorder = _recorder(idem)

    with recorder.listen() as events:
        first = handler(event, *args, **kwargs)
        stale = _stale_key(events)
        if stale is not None:
            _forget(idem, stale)
            idem.store.delete(stale)
            events.clear()
            first = handler(event, *args, **kwargs)
        second = handler(event, *args, **kwargs)
    key = _check_one_run(events, "called twice")
    assert any(e.kind is EventKind.REPLAYED for e in events), (
        "called twice: the second call did not replay"
    )
    assert same(first, second), f"called twice: the replay {second!r} != the result {first!r}"
    log = list(events)

    _forget(idem, key)
    idem.store.delete(key)
    barrier = threading.Barrier(concurrency)
    results: list[Any] = []
    busy: list[AlreadyInProgress] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        try:
            value = handler(event, *args, **kwargs)
        except AlreadyInProgress as exc:
            with lock:
                busy.append(exc)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(value)

    with recorder.listen() as events:
        threads = [threading.Thread(target=one) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise AssertionError(f"concurrently: a call failed: {errors[0]!r}") from errors[0]
    _check_one_run(events, f"called {concurrency} times at once")
    assert results, "concurrently: no call returned"
    for value in results[1:]:
        assert same(value, results[0]), (
            f"concurrently: a replay {value!r} != the result {results[0]!r}"
        )
    log += events

    if changed is not _UNSET:
        with recorder.listen() as events:
            try:
                handler(changed, *args, **kwargs)
            except PayloadMismatch:
                pass
            else:
                raise AssertionError(
                    "with a changed payload: expected PayloadMismatch; does the handler "
                    "validate the payload (e.g. payload_key=...)?"
                )
        log += events
    return IdempotencyReport(key, first, results, len(busy), log)


async def aassert_idempotent(
    handler: Callable[..., Any],
    event: Any,
    *args: Any,
    changed: Any = _UNSET,
    idem: Idempotency | None = None,
    concurrency: int = 8,
    equal: Callable[[Any, Any], bool] | None = None,
    **kwargs: Any,
) -> IdempotencyReport:
    """The asyncio twin of :func:`assert_idempotent`, for ``async def`` handlers (the
    concurrent calls are tasks)."""
    idem = _idem_of(handler, idem)
    same = equal or (lambda a, b: a == b)
    recorder = _recorder(idem)

    with recorder.listen() as events:
        first = await handler(event, *args, **kwargs)
        stale = _stale_key(events)
        if stale is not None:
            _forget(idem, stale)
            await idem.astore.delete(stale)
            events.clear()
            first = await handler(event, *args, **kwargs)
        second = await handler(event, *args, **kwargs)
    key = _check_one_run(events, "called twice")
    assert any(e.kind is EventKind.REPLAYED for e in events), (
        "called twice: the second call did not replay"
    )
    assert same(first, second), f"called twice: the replay {second!r} != the result {first!r}"
    log = list(events)

    _forget(idem, key)
    await idem.astore.delete(key)
    with recorder.listen() as events:
        outcomes = await asyncio.gather(
            *(handler(event, *args, **kwargs) for _ in range(concurrency)),
            return_exceptions=True,
        )
    busy = [o for o in outcomes if isinstance(o, AlreadyInProgress)]
    failed = [o for o in outcomes if isinstance(o, BaseException) and o not in busy]
    if failed:
        raise AssertionError(f"concurrently: a call failed: {failed[0]!r}") from failed[0]
    results = [o for o in outcomes if not isinstance(o, BaseException)]
    _check_one_run(events, f"called {concurrency} times at once")
    assert results, "concurrently: no call returned"
    for value in results[1:]:
        assert same(value, results[0]), (
            f"concurrently: a replay {value!r} != the result {results[0]!r}"
        )
    log += events

    if changed is not _UNSET:
        with recorder.listen() as events:
            try:
                await handler(changed, *args, **kwargs)
            except PayloadMismatch:
                pass
            else:
                raise AssertionError(
                    "with a changed payload: expected PayloadMismatch; does the handler "
                    "validate the payload (e.g. payload_key=...)?"
                )
        log += events
    return IdempotencyReport(key, first, results, len(busy), log)


@dataclasses.dataclass
class FakeLambdaContext:
    """A stand-in for the Lambda context object, counting down from ``timeout_ms``."""

    function_name: str = "test-function"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 128
    aws_request_id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    timeout_ms: int = 30_000
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        spent = int((time.monotonic() - self.started) * 1000)
        return max(self.timeout_ms - spent, 0)


@pytest.fixture
def lambda_context() -> FakeLambdaContext:
    """A fake Lambda context with 30 seconds to run."""
    return FakeLambdaContext()


@pytest.fixture
def idempotency() -> Iterator[Idempotency]:
    """An :class:`~idem_core.Idempotency` on ``IDEM_TEST_URL`` (default ``memory://``), in a
    namespace of its own, closed afterwards."""
    url = os.environ.get("IDEM_TEST_URL", "memory://")
    idem = Idempotency.from_url(url, namespace=f"test{uuid.uuid4().hex[:12]}")
    yield idem
    idem.close()
