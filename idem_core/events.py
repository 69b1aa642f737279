"""Every decision as a structured log record and an optional callback."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("idem_core")


class EventKind(enum.Enum):
    level: int

    CLAIMED = "claimed"
    TOOK_OVER = "took_over"
    REPLAYED = "replayed"
    IN_PROGRESS = "in_progress"
    WAITING = "waiting"
    MISMATCH = "mismatch"
    COMPLETED = "completed"
    RELEASED = "released"
    LEASE_LOST = "lease_lost"
    STORE_ERROR = "store_error"
    FAIL_OPEN = "fail_open"
    #: the function ran but its result could not be stored; duplicates raise
    #: ResultNotSerializable instead of running it again (``error`` says why)
    RESULT_NOT_STORED = "result_not_stored"
    #: an operator deleted the record (``idem forget``, ``Idempotency.forget``)
    FORGOTTEN = "forgotten"
    #: an operator released a claim so the next call runs again (``idem release``)
    RELEASED_BY_OPERATOR = "released_by_operator"


_LEVELS = {
    EventKind.CLAIMED: logging.DEBUG,
    EventKind.REPLAYED: logging.DEBUG,
    EventKind.COMPLETED: logging.DEBUG,
    EventKind.RELEASED: logging.DEBUG,
    EventKind.WAITING: logging.DEBUG,
    EventKind.TOOK_OVER: logging.INFO,
    EventKind.IN_PROGRESS: logging.INFO,
    EventKind.MISMATCH: logging.WARNING,
    EventKind.LEASE_LOST: logging.WARNING,
    EventKind.STORE_ERROR: logging.ERROR,
    EventKind.FAIL_OPEN: logging.ERROR,
    EventKind.RESULT_NOT_STORED: logging.WARNING,
    EventKind.FORGOTTEN: logging.WARNING,
    EventKind.RELEASED_BY_OPERATOR: logging.WARNING,
}


for _kind, _level in _LEVELS.items():
    # An attribute, not a dict lookup: hashing an Enum member costs a Python call.
    _kind.level = _level


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    key: str
    namespace: str
    function: str | None = None
    fence: int | None = None
    error: BaseException | None = None


EventHook = Callable[[Event], None]


class Emitter:
    """Sends events to the ``idem_core`` logger and the ``on_event`` hooks.

    Builds nothing when nobody listens, so the hot path pays one level check.
    """

    __slots__ = ("hooks", "namespace")

    def __init__(self, namespace: str, hooks: list[EventHook]) -> None:
        self.namespace = namespace
        self.hooks = hooks

    def __call__(
        self,
        kind: EventKind,
        key: str,
        function: str | None = None,
        fence: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        level = kind.level
        log = logger.isEnabledFor(level)
        if not log and not self.hooks:
            return
        event = Event(kind, key, self.namespace, function, fence, error)
        if log:
            logger.log(
                level,
                "idempotency %s: key=%s fence=%s%s",
                kind.value,
                key,
                fence,
                f" error={error!r}" if error is not None else "",
                extra={
                    "idem_event": kind.value,
                    "idem_key": key,
                    "idem_fence": fence,
                    "idem_namespace": self.namespace,
                    "idem_function": function,
                    "idem_error": None if error is None else type(error).__name__,
                },
            )
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("on_event hook failed for %s", kind.value)
