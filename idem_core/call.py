"""One idempotent execution: claim, then replay, wait, or run and complete.

:class:`Call` and :class:`AsyncCall` are twins over the same pure steps (:class:`_Steps`);
they differ only in how they wait for the store.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from .codec import ResultCodec, encode_error, not_stored
from .errors import (
    AlreadyInProgress,
    IdempotencyError,
    LeaseLost,
    PayloadMismatch,
    ResultNotSerializable,
    StoreUnavailable,
)
from .events import EventKind, logger
from .record import ClaimOutcome, ClaimRequest, ClaimResult, Record
from .steps import AsyncStepRunner, StepRunner, derived_key
from .store import AsyncStore, Store

T = TypeVar("T")

# Enum members looked up once: a class attribute lookup costs ~0.1 us on the hot path.
_E_CLAIMED = EventKind.CLAIMED
_E_COMPLETED = EventKind.COMPLETED
_E_FAIL_OPEN = EventKind.FAIL_OPEN
_E_IN_PROGRESS = EventKind.IN_PROGRESS
_E_LEASE_LOST = EventKind.LEASE_LOST
_E_MISMATCH = EventKind.MISMATCH
_E_RELEASED = EventKind.RELEASED
_E_REPLAYED = EventKind.REPLAYED
_E_RESULT_NOT_STORED = EventKind.RESULT_NOT_STORED
_E_STORE_ERROR = EventKind.STORE_ERROR
_E_TOOK_OVER = EventKind.TOOK_OVER
_E_WAITING = EventKind.WAITING
_CLAIMED = ClaimOutcome.CLAIMED
_TOOK_OVER = ClaimOutcome.TOOK_OVER
_O_COMPLETED = ClaimOutcome.COMPLETED
_MISMATCH = ClaimOutcome.MISMATCH


if TYPE_CHECKING:
    import asyncio

    from .api import Idempotency


def _asyncio() -> ModuleType:
    """asyncio, for the async twin: imported there (a running loop has done it), not here,
    so that a sync process's cold start does not pay for it."""
    import asyncio

    return asyncio


_POLL_FIRST = 0.01
_POLL_MAX = 0.5
_WAIT_SLICE = 1.0  # longest single wait on a store's change notification


class Options:
    """The per-call settings a decorator or ``claim()`` resolves once."""

    __slots__ = (
        "cache_errors",
        "codec",
        "function",
        "lease",
        "on_in_progress",
        "renew_every",
        "ttl",
        "wait_timeout",
    )

    def __init__(
        self,
        *,
        ttl: float,
        lease: float,
        codec: ResultCodec,
        on_in_progress: str = "raise",
        wait_timeout: float = 10.0,
        cache_errors: tuple[type[BaseException], ...] = (),
        renew_every: float | None = None,
        function: str | None = None,
    ) -> None:
        from . import validate
        from .errors import ConfigurationError

        self.on_in_progress = validate.choice("on_in_progress", on_in_progress, ("raise", "wait"))
        self.ttl = validate.seconds("ttl", ttl)
        self.lease = validate.seconds("lease", lease)
        self.wait_timeout = validate.seconds("wait_timeout", wait_timeout)
        self.renew_every = validate.seconds("renew_every", renew_every, none=True)
        if renew_every is not None and not renew_every < lease:
            raise ConfigurationError(
                f"renew_every must be shorter than the lease ({lease} s), got {renew_every!r}"
            )
        self.cache_errors = validate.exception_types("cache_errors", cache_errors)
        self.codec = codec
        self.function = function


class _Steps:
    """The decisions shared by both twins; no I/O here."""

    __slots__ = (
        "_done",
        "_record",
        "fence",
        "idem",
        "key",
        "lease_lost",
        "opts",
        "outcome",
        "request",
        "unprotected",
    )

    def __init__(self, idem: Idempotency, request: ClaimRequest, opts: Options) -> None:
        self.idem = idem
        self.request = request
        self.key = request.key
        self.opts = opts
        self.fence: int | None = None
        self.outcome: ClaimOutcome | None = None
        self._record: Record | None = None
        self._done = False
        self.unprotected = False
        self.lease_lost: LeaseLost | None = None

    @property
    def replayed(self) -> bool:
        """True when the result comes from an earlier execution."""
        return self.outcome is _O_COMPLETED

    @property
    def record(self) -> Record | None:
        return self._record

    @property
    def result(self) -> Any:
        """The replayed result, decoded to the declared type (a cached error is raised)."""
        if self.outcome is not _O_COMPLETED or self._record is None:
            raise AttributeError("result is only set on a replayed call")
        return self.opts.codec.decode(self._record.result, self.key)

    def _settle(self, res: ClaimResult) -> bool:
        """Act on a claim's outcome; True when the caller should wait and claim again."""
        emit, fn = self.idem._emit, self.opts.function
        outcome = res.outcome
        self.outcome = outcome
        self._record = res.record
        if outcome is _CLAIMED or outcome is _TOOK_OVER:
            self.fence = res.record.fence
            kind = _E_CLAIMED if outcome is _CLAIMED else _E_TOOK_OVER
            emit(kind, self.key, fn, self.fence)
            return False
        if outcome is _O_COMPLETED:
            self._done = True
            emit(_E_REPLAYED, self.key, fn, res.record.fence)
            self.idem._remember(self.key, res.record)
            return False
        if outcome is _MISMATCH:
            emit(_E_MISMATCH, self.key, fn, res.record.fence)
            raise PayloadMismatch(self.key, res.record)
        emit(_E_IN_PROGRESS, self.key, fn, res.record.fence)
        if self.opts.on_in_progress == "wait":
            return True
        raise AlreadyInProgress(self.key, res.record)

    def _replay_cached(self, record: Record) -> None:
        """A local-cache hit: a replay like the store's, and reported like one."""
        self.outcome, self._record, self._done = _O_COMPLETED, record, True
        self.idem._emit(_E_REPLAYED, self.key, self.opts.function, record.fence)

    def adopt(self, res: ClaimResult) -> None:
        """Take a claim made elsewhere (a batch) without raising: inspect ``outcome``."""
        with contextlib.suppress(AlreadyInProgress, PayloadMismatch):
            self._settle(res)

    def _fail_open(self, exc: StoreUnavailable) -> bool:
        self.idem._emit(_E_STORE_ERROR, self.key, self.opts.function, error=exc)
        if self.idem.on_store_error != "fail_open":
            return False
        self.idem._emit(_E_FAIL_OPEN, self.key, self.opts.function, error=exc)
        self.unprotected = True
        self.outcome = _CLAIMED
        return True

    def _error_payload(self, error: BaseException) -> bytes | None:
        """Bytes to store for an error, or None when the claim is to be released instead."""
        if self.opts.cache_errors and isinstance(error, self.opts.cache_errors):
            return encode_error(error)
        return None

    def _unstorable(self, exc: ResultNotSerializable) -> tuple[bytes, ResultNotSerializable]:
        """A small "not stored" record for a value that cannot be stored (not encodable, or
        not of the declared type), and the error duplicates will get: the function ran, so it
        must never run again for this key."""
        return not_stored(self.key, self.opts.function, str(exc))

    def _refused(self, exc: ResultNotSerializable) -> tuple[bytes, ResultNotSerializable]:
        """The "not stored" record for a result the store refused (too large for it)."""
        return not_stored(self.key, self.opts.function, f"the store refused it: {exc}")

    def _not_stored(self, fence: int, problem: ResultNotSerializable) -> None:
        # The caller keeps its value; duplicates get ``problem``. Reported, never silent.
        self.idem._emit(_E_RESULT_NOT_STORED, self.key, self.opts.function, fence, problem)

    def _settle_failed(self, error: BaseException, failure: Exception) -> None:
        """Settling the claim after the work raised ``error`` failed with ``failure``.

        ``error`` stays what the caller sees: a caller that retries on StoreUnavailable must
        not re-run an operation that failed for good. ``failure`` is attached as a note,
        emitted as a ``store_error`` event and logged.
        """
        if isinstance(failure, LeaseLost):
            # Already emitted as lease_lost: another worker holds the key now.
            error.add_note(
                f"idem-core: settling the claim on {self.key!r} after this error failed: "
                f"{failure!r}"
            )
            return
        error.add_note(
            f"idem-core: settling the claim on {self.key!r} after this error failed: "
            f"{failure!r}; the key stays held until its lease ends"
        )
        self.idem._emit(_E_STORE_ERROR, self.key, self.opts.function, self.fence, failure)
        if not isinstance(failure, IdempotencyError):  # a raw driver error: a backend bug
            logger.error(
                "settling the claim on %r after an error failed", self.key, exc_info=failure
            )

    def _check_held(self) -> int:
        if self._done:
            raise RuntimeError(f"the call for {self.key!r} is already finished")
        if self.fence is None:
            raise RuntimeError(f"the call for {self.key!r} does not hold a claim")
        if self.lease_lost is not None:
            raise self.lease_lost
        return self.fence

    def key_for(self, step: str) -> str:
        """A key for ``step`` derived from this record's key and the step's name: the same
        on every attempt and takeover, to pass to a third-party API as its idempotency key."""
        return derived_key(self.key, step)

    def _lost(self, exc: LeaseLost) -> LeaseLost:
        self._done = True
        self.idem._emit(_E_LEASE_LOST, self.key, self.opts.function, self.fence, exc)
        return exc


def _backoff(delay: float) -> tuple[float, float]:
    return delay * (0.5 + random.random()), min(delay * 2, _POLL_MAX)


class Call(_Steps):
    """A synchronous idempotent execution; use it through ``Idempotency.claim``."""

    __slots__ = ("_renewer", "_step_runner", "_store")

    def __init__(
        self, idem: Idempotency, store: Store, request: ClaimRequest, opts: Options
    ) -> None:
        super().__init__(idem, request, opts)
        self._store = store
        self._renewer: _Renewer | None = None
        self._step_runner: StepRunner | None = None

    def step(
        self, name: str, fn: Callable[[], T], *, result_type: Any = Any, connection: Any = None
    ) -> T:
        """Run ``fn`` once for this key and step ``name`` (see :mod:`idem_core.steps`): a
        step recorded by an earlier holder returns its stored result without running.
        ``connection`` records the step inside the caller's transaction (SQL stores)."""
        runner = self._step_runner
        if runner is None:
            runner = self._step_runner = StepRunner(self)
        return runner.run(name, fn, result_type, connection)

    def enter(self, first: ClaimResult | StoreUnavailable | None = None) -> Call:
        """Claim and settle the outcome; ``first`` is the result of a first try at the claim."""
        if self.idem._cache is not None:
            cached = self.idem._recall(self.request)
            if cached is not None:
                self._replay_cached(cached)
                return self
        try:
            if isinstance(first, ClaimResult):
                res = first
            elif first is None:
                res = self.idem._retry(self._store.claim, self.request)
            elif self.idem.retries:
                res = self.idem._retry(self._store.claim, self.request, _spent=1)
            else:
                raise first
        except StoreUnavailable as exc:
            if self._fail_open(exc):
                return self
            raise
        if self._settle(res):
            self._wait()
        if self.fence is not None and self.opts.renew_every:
            self._renewer = _Renewer(self)
        return self

    def _wait(self) -> None:
        deadline = time.monotonic() + self.opts.wait_timeout
        waiter = getattr(self._store, "wait_for_change", None)
        delay = _POLL_FIRST
        self.idem._emit(_E_WAITING, self.key, self.opts.function)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AlreadyInProgress(self.key, self._record)
            if waiter is not None and self._record is not None:
                waiter(self.key, self._record.fence, min(remaining, _WAIT_SLICE))
            else:
                pause, delay = _backoff(delay)
                time.sleep(min(pause, remaining))
            if not self._settle(self.idem._retry(self._store.claim, self.request)):
                return

    def complete(self, value: Any, *, with_items: Sequence[Any] | None = None) -> None:
        """Store ``value`` as the result; duplicates replay it from now on."""
        self._finish(value, None, with_items)

    def _finish(
        self, value: Any, error: BaseException | None, with_items: Sequence[Any] | None = None
    ) -> None:
        if self.unprotected:
            self._done = True
            return
        fence = self._check_held()
        if self._renewer is not None:
            self._stop_renewer()
            if self.lease_lost is not None:
                raise self._lost(self.lease_lost)
        problem: ResultNotSerializable | None = None
        if error is None:
            try:
                data = self.opts.codec.encode(value, self.opts.function, self.key)
            except ResultNotSerializable as exc:
                data, problem = self._unstorable(exc)
        else:
            cached = self._error_payload(error)
            if cached is None:
                self.release()
                return
            data = cached
        try:
            rec = self._complete(fence, data, with_items)
        except ResultNotSerializable as exc:
            # The store refused the bytes (too large for it) and wrote nothing.
            if error is not None or problem is not None:
                self.release()  # not even the small record fits: free the key
                raise
            data, problem = self._refused(exc)
            try:
                rec = self._complete(fence, data, with_items)
            except ResultNotSerializable:
                self.release()  # not even the small record fits: free the key
                raise exc from None
        self._done = True
        idem = self.idem
        idem._emit(_E_COMPLETED, self.key, self.opts.function, fence)
        if problem is not None:
            self._not_stored(fence, problem)
        if idem._cache is not None:
            idem._cache.put(self.key, rec)

    def _complete(self, fence: int, data: bytes, with_items: Sequence[Any] | None) -> Record:
        store = self._store
        try:
            try:
                if with_items is None:
                    return store.complete(self.key, fence, data, self.opts.ttl)
                return store.complete(self.key, fence, data, self.opts.ttl, with_items=with_items)
            except StoreUnavailable:
                if not self.idem.retries:
                    raise
                return self.idem._retry(
                    store.complete,
                    self.key,
                    fence,
                    data,
                    self.opts.ttl,
                    with_items=with_items,
                    _spent=1,
                )
        except LeaseLost as exc:
            raise self._lost(exc) from None

    def _abort(self, error: BaseException) -> None:
        """Settle the claim after the work raised ``error``: store it (``cache_errors``) or
        release the key. Never raises in place of ``error`` (see ``_settle_failed``)."""
        if self._done or self.fence is None:
            self._stop_renewer()
            return
        try:
            self._finish(None, error)
        except Exception as failure:
            self._settle_failed(error, failure)

    def release(self) -> None:
        """Give the claim up so the next duplicate runs."""
        if self._done or self.fence is None or self.unprotected:
            return
        self._stop_renewer()
        self._done = True
        try:
            self.idem._retry(self._store.release, self.key, self.fence)
        except LeaseLost as exc:
            self._lost(exc)
            return
        self.idem._emit(_E_RELEASED, self.key, self.opts.function, self.fence)

    def _stop_renewer(self) -> None:
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None

    def __enter__(self) -> Call:
        return self.enter() if self.outcome is None else self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self._abort(exc)
            return
        if self._done or self.fence is None:
            self._stop_renewer()
            return

        logger.warning("claim on %r ended without complete(); released", self.key)
        self.release()


class _Renewer:
    """Extends a sync call's lease every ``renew_every`` seconds on a daemon thread."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idem-renew", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        call = self._call
        every = call.opts.renew_every or 1.0
        while not self._stop.wait(every):
            try:
                call._store.renew(call.key, call.fence or 0, call.opts.lease)
            except LeaseLost as exc:
                call.lease_lost = exc
                return
            except StoreUnavailable as exc:
                call.idem._emit(_E_STORE_ERROR, call.key, call.opts.function, error=exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class AsyncCall(_Steps):
    """The asyncio twin of :class:`Call`; use it through ``Idempotency.aclaim``."""

    __slots__ = ("_renewer", "_step_runner", "_store")

    def __init__(
        self, idem: Idempotency, store: AsyncStore, request: ClaimRequest, opts: Options
    ) -> None:
        super().__init__(idem, request, opts)
        self._store = store
        self._renewer: asyncio.Task[None] | None = None
        self._step_runner: AsyncStepRunner | None = None

    async def astep(
        self,
        name: str,
        fn: Callable[[], Awaitable[T]] | Callable[[], T],
        *,
        result_type: Any = Any,
        connection: Any = None,
    ) -> T:
        """The twin of :meth:`Call.step`; ``fn`` may be a coroutine function."""
        runner = self._step_runner
        if runner is None:
            runner = self._step_runner = AsyncStepRunner(self)
        return await runner.run(name, fn, result_type, connection)

    async def enter(self) -> AsyncCall:
        cached = self.idem._recall(self.request)
        if cached is not None:
            self._replay_cached(cached)
            return self
        try:
            res = await self.idem._aretry(self._store.claim, self.request)
        except StoreUnavailable as exc:
            if self._fail_open(exc):
                return self
            raise
        if self._settle(res):
            await self._wait()
        if self.fence is not None and self.opts.renew_every:
            self._renewer = _asyncio().ensure_future(self._renew())
        return self

    async def _wait(self) -> None:
        deadline = time.monotonic() + self.opts.wait_timeout
        waiter = getattr(self._store, "wait_for_change", None)
        delay = _POLL_FIRST
        self.idem._emit(_E_WAITING, self.key, self.opts.function)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AlreadyInProgress(self.key, self._record)
            if waiter is not None and self._record is not None:
                await waiter(self.key, self._record.fence, min(remaining, _WAIT_SLICE))
            else:
                pause, delay = _backoff(delay)
                await _asyncio().sleep(min(pause, remaining))
            if not self._settle(await self.idem._aretry(self._store.claim, self.request)):
                return

    async def _renew(self) -> None:
        every = self.opts.renew_every or 1.0
        while True:
            await _asyncio().sleep(every)
            try:
                await self._store.renew(self.key, self.fence or 0, self.opts.lease)
            except LeaseLost as exc:
                self.lease_lost = exc
                return
            except StoreUnavailable as exc:
                self.idem._emit(_E_STORE_ERROR, self.key, self.opts.function, error=exc)

    async def _stop_renewer(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(_asyncio().CancelledError):
                await task

    async def complete(self, value: Any, *, with_items: Sequence[Any] | None = None) -> None:
        await self._finish(value, None, with_items)

    async def _finish(
        self, value: Any, error: BaseException | None, with_items: Sequence[Any] | None = None
    ) -> None:
        if self.unprotected:
            self._done = True
            return
        fence = self._check_held()
        if self._renewer is not None:
            await self._stop_renewer()
            if self.lease_lost is not None:
                raise self._lost(self.lease_lost)
        problem: ResultNotSerializable | None = None
        if error is None:
            try:
                data = self.opts.codec.encode(value, self.opts.function, self.key)
            except ResultNotSerializable as exc:
                data, problem = self._unstorable(exc)
        else:
            cached = self._error_payload(error)
            if cached is None:
                await self.release()
                return
            data = cached
        try:
            rec = await self._complete(fence, data, with_items)
        except ResultNotSerializable as exc:
            # The store refused the bytes (too large for it) and wrote nothing.
            if error is not None or problem is not None:
                await self.release()  # not even the small record fits: free the key
                raise
            data, problem = self._refused(exc)
            try:
                rec = await self._complete(fence, data, with_items)
            except ResultNotSerializable:
                await self.release()  # not even the small record fits: free the key
                raise exc from None
        self._done = True
        self.idem._emit(_E_COMPLETED, self.key, self.opts.function, fence)
        if problem is not None:
            self._not_stored(fence, problem)
        self.idem._remember(self.key, rec)

    async def _complete(self, fence: int, data: bytes, with_items: Sequence[Any] | None) -> Record:
        try:
            return await self.idem._aretry(
                self._store.complete, self.key, fence, data, self.opts.ttl, with_items=with_items
            )
        except LeaseLost as exc:
            raise self._lost(exc) from None

    async def _abort(self, error: BaseException) -> None:
        """Settle the claim after the work raised ``error``: store it (``cache_errors``) or
        release the key. Never raises in place of ``error`` (see ``_settle_failed``)."""
        if self._done or self.fence is None:
            await self._stop_renewer()
            return
        try:
            await self._finish(None, error)
        except Exception as failure:
            self._settle_failed(error, failure)

    async def release(self) -> None:
        if self._done or self.fence is None or self.unprotected:
            return
        await self._stop_renewer()
        self._done = True
        try:
            await self.idem._aretry(self._store.release, self.key, self.fence)
        except LeaseLost as exc:
            self._lost(exc)
            return
        self.idem._emit(_E_RELEASED, self.key, self.opts.function, self.fence)

    async def __aenter__(self) -> AsyncCall:
        return await self.enter() if self.outcome is None else self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            await self._abort(exc)
            return
        if self._done or self.fence is None:
            await self._stop_renewer()
            return

        logger.warning("claim on %r ended without complete(); released", self.key)
        await self.release()
