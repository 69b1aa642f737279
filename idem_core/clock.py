"""Clocks for stores that judge leases by the client's time (memory, DynamoDB)."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> int:
        """Microseconds since the Unix epoch."""
        ...


def system_clock() -> int:
    return time.time_ns() // 1000


class ManualClock:
    """A clock that moves only when told to, for tests."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = int(start * 1_000_000)
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += int(seconds * 1_000_000)

    def set(self, seconds: float) -> None:
        with self._lock:
            self._now = int(seconds * 1_000_000)


class SkewedClock:
    """The system clock shifted by ``skew`` seconds: a worker whose clock is off."""

    def __init__(self, skew: float) -> None:
        self.skew_us = int(skew * 1_000_000)

    def __call__(self) -> int:
        return time.time_ns() // 1000 + self.skew_us
