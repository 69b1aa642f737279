"""The transition rules of idempotency records, written once.

Every store applies these rules atomically (one lock, one script, one conditional statement);
this module is the reference they are checked against by :mod:`idem_core.testing`.

A record is *live* while ``now < expires_at``; an expired record counts as absent, except
that its fence still seeds the next one. The *holder* of a record is whoever has its current
``fence`` while it is ``IN_PROGRESS``, live and not released.

claim(key, fingerprint, attempt, lease, ttl):

=====================================================  ==============  ====================
current record                                         outcome         write
=====================================================  ==============  ====================
none, or expired                                       CLAIMED         new IN_PROGRESS
IN_PROGRESS, released (``lease_expires_at == 0``)      CLAIMED         new IN_PROGRESS
IN_PROGRESS, lease lapsed (``lease_expires_at<=now``)  TOOK_OVER       new IN_PROGRESS
IN_PROGRESS, live lease, same ``attempt``              CLAIMED         none (retried claim)
live, different fingerprint                            MISMATCH        none
IN_PROGRESS, live lease                                IN_PROGRESS     none
COMPLETED                                              COMPLETED       none
=====================================================  ==============  ====================

A new IN_PROGRESS record gets ``fence = max(now, previous.fence + 1, floor)``: seeded from the
store's clock in microseconds so fences keep growing across expiry and deletion, and above the
previous fence whenever the store still has it. Its lease ends at ``now + lease`` and it
expires at ``now + max(lease, ttl)``.

complete(key, fence, result, ttl), release(key, fence), renew(key, fence, lease):

=========================================  =====================  ===================  ==========
current record                             complete               release              renew
=========================================  =====================  ===================  ==========
held with this fence                       COMPLETED, expires     released (lease 0)   lease
                                           at ``now + ttl``                            extended
COMPLETED with this fence (retried call)   no-op, succeeds        LeaseLost            LeaseLost
released with this fence (retried call)    LeaseLost              no-op, succeeds      LeaseLost
none or expired                            LeaseLost              no-op, succeeds      LeaseLost
any other fence                            LeaseLost              LeaseLost            LeaseLost
=========================================  =====================  ===================  ==========

A lapsed lease that nobody took over is still held: completing it is safe because the fence
is still the newest. ``LeaseLost`` always means nothing was changed.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec.structs

from .errors import LeaseLost
from .record import (
    MICROS,
    RELEASED,
    ClaimOutcome,
    ClaimRequest,
    ClaimResult,
    Record,
    Status,
    micros,
)

# Enum members looked up once: a class attribute lookup costs ~0.1 us on the hot path.
_IN_PROGRESS = Status.IN_PROGRESS
_COMPLETED = Status.COMPLETED
_CLAIMED = ClaimOutcome.CLAIMED
_TOOK_OVER = ClaimOutcome.TOOK_OVER
_O_IN_PROGRESS = ClaimOutcome.IN_PROGRESS
_O_COMPLETED = ClaimOutcome.COMPLETED
_MISMATCH = ClaimOutcome.MISMATCH


class ClaimDecision(NamedTuple):
    result: ClaimResult
    #: the record to store, or None when the claim changes nothing
    write: Record | None


def next_fence(previous: Record | None, now: int, floor: int = 0) -> int:
    if previous is None:
        return max(now, floor)
    return max(now, previous.fence + 1, floor)


def takeable(current: Record | None, now: int) -> bool:
    """Whether a claim may overwrite ``current`` (the condition every adapter's write uses)."""
    return (
        current is None
        or current.expires_at <= now
        or (current.status is _IN_PROGRESS and current.lease_expires_at <= now)
    )


def new_claim(
    current: Record | None, request: ClaimRequest, now: int, floor: int = 0
) -> tuple[ClaimOutcome, Record]:
    """The record a successful claim writes, and whether that was a takeover."""
    lease_us = int(request.lease * MICROS)
    took_over = (
        current is not None
        and current.expires_at > now
        and current.status is _IN_PROGRESS
        and current.lease_expires_at != RELEASED
    )
    # Positional: cheaper than keywords on the hot path. The order is Record's field order:
    # key, status, fingerprint, fence, lease_expires_at, expires_at, attempt, created_at,
    # updated_at.
    record = Record(
        request.key,
        _IN_PROGRESS,
        request.fingerprint,
        max(now, floor) if current is None else max(now, current.fence + 1, floor),
        now + lease_us,
        now + max(lease_us, int(request.ttl * MICROS)),
        request.attempt,
        now,
        now,
    )
    return (_TOOK_OVER if took_over else _CLAIMED), record


def classify(current: Record, request: ClaimRequest, now: int) -> ClaimOutcome:
    """The outcome of a claim that found ``current`` live and not takeable."""
    if current.status is _IN_PROGRESS and current.attempt == request.attempt:
        return _CLAIMED
    if current.fingerprint != request.fingerprint:
        return _MISMATCH
    if current.status is _IN_PROGRESS:
        return _O_IN_PROGRESS
    return _O_COMPLETED


def decide_claim(
    current: Record | None, request: ClaimRequest, now: int, floor: int = 0
) -> ClaimDecision:
    if takeable(current, now):
        outcome, record = new_claim(current, request, now, floor)
        return ClaimDecision(ClaimResult(outcome, record), record)
    assert current is not None
    return ClaimDecision(ClaimResult(classify(current, request, now), current), None)


def holds(current: Record | None, fence: int, now: int) -> bool:
    """Whether ``fence`` is the holder of ``current`` (the condition of complete/renew)."""
    return (
        current is not None
        and current.status is _IN_PROGRESS
        and current.fence == fence
        and current.lease_expires_at != RELEASED
        and current.expires_at > now
    )


def completed(current: Record, result: bytes, ttl: float, now: int) -> Record:
    return msgspec.structs.replace(
        current,
        status=_COMPLETED,
        expires_at=now + int(ttl * MICROS),
        updated_at=now,
        result=result,
    )


def renewed(current: Record, lease: float, now: int) -> Record:
    lease_end = now + micros(lease)
    return msgspec_replace(
        current,
        lease_expires_at=lease_end,
        expires_at=max(current.expires_at, lease_end),
        updated_at=now,
    )


def released(current: Record, now: int) -> Record:
    return msgspec_replace(current, lease_expires_at=RELEASED, updated_at=now)


def decide_complete(
    current: Record | None, key: str, fence: int, result: bytes, ttl: float, now: int
) -> Record:
    """The record to write, or raise LeaseLost. See :func:`after_failed_complete` for retries."""
    if holds(current, fence, now):
        assert current is not None
        return completed(current, result, ttl, now)
    return after_failed_complete(current, key, fence, now)


def after_failed_complete(current: Record | None, key: str, fence: int, now: int) -> Record:
    """Interpret a complete whose condition failed: a retry that was applied succeeds."""
    if (
        current is not None
        and current.status is _COMPLETED
        and current.fence == fence
        and current.expires_at > now
    ):
        return current
    raise LeaseLost(key, fence, _why(current, fence, now))


def after_failed_release(current: Record | None, key: str, fence: int, now: int) -> None:
    """Interpret a release whose condition failed: gone or already released by us succeeds."""
    if current is None or current.expires_at <= now:
        return
    if current.fence == fence and current.released:
        return
    raise LeaseLost(key, fence, _why(current, fence, now))


def after_failed_renew(current: Record | None, key: str, fence: int, now: int) -> Record:
    raise LeaseLost(key, fence, _why(current, fence, now))


def _why(current: Record | None, fence: int, now: int) -> str:
    if current is None or current.expires_at <= now:
        return "the record is gone or expired"
    if current.fence != fence:
        return f"another worker holds fence {current.fence}"
    if current.status is _COMPLETED:
        return "the record is already completed"
    return "the record was released"


def msgspec_replace(record: Record, **changes: int) -> Record:
    return msgspec.structs.replace(record, **changes)
