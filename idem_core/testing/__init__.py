"""Tools to prove a store correct: the conformance suite, fault injection and races.

Needs pytest and hypothesis (``pip install 'idem-core[dev]'`` or your own test dependencies).
"""

from __future__ import annotations

from .assertions import (
    FakeLambdaContext,
    IdempotencyReport,
    aassert_idempotent,
    assert_idempotent,
    idempotency,
    lambda_context,
)
from .faults import AsyncFaultyStore, FaultyStore
from .race import process_race, task_race, thread_race
from .suite import AsyncStoreSuite, StoreSuite

__all__ = [
    "FakeLambdaContext",
    "IdempotencyReport",
    "aassert_idempotent",
    "assert_idempotent",
    "idempotency",
    "lambda_context",
    "AsyncFaultyStore",
    "AsyncStoreSuite",
    "FaultyStore",
    "StoreSuite",
    "process_race",
    "task_race",
    "thread_race",
]
