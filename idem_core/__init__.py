"""idem-core: make any operation safe to retry."""

from __future__ import annotations

from .api import CallSettings, Idempotency
from .call import AsyncCall, Call
from .clock import Clock, ManualClock, SkewedClock, system_clock
from .errors import (
    AlreadyInProgress,
    ConfigurationError,
    CorruptRecord,
    IdempotencyError,
    KeyMissing,
    LeaseLost,
    PayloadMismatch,
    ReplayedError,
    ResultNotSerializable,
    StoreUnavailable,
)
from .events import Event, EventKind
from .record import RELEASED, ClaimOutcome, ClaimRequest, ClaimResult, Record, Status
from .registry import open_async_store, open_store, register
from .results import ResultTypeWarning
from .steps import current_acall, current_call
from .store import AsyncStore, Backend, Store

__version__ = "0.1.0"

__all__ = [
    "AsyncCall",
    "Call",
    "CallSettings",
    "Event",
    "EventKind",
    "Idempotency",
    "RELEASED",
    "AlreadyInProgress",
    "AsyncStore",
    "Backend",
    "ClaimOutcome",
    "ClaimRequest",
    "ClaimResult",
    "Clock",
    "ConfigurationError",
    "CorruptRecord",
    "IdempotencyError",
    "KeyMissing",
    "LeaseLost",
    "ManualClock",
    "PayloadMismatch",
    "Record",
    "ReplayedError",
    "ResultNotSerializable",
    "ResultTypeWarning",
    "SkewedClock",
    "Status",
    "Store",
    "StoreUnavailable",
    "current_acall",
    "current_call",
    "open_async_store",
    "open_store",
    "register",
    "system_clock",
]
