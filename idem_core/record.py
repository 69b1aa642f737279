"""Idempotency records and the values exchanged with stores.

Times are integer microseconds since the Unix epoch, read from the store's clock where it has
one. Durations given to stores are float seconds.
"""

from __future__ import annotations

import enum

import msgspec

#: ``lease_expires_at`` of a record whose holder released it: the next claim takes it at once.
RELEASED = 0

MICROS = 1_000_000


class Status(enum.Enum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class ClaimOutcome(enum.Enum):
    """What a claim found and did. Only CLAIMED and TOOK_OVER hand the caller a fence."""

    CLAIMED = "claimed"
    TOOK_OVER = "took_over"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    MISMATCH = "mismatch"

    @property
    def acquired(self) -> bool:
        return self is _CLAIMED or self is _TOOK_OVER


# Enum members looked up once: a class attribute lookup costs ~0.1 us on the hot path.
_IN_PROGRESS = Status.IN_PROGRESS
_CLAIMED = ClaimOutcome.CLAIMED
_TOOK_OVER = ClaimOutcome.TOOK_OVER


class Record(msgspec.Struct, frozen=True, gc=False):
    """One idempotency record, as a store holds it."""

    key: str
    status: Status
    fingerprint: str
    fence: int
    lease_expires_at: int
    expires_at: int
    attempt: str
    created_at: int
    updated_at: int
    result: bytes | None = None

    def expired(self, now: int) -> bool:
        return self.expires_at <= now

    @property
    def released(self) -> bool:
        return self.status is _IN_PROGRESS and self.lease_expires_at == RELEASED

    def lease_live(self, now: int) -> bool:
        return self.status is _IN_PROGRESS and self.lease_expires_at > now


class ClaimRequest(msgspec.Struct, frozen=True, gc=False):
    """A claim. ``attempt`` is unique per call: a retried claim that was applied is recognised."""

    key: str
    fingerprint: str
    attempt: str
    lease: float
    ttl: float


class ClaimResult(msgspec.Struct, frozen=True, gc=False):
    outcome: ClaimOutcome
    record: Record

    @property
    def fence(self) -> int:
        return self.record.fence


def micros(seconds: float) -> int:
    return int(seconds * MICROS)
