"""Operators' tools: read, list, release and forget records (``idem inspect/ls/stuck/
release/forget`` and ``Idempotency.inspect/forget/release``).

Nothing here changes a record behind a live holder's back: :func:`release` releases a
lapsed lease, or the fence an operator names (read from ``idem inspect``), and goes through
the store's own ``release(key, fence)``, which refuses a fence that is no longer current.
"""

from __future__ import annotations

import datetime
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError, IdempotencyError
from .events import Emitter, EventKind
from .record import MICROS, RELEASED, Record, Status
from .scanning import DEFAULT_PAGE, ScanFilter
from .store import AsyncStore, Store


class RecordNotFound(IdempotencyError, LookupError):
    """No live record under this key."""


class ReleaseRefused(IdempotencyError):
    """The record cannot be released as asked (completed, a live lease without its fence,
    or a fence that is not the current one)."""


class ScanUnsupported(IdempotencyError):
    """The store has no ``scan``: it cannot list its records."""


def when(micros: int) -> datetime.datetime:
    """A store time (microseconds since the epoch) as an aware UTC datetime."""
    return datetime.datetime.fromtimestamp(micros / MICROS, tz=datetime.UTC)


@dataclass(frozen=True)
class RecordInfo:
    """A record as an operator reads it (``Idempotency.inspect``, ``idem inspect``)."""

    key: str
    status: str
    #: ``live``, ``lapsed`` or ``released`` for a record in progress; None once completed
    lease: str | None
    fence: int
    fingerprint: str
    attempt: str
    lease_expires_at: datetime.datetime | None
    expires_at: datetime.datetime
    created_at: datetime.datetime
    updated_at: datetime.datetime
    #: the store's clock when the record was read
    read_at: datetime.datetime
    #: the stored result: decoded when a type was given, raw bytes otherwise (None while in
    #: progress, and in ``ls`` listings)
    result: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime.datetime):
                value = value.isoformat()
            elif isinstance(value, bytes):
                value = value.hex()
                name = "result_hex"
            out[name] = value
        return out


def lease_state(rec: Record, now: int) -> str | None:
    if rec.status is not Status.IN_PROGRESS:
        return None
    if rec.lease_expires_at == RELEASED:
        return "released"
    return "live" if rec.lease_expires_at > now else "lapsed"


def describe(rec: Record, now: int, result: Any = None) -> RecordInfo:
    return RecordInfo(
        key=rec.key,
        status=rec.status.value,
        lease=lease_state(rec, now),
        fence=rec.fence,
        fingerprint=rec.fingerprint,
        attempt=rec.attempt,
        lease_expires_at=(
            when(rec.lease_expires_at)
            if rec.status is Status.IN_PROGRESS and rec.lease_expires_at != RELEASED
            else None
        ),
        expires_at=when(rec.expires_at),
        created_at=when(rec.created_at),
        updated_at=when(rec.updated_at),
        read_at=when(now),
        result=result,
    )


def _info(key: str, rec: Record | None, now: int, result_type: Any) -> RecordInfo:
    if rec is None:
        raise RecordNotFound(f"no record under key {key!r}")
    result: Any = rec.result
    if result is not None and result_type is not None:
        from .codec import ResultCodec

        result = ResultCodec(result_type).decode(result, key)
    return describe(rec, now, result)


def _fence_to_release(key: str, rec: Record | None, now: int, fence: int | None) -> int:
    """The fence ``release`` may release, or why not (the rule of :func:`release`)."""
    if fence is not None and (isinstance(fence, bool) or not isinstance(fence, int)):
        raise ConfigurationError(f"fence must be an int, got {fence!r}")
    if rec is None:
        raise RecordNotFound(f"no record under key {key!r}")
    state = lease_state(rec, now)
    if state is None:
        raise ReleaseRefused(
            f"{key!r} is completed (fence {rec.fence}): there is no claim to release; "
            "forget the key to make the next call run again"
        )
    if state == "released":
        raise ReleaseRefused(f"{key!r} is already released (fence {rec.fence})")
    if fence is None:
        if state == "live":
            left = (rec.lease_expires_at - now) / MICROS
            raise ReleaseRefused(
                f"{key!r} is held by a live lease (fence {rec.fence}, {left:.1f} s left): "
                f"name the fence to release it anyway (--fence {rec.fence})"
            )
        return rec.fence
    if fence != rec.fence:
        raise ReleaseRefused(
            f"{key!r} is held with fence {rec.fence}, not {fence}: nothing released"
        )
    return fence


def inspect(store: Store, key: str, result_type: Any = None) -> RecordInfo:
    """The live record under ``key`` (``RecordNotFound`` if none); its result decoded as
    ``result_type`` when given, raw bytes otherwise."""
    rec = store.get(key)
    return _info(key, rec, store.now(), result_type)


def forget(store: Store, key: str, emit: Emitter | None = None) -> bool:
    """Delete the record under ``key`` whatever its state; True if there was one. A call
    still running under it will fail to complete (``LeaseLost``) and the next call runs."""
    existed = store.get(key) is not None
    store.delete(key)
    if emit is not None:
        emit(EventKind.FORGOTTEN, key, "operator")
    return existed


def release(
    store: Store, key: str, fence: int | None = None, emit: Emitter | None = None
) -> RecordInfo:
    """Release the claim on ``key`` so the next call runs at once.

    Without ``fence`` only a lapsed lease is released; a live one needs its fence named
    (``idem inspect`` shows it), so a running call is never cut off by accident. The store
    releases only if the fence is still the current one (``LeaseLost`` otherwise)."""
    rec = store.get(key)
    fence = _fence_to_release(key, rec, store.now(), fence)
    store.release(key, fence)
    if emit is not None:
        emit(EventKind.RELEASED_BY_OPERATOR, key, "operator", fence)
    after = store.get(key)
    return _info(key, after or rec, store.now(), None)


# The asyncio twins: the same decisions (``_info``, ``_fence_to_release``), awaited I/O.


async def ainspect(store: AsyncStore, key: str, result_type: Any = None) -> RecordInfo:
    rec = await store.get(key)
    return _info(key, rec, await store.now(), result_type)


async def aforget(store: AsyncStore, key: str, emit: Emitter | None = None) -> bool:
    existed = await store.get(key) is not None
    await store.delete(key)
    if emit is not None:
        emit(EventKind.FORGOTTEN, key, "operator")
    return existed


async def arelease(
    store: AsyncStore, key: str, fence: int | None = None, emit: Emitter | None = None
) -> RecordInfo:
    rec = await store.get(key)
    fence = _fence_to_release(key, rec, await store.now(), fence)
    await store.release(key, fence)
    if emit is not None:
        emit(EventKind.RELEASED_BY_OPERATOR, key, "operator", fence)
    after = await store.get(key)
    return _info(key, after or rec, await store.now(), None)


def scanner(store: Any) -> Any:
    fn = getattr(store, "scan", None)
    if fn is None:
        raise ScanUnsupported(f"{type(store).__name__} cannot list its records (no scan)")
    return fn


def scan(
    store: Store,
    where: ScanFilter,
    limit: int | None = None,
    page_size: int = DEFAULT_PAGE,
) -> Iterator[Record]:
    """Records ``where`` selects, streamed a page at a time (no results), at most ``limit``."""
    if limit is not None and limit < 1:
        raise ConfigurationError(f"limit must be at least 1, got {limit}")
    if page_size < 1:
        raise ConfigurationError(f"page_size must be at least 1, got {page_size}")
    pages = scanner(store)(where, page_size)
    count = 0
    for page in pages:
        for rec in page:
            if where.matches(rec):
                yield rec
                count += 1
                if limit is not None and count >= limit:
                    return


def stuck(
    store: Store, limit: int = 100, prefix: str = "", page_size: int = DEFAULT_PAGE
) -> tuple[list[Record], int]:
    """Records in progress whose lease lapsed and that no claim has taken over, the
    ``limit`` oldest lapses first, and the store's clock. Memory holds ``limit`` records
    plus one page, whatever the number of records."""
    if limit < 1:
        raise ConfigurationError(f"limit must be at least 1, got {limit}")
    now = store.now()
    where = ScanFilter(status=Status.IN_PROGRESS, prefix=prefix, alive_at=now, lapsed_at=now)
    heap: list[tuple[int, str, Record]] = []  # a max-heap on the lapse time, by negation
    for rec in scan(store, where, page_size=page_size):
        item = (-rec.lease_expires_at, rec.key, rec)
        if len(heap) < limit:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    return [rec for _, _, rec in sorted(heap, reverse=True)], now


def key_of(idem: Any, limit: int, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """See ``Idempotency.key_of``: the decorator's ``prepare``, or a handler's key code."""
    import inspect as pyinspect

    target = func
    if pyinspect.ismethod(func):
        target, args = func.__func__, (func.__self__, *args)
    owner = getattr(target, "__idem_owner__", None) or getattr(target, "idempotency", None)
    if owner is not None and owner is not idem:
        raise ConfigurationError(
            f"{getattr(func, '__qualname__', func)!r} is made idempotent by another "
            "Idempotency object: ask that one"
        )
    prepare = getattr(target, "__idem_prepare__", None)
    if prepare is not None:
        return str(prepare(args, kwargs, limit).key)
    stored = getattr(target, "__idem_key__", None)
    if stored is not None:
        if len(args) != 1 or kwargs:
            raise ConfigurationError("give a handler's key_of exactly one event or message")
        return str(stored(args[0]))
    raise ConfigurationError(
        f"{getattr(func, '__qualname__', func)!r} is not an idempotent function or handler"
    )
