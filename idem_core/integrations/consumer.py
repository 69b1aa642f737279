"""Queue consumers: apply each message once, whatever the broker redelivers.

``idem.consumer(dedup_id=...)`` wraps a message handler (sync or async). What the wrapped
handler does, and what the consumer loop should answer the broker:

==========================================  ===============================================
the wrapped handler                          ack / retry
==========================================  ===============================================
returns (first run, or a duplicate whose     **ack**: the message is applied, exactly once
result is replayed without running again)
raises the handler's exception (the claim    **nack and requeue** (or let the broker
is released, so a redelivery runs again)     redeliver): a retry runs the handler again
raises ``AlreadyInProgress`` (another        **nack and requeue, later**: if the other
consumer holds the message right now)        consumer crashes its lease runs out and the
                                             redelivery takes over
raises ``PayloadMismatch`` (the dedup id     **reject without requeue** (dead-letter): it
was seen with a different payload)           will never succeed
raises ``StoreUnavailable``                  **nack and requeue**: nothing was applied
raises ``KeyMissing`` (the message has no    **reject without requeue, to a dead-letter
dedup id: ``dedup_id`` returned None or      queue**: it was not applied, and a redelivery
``""``, or failed)                           has no id either. Configure a dead-letter
                                             exchange, or the broker drops it.
==========================================  ===============================================

A message without an id is never keyed ``"None"``: that would make every later id-less
message an acknowledged "duplicate" that never runs (pika's default ``BasicProperties`` have
no ``message_id``). It raises ``KeyMissing`` before the handler runs, or, with
``on_missing_id="run"``, runs without idempotency (at least once: a redelivery runs again).

Ack only after the wrapped handler returns: the record is completed before the ack, so a
crash between the two only causes a redelivery that is recognised as a duplicate.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigurationError, KeyMissing

if TYPE_CHECKING:
    from ..api import Idempotency

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("idem_core.consumer")


def consumer(
    idem: Idempotency,
    fn: F | None = None,
    *,
    dedup_id: Callable[[Any], str | None],
    payload: Callable[[Any], Any] | None = None,
    ttl: float | None = None,
    lease: float | None = None,
    renew_every: float | None = None,
    on_in_progress: str = "raise",
    wait_timeout: float = 10.0,
    result_type: Any = Any,
    name: str | None = None,
    on_missing_id: str = "raise",
) -> Any:
    """Wrap ``handler(message, *args)`` so each message is applied once per ``dedup_id``.

    :param dedup_id: the message's identity, e.g. ``lambda m: m.properties.message_id``;
        producers must give a resent message the same id.
    :param payload: what must match on a duplicate (default: nothing beyond the id); a
        different value raises :class:`~idem_core.PayloadMismatch`.
    :param lease: how long one delivery holds the message before a redelivery may take over;
        make it longer than the handler's slowest run, or use ``renew_every``.
    :param name: the consumer's name in stored keys (default ``module.qualname``).
    :param on_missing_id: a message whose ``dedup_id`` is None, ``""`` or raises
        (``KeyError``, ``AttributeError``...): ``"raise"`` :class:`~idem_core.KeyMissing`
        before the handler runs (default), or ``"run"`` the handler without idempotency.
    """
    if on_missing_id not in ("raise", "run"):
        raise ConfigurationError("on_missing_id must be 'raise' or 'run'")

    def decorate(func: F) -> F:
        scope = name or f"{func.__module__}.{func.__qualname__}"

        def key_of(message: Any) -> Any:
            """The message's id (the key under ``scope``), or None to run without idempotency."""
            cause: BaseException | None = None
            try:
                ident = dedup_id(message)
            except (KeyError, AttributeError, IndexError, TypeError) as exc:
                why, cause = f"dedup_id failed: {exc!r}", exc
            else:
                if ident is not None and ident != "":
                    return ident
                why = f"dedup_id returned {ident!r}"
            if on_missing_id == "run":
                logger.warning("%s: %s; running without idempotency", scope, why)
                return None
            raise KeyMissing(f"{scope}: the message has no dedup id ({why})") from cause

        def stored_key(message: Any) -> str:
            """The stored key of ``message`` (``Idempotency.key_of`` on a consumer)."""
            raw = key_of(message)
            if raw is None:
                raise KeyMissing(f"{scope}: the message has no dedup id")
            return idem.key_for(raw, scope=scope)

        def claim_args(message: Any) -> dict[str, Any]:
            return {
                "scope": scope,  # idem_core.keys encodes (scope, id): no "#" join to collide
                "payload": None if payload is None else payload(message),
                "ttl": ttl,
                "lease": lease,
                "renew_every": renew_every,
                "on_in_progress": on_in_progress,
                "wait_timeout": wait_timeout,
                "result_type": result_type,
            }

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def awrapper(message: Any, *args: Any, **kwargs: Any) -> Any:
                raw = key_of(message)
                if raw is None:
                    return await func(message, *args, **kwargs)
                async with idem.aclaim(raw, **claim_args(message)) as call:
                    if call.replayed:
                        return call.result
                    result = await func(message, *args, **kwargs)
                    await call.complete(result)
                    return result

            awrapper.idempotency = idem  # type: ignore[attr-defined]
            awrapper.__idem_key__ = stored_key  # type: ignore[attr-defined]
            return awrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(message: Any, *args: Any, **kwargs: Any) -> Any:
            raw = key_of(message)
            if raw is None:
                return func(message, *args, **kwargs)
            with idem.claim(raw, **claim_args(message)) as call:
                if call.replayed:
                    return call.result
                result = func(message, *args, **kwargs)
                call.complete(result)
                return result

        wrapper.idempotency = idem  # type: ignore[attr-defined]
        wrapper.__idem_key__ = stored_key  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)
