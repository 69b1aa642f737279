"""Recovery points: steps of one call that run once per key, and resume after a crash.

Inside a claim, ``call.step(name, fn)`` runs ``fn`` and records its result under the call's
fence before returning; a later holder of the same key (after a takeover, or a release) skips
every recorded step and gets its stored result back instead. ``call.key_for(name)`` is a key
derived from the record's key and the step's name, the same for every attempt, to give a
third-party API as its own idempotency key.

The store side is an optional capability, two methods looked up by name:

``record_step(key, fence, name, data, until) -> None``
    One atomic operation: store ``data`` as step ``name`` of ``key`` if and only if ``fence``
    holds the record (the condition of ``complete``); otherwise raise ``LeaseLost`` and write
    nothing. Writing a step again (a retried write that was applied) succeeds. ``until`` is
    the record's ``expires_at`` as the holder knows it: the step stands for its *generation*.
``load_steps(key) -> dict[str, tuple[int, bytes]]``
    Every recorded step of ``key``: name -> (until, data).

Generations. Steps outlive a takeover and a release (a release means the work failed: the
recorded steps did happen, and the retry resumes after them), and die with the record: a
record that expired (or was deleted) starts afresh. A step is part of the current record's
generation when its ``until`` is after the current record's ``created_at``: a record that
expired ended at or after every ``until`` written under it, and the next claim is later
still. (A call that renews its lease past its ttl writes later steps with the extended
expiry; only the steps written before that use the older bound.)
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .codec import ResultCodec
from .errors import ConfigurationError, LeaseLost

if TYPE_CHECKING:
    from .call import AsyncCall, Call, _Steps

T = TypeVar("T")

#: The call a decorated function runs in: ``current_call()`` inside ``@idem.idempotent``.
_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("idem_current_call", default=None)

_CODECS: dict[Any, ResultCodec] = {}


def current_call() -> Call:
    """The :class:`~idem_core.call.Call` of the ``@idem.idempotent`` function running now.

    Raises ``RuntimeError`` outside one (or inside an async one: use :func:`current_acall`).
    """
    from .call import Call

    call = _CURRENT.get()
    if not isinstance(call, Call):
        raise RuntimeError("current_call() is only available inside a sync @idempotent function")
    return call


def current_acall() -> AsyncCall:
    """The :class:`~idem_core.call.AsyncCall` of the async ``@idem.idempotent`` function
    running now (the twin of :func:`current_call`)."""
    from .call import AsyncCall

    call = _CURRENT.get()
    if not isinstance(call, AsyncCall):
        raise RuntimeError("current_acall() is only available inside an async @idempotent function")
    return call


def enter(call: Any) -> contextvars.Token[Any]:
    return _CURRENT.set(call)


def leave(token: contextvars.Token[Any]) -> None:
    _CURRENT.reset(token)


def derived_key(key: str, step: str) -> str:
    """A key for ``step`` of the record ``key``: the same on every attempt and takeover
    (it depends on neither the fence nor the attempt), 64 hex characters, so it fits any
    third-party API's idempotency key."""
    return hashlib.sha256(f"idem-step\x00{key}\x00{step}".encode()).hexdigest()


def codec_for(result_type: Any) -> ResultCodec:
    """The codec of a step's result type (shared; built once per type)."""
    try:
        codec = _CODECS.get(result_type)
    except TypeError:  # an unhashable annotation
        return ResultCodec(result_type)
    if codec is None:
        codec = _CODECS[result_type] = ResultCodec(result_type)
    return codec


def _capability(store: Any, name: str) -> Callable[..., Any]:
    method = getattr(store, name, None)
    if method is None:
        raise ConfigurationError(f"{type(store).__name__} does not support steps (no {name})")
    return method  # type: ignore[no-any-return]


def _check_name(name: object) -> str:
    if type(name) is not str or not name:
        raise ConfigurationError(f"a step name must be a non-empty string, got {name!r}")
    if len(name) > 200:
        raise ConfigurationError(f"a step name is at most 200 characters, got {len(name)}")
    return name


def _bound(call: _Steps, store: Any, connection: Any) -> Any:
    if connection is None:
        return store
    bind = getattr(store, "bind", None)
    if bind is None:
        raise ConfigurationError(
            f"{type(store).__name__} cannot record a step in a caller's transaction"
        )
    return bind(connection)


def _generation(call: _Steps, found: dict[str, tuple[int, bytes]]) -> dict[str, bytes]:
    record = call.record
    born = record.created_at if record is not None else 0
    return {name: data for name, (until, data) in found.items() if until > born}


def _until(call: _Steps) -> int:
    record = call.record
    assert record is not None
    return record.expires_at


class StepRunner:
    """The steps of one sync call (``Call.step`` delegates here)."""

    __slots__ = ("call", "recorded")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.recorded: dict[str, bytes] | None = None

    def load(self) -> dict[str, bytes]:
        if self.recorded is None:
            call = self.call
            found = call.idem._retry(_capability(call._store, "load_steps"), call.key)
            self.recorded = _generation(call, found)
        return self.recorded

    def run(self, name: str, fn: Callable[[], T], result_type: Any, connection: Any) -> T:
        call = self.call
        _check_name(name)
        if call.unprotected:  # fail-open: nothing is recorded, the step just runs
            return fn()
        fence = call._check_held()
        codec = codec_for(result_type)
        recorded = self.load()
        if name in recorded:
            value: T = codec.decode(recorded[name], call.key)
            return value
        value = fn()
        if call.lease_lost is not None:  # the renewer saw a takeover while fn ran
            raise call._lost(call.lease_lost)
        data = codec.encode(value, f"step {name!r}", call.key)
        store = _bound(call, call._store, connection)
        record = _capability(store, "record_step")
        try:
            if connection is None:
                call.idem._retry(record, call.key, fence, name, data, _until(call))
            else:  # inside the caller's transaction: a retry could not tell what committed
                record(call.key, fence, name, data, _until(call))
        except LeaseLost as exc:
            raise call._lost(exc) from None
        recorded[name] = data
        return value


class AsyncStepRunner:
    """The asyncio twin of :class:`StepRunner`."""

    __slots__ = ("call", "recorded")

    def __init__(self, call: AsyncCall) -> None:
        self.call = call
        self.recorded: dict[str, bytes] | None = None

    async def load(self) -> dict[str, bytes]:
        if self.recorded is None:
            call = self.call
            found = await call.idem._aretry(_capability(call._store, "load_steps"), call.key)
            self.recorded = _generation(call, found)
        return self.recorded

    async def run(
        self,
        name: str,
        fn: Callable[[], Awaitable[T]] | Callable[[], T],
        result_type: Any,
        connection: Any,
    ) -> T:
        call = self.call
        _check_name(name)
        if call.unprotected:
            ran: T = await _maybe_await(fn())
            return ran
        fence = call._check_held()
        codec = codec_for(result_type)
        recorded = await self.load()
        if name in recorded:
            value: T = codec.decode(recorded[name], call.key)
            return value
        value = await _maybe_await(fn())
        if call.lease_lost is not None:
            raise call._lost(call.lease_lost)
        data = codec.encode(value, f"step {name!r}", call.key)
        store = _bound(call, call._store, connection)
        record = _capability(store, "record_step")
        try:
            if connection is None:
                await call.idem._aretry(record, call.key, fence, name, data, _until(call))
            else:
                await record(call.key, fence, name, data, _until(call))
        except LeaseLost as exc:
            raise call._lost(exc) from None
        recorded[name] = data
        return value


async def _maybe_await(value: Any) -> Any:
    if isinstance(value, Awaitable):
        return await value
    return value
