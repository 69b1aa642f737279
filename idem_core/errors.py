"""The error hierarchy: one base class, one small class per domain outcome."""

from __future__ import annotations

from typing import Any


class IdempotencyError(Exception):
    """Base class of every error idem-core raises."""


class ConfigurationError(IdempotencyError):
    """A URL, option or installation problem found before any work is done."""


class KeyMissing(IdempotencyError, ValueError):
    """The idempotency key could not be built: empty, not a string, or its argument is missing."""


class AlreadyInProgress(IdempotencyError):
    """Another worker holds a live lease on this key."""

    def __init__(self, key: str, record: Any = None) -> None:
        super().__init__(f"an execution for key {key!r} is already in progress")
        self.key = key
        self.record = record


class PayloadMismatch(IdempotencyError):
    """The key was seen before with a different payload."""

    def __init__(self, key: str, record: Any = None) -> None:
        super().__init__(
            f"key {key!r} was already used with a different payload; "
            "use a new key for a different request"
        )
        self.key = key
        self.record = record


class LeaseLost(IdempotencyError):
    """The caller no longer holds the record: its fence is stale, it was released or it expired.

    Nothing was changed by the operation that raised it.
    """

    def __init__(self, key: str, fence: int, detail: str = "") -> None:
        msg = f"lease on key {key!r} with fence {fence} is no longer held"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.key = key
        self.fence = fence


class StoreUnavailable(IdempotencyError):
    """The store could not be reached or failed; the original driver error is the ``__cause__``."""


class CorruptRecord(IdempotencyError):
    """A stored record or result could not be decoded. It is left untouched."""


class ResultNotSerializable(IdempotencyError, TypeError):
    """A result could not be stored: not encodable, not of the declared type, or refused by
    the store (too large). The function ran once: its caller got the value (and a
    ``result_not_stored`` event); duplicates raise this error instead of running it again."""


class ReplayedError(IdempotencyError):
    """A cached error whose original exception type could not be rebuilt on replay."""

    def __init__(self, type_name: str, args: tuple[Any, ...]) -> None:
        super().__init__(f"{type_name}{args!r}")
        self.type_name = type_name
        self.original_args = args
