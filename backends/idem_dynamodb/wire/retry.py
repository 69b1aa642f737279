"""botocore's standard retry mode, for the lean path: the same retryable errors, the same
backoff (full jitter, ``rand * min(2 ** (attempt - 1), 20)`` seconds), the same total number
of attempts (``max_attempts``) and the same retry quota (500 units per client: a retry costs
5, after a timeout 10; a first-try success gives 1 back, a success after retries what it
took), so that a struggling server is not hammered by every caller at once."""

from __future__ import annotations

import random
import threading

from .protocol import ServiceError

THROTTLING = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)
TRANSIENT_CODES = frozenset(
    {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"}
)
TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
_CAPACITY = 500
_COST = 5
_TIMEOUT_COST = 10
_MAX_BACKOFF = 20.0


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, ServiceError):
        return (
            exc.code in THROTTLING or exc.code in TRANSIENT_CODES or exc.status in TRANSIENT_STATUS
        )
    # A broken or timed-out connection (OSError covers timeouts, resets and TLS errors).
    return isinstance(exc, OSError)


def _cost(exc: BaseException) -> int:
    return _TIMEOUT_COST if isinstance(exc, TimeoutError) else _COST


class Retries:
    """The retry policy and quota of one client, shared by its threads or tasks."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts
        self.quota = _CAPACITY
        self._lock = threading.Lock()

    def delay(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None: give up with ``exc``."""
        if attempt >= self.max_attempts or not retryable(exc):
            return None
        cost = _cost(exc)
        with self._lock:
            if self.quota < cost:
                return None
            self.quota -= cost
        return random.random() * min(2.0 ** (attempt - 1), _MAX_BACKOFF)

    def succeeded(self, exc: BaseException | None) -> None:
        """A 2xx reply; ``exc`` is what the previous attempt failed with, if any."""
        back = _cost(exc) if exc is not None else 1
        with self._lock:
            self.quota = min(_CAPACITY, self.quota + back)

    @staticmethod
    def gave_up(exc: BaseException, attempt: int) -> BaseException:
        """``exc`` as raised after ``attempt`` attempts (botocore names the retries)."""
        if isinstance(exc, ServiceError) and attempt > 1:
            return ServiceError(exc.operation, exc.status, exc.response, attempt - 1)
        return exc
