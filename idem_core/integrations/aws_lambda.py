"""AWS Lambda handlers: one execution per idempotency key, and SQS batches with partial failures.

Option names map one to one from AWS Lambda Powertools' ``IdempotencyConfig``
(``event_key_jmespath`` → ``event_key``, ``payload_validation_jmespath`` → ``payload_key``,
``raise_on_no_idempotency_key`` → ``raise_on_missing_key``, ``expires_after_seconds`` →
``ttl``, ``jmespath_options``, ``response_hook``); see ``docs/migrating-from-powertools.md``.

Needs the ``lambda`` extra (``jmespath``).
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from ..errors import KeyMissing, LeaseLost, StoreUnavailable
from ..record import ClaimOutcome, Record
from ..registry import import_driver

if TYPE_CHECKING:
    from ..api import Idempotency
    from ..call import Call

F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[Any, Any], Any]
ResponseHook = Callable[[Any, Record], Any]

logger = logging.getLogger("idem_core.lambda")

_MIN_LEASE = 1.0
_json_key = msgspec.json.Encoder(order="sorted")


class Selector:
    """A compiled JMESPath expression over events, with Powertools' functions
    (``powertools_json``, ``powertools_base64``, ``powertools_base64_gzip``).

    API Gateway, ALB and SQS deliver JSON bodies as strings: ``body`` is decoded before the
    expression runs, so ``body.order_id`` and ``powertools_json(body).order_id`` both work.
    """

    def __init__(self, expression: str, options: Mapping[str, Any] | None = None) -> None:
        jmespath = import_driver("jmespath", "lambda")
        self.expression = expression
        self._compiled = jmespath.compile(expression)
        opts = dict(options or {})
        opts.setdefault("custom_functions", _functions(jmespath))
        self._options = jmespath.Options(**opts)

    def __call__(self, event: Any) -> Any:
        return self._compiled.search(decoded_body(event), options=self._options)


def decoded_body(event: Any) -> Any:
    """``event`` with a JSON string ``body`` decoded (base64 first when so flagged)."""
    if not isinstance(event, Mapping):
        return event
    body = event.get("body")
    if not isinstance(body, str):
        return event
    text = body
    if event.get("isBase64Encoded"):
        try:
            text = base64.b64decode(body).decode()
        except (ValueError, UnicodeDecodeError):
            return event
    try:
        value = json.loads(text)
    except ValueError:
        return event
    return {**event, "body": value}


def _functions(jmespath: Any) -> Any:
    functions = jmespath.functions
    base: Any = functions.Functions

    class PowertoolsFunctions(base):  # type: ignore[misc]
        # The same names as Powertools, so expressions carry over unchanged; values that are
        # already decoded (``body`` above) pass through.
        @functions.signature({"types": ["string", "object", "array", "number", "boolean"]})  # type: ignore[untyped-decorator]
        def _func_powertools_json(self, value: Any) -> Any:
            return json.loads(value) if isinstance(value, str) else value

        @functions.signature({"types": ["string"]})  # type: ignore[untyped-decorator]
        def _func_powertools_base64(self, value: str) -> str:
            return base64.b64decode(value).decode()

        @functions.signature({"types": ["string"]})  # type: ignore[untyped-decorator]
        def _func_powertools_base64_gzip(self, value: str) -> str:
            return gzip.decompress(base64.b64decode(value)).decode()

    return PowertoolsFunctions()


def _missing(data: Any) -> bool:
    """None, an empty string/list/dict, or a multiselect with a null part: ``[customer,
    order_id]`` without ``order_id`` would give every such event of a customer one key, and
    all but the first would be replayed as duplicates without running. (Powertools treats
    only an all-null multiselect as missing.)"""
    if data is None:
        return True
    if isinstance(data, list | tuple):
        return not data or any(v is None for v in data)
    if isinstance(data, dict):
        return not data or any(v is None for v in data.values())
    return isinstance(data, str) and not data


def key_of(data: Any) -> str:
    """A stable raw key for a selected value: strings and numbers as they are, anything else
    as its canonical JSON."""
    if isinstance(data, str):
        return data
    if isinstance(data, bool):
        return json.dumps(data)
    if isinstance(data, int | float):
        return repr(data)
    return _json_key.encode(data).decode()


def lease_from(context: Any, default: float) -> float:
    """The invocation's remaining time: a crashed or timed-out invocation's key is free the
    moment Lambda would have killed it."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return default
    try:
        millis = remaining()
    except Exception:
        return default
    if not isinstance(millis, int | float):
        return default
    return max(millis / 1000.0, _MIN_LEASE)


class _Keys:
    """Turns an event (or a record) into (raw key, payload), or None when no key is found."""

    def __init__(
        self,
        name: str,
        event_key: str | None,
        payload_key: str | None,
        jmespath_options: Mapping[str, Any] | None,
        raise_on_missing_key: bool,
    ) -> None:
        self.name = name
        self.event_key = Selector(event_key, jmespath_options) if event_key else None
        self.payload_key = Selector(payload_key, jmespath_options) if payload_key else None
        self.raise_on_missing_key = raise_on_missing_key

    def data(self, event: Any) -> Any:
        return self.event_key(event) if self.event_key else decoded_body(event)

    def stored_key(self, idem: Idempotency, event: Any) -> str:
        """The stored key of ``event`` (``Idempotency.key_of`` on a handler)."""
        data = self.data(event)
        if _missing(data):
            expr = self.event_key.expression if self.event_key else "<event>"
            raise KeyMissing(f"no idempotency key found in the event with {expr!r}")
        return idem.key_for(key_of(data), scope=self.name)

    def __call__(self, event: Any) -> tuple[str, Any] | None:
        data = self.data(event)
        if _missing(data):
            expr = self.event_key.expression if self.event_key else "<event>"
            if self.raise_on_missing_key:
                raise KeyMissing(f"no idempotency key found in the event with {expr!r}")
            warnings.warn(
                f"no idempotency key found with {expr!r}: running without idempotency",
                stacklevel=3,
            )
            return None
        # Without payload validation the key's data is the payload: a retry with other fields
        # changed replays, as with Powertools.
        payload = self.payload_key(event) if self.payload_key else data
        return key_of(data), payload  # claimed with scope=self.name: idem_core.keys joins them


def lambda_handler(
    idem: Idempotency,
    fn: F | None = None,
    *,
    event_key: str | None = None,
    payload_key: str | None = None,
    jmespath_options: Mapping[str, Any] | None = None,
    raise_on_missing_key: bool = False,
    ttl: float | None = None,
    lease: float | None = None,
    response_hook: ResponseHook | None = None,
    result_type: Any = Any,
    cache_errors: tuple[type[BaseException], ...] = (),
    on_in_progress: str = "raise",
    wait_timeout: float = 10.0,
    name: str | None = None,
) -> Any:
    """Make a Lambda handler ``handler(event, context)`` run once per key.

    :param event_key: JMESPath selecting the key from the event (default: the whole event).
    :param payload_key: JMESPath selecting what must match on a retry; a different value
        raises :class:`~idem_core.PayloadMismatch`. Default: no check beyond the key.
    :param raise_on_missing_key: raise :class:`~idem_core.KeyMissing` when ``event_key``
        finds nothing; otherwise warn and run without idempotency.
    :param ttl: how long the result is kept, seconds (Powertools' ``expires_after_seconds``).
    :param lease: how long a running invocation holds the key; default the context's
        remaining time (``get_remaining_time_in_millis``), else the ``Idempotency``'s lease.
    :param response_hook: ``hook(result, record)`` applied to replayed results.
    :param name: the handler's name in stored keys (default ``module.qualname``); keys of
        different handlers never collide.

    A duplicate that arrives while the first invocation runs raises
    :class:`~idem_core.AlreadyInProgress` (Lambda retries it later), or waits with
    ``on_in_progress="wait"``.
    """

    def decorate(func: F) -> F:
        keys = _Keys(
            name or f"{func.__module__}.{func.__qualname__}",
            event_key,
            payload_key,
            jmespath_options,
            raise_on_missing_key,
        )

        @functools.wraps(func)
        def wrapper(event: Any, context: Any = None, *args: Any, **kwargs: Any) -> Any:
            found = keys(event)
            if found is None:
                return func(event, context, *args, **kwargs)
            raw, payload = found
            with idem.claim(
                raw,
                scope=keys.name,
                payload=payload,
                lease=lease or lease_from(context, idem.lease),
                ttl=ttl,
                result_type=result_type,
                cache_errors=cache_errors,
                on_in_progress=on_in_progress,
                wait_timeout=wait_timeout,
            ) as call:
                if call.replayed:
                    result = call.result
                    if response_hook is not None and call.record is not None:
                        result = response_hook(result, call.record)
                    return result
                result = func(event, context, *args, **kwargs)
                call.complete(result)
                return result

        wrapper.idempotency = idem  # type: ignore[attr-defined]
        wrapper.__idem_key__ = functools.partial(keys.stored_key, idem)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)


def _item_id(record: Mapping[str, Any]) -> str:
    """The identifier Lambda expects in ``batchItemFailures`` for SQS, Kinesis and DynamoDB
    Streams records."""
    if "messageId" in record:
        return str(record["messageId"])
    for source in ("kinesis", "dynamodb"):
        inner = record.get(source)
        if isinstance(inner, Mapping):
            seq = inner.get("sequenceNumber") or inner.get("SequenceNumber")
            if seq is not None:
                return str(seq)
    raise KeyMissing("a batch record has no messageId or sequence number")


#: a batch record's own id: SQS ``messageId``; Kinesis and DynamoDB Streams ``eventID``
#: (``shardId-…:sequence number``)
RECORD_ID = "messageId || eventID"


def batch_handler(
    idem: Idempotency,
    fn: F | None = None,
    *,
    record_key: str | None = RECORD_ID,
    payload_key: str | None = None,
    jmespath_options: Mapping[str, Any] | None = None,
    raise_on_missing_key: bool = True,
    ttl: float | None = None,
    lease: float | None = None,
    result_type: Any = Any,
    name: str | None = None,
) -> Any:
    """Turn a per-record function ``fn(record, context)`` into a Lambda handler for SQS,
    Kinesis or DynamoDB Streams batches that returns a partial batch response.

    All records are claimed in one store call (``claim_many``). A record already processed
    is skipped; one in progress elsewhere, one whose payload does not match, one whose
    function raises, and (FIFO queues) every record after a failure are reported in
    ``batchItemFailures`` so the event source retries only those. Enable
    ``ReportBatchItemFailures`` on the event source mapping.

    :param record_key: JMESPath selecting each record's key. The default, the record's own
        id (:data:`RECORD_ID`: SQS ``messageId``, Kinesis/DynamoDB Streams ``eventID``),
        covers redeliveries; use e.g. ``powertools_json(body).order_id`` (or
        ``body.order_id``) to also catch a producer that sent the same message twice.
    :param raise_on_missing_key: a record whose key is missing (or null) is reported in
        ``batchItemFailures`` without running (default: it comes back, and after
        ``maxReceiveCount`` goes to the dead-letter queue); ``False`` runs it without
        idempotency instead.
    """

    def decorate(func: F) -> F:
        keys = _Keys(
            name or f"{func.__module__}.{func.__qualname__}",
            record_key,
            payload_key,
            jmespath_options,
            raise_on_missing_key,
        )

        @functools.wraps(func)
        def wrapper(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
            records = list(event.get("Records") or [])
            return _process_batch(idem, func, keys, records, context, lease, ttl, result_type)

        wrapper.idempotency = idem  # type: ignore[attr-defined]
        wrapper.__idem_key__ = functools.partial(keys.stored_key, idem)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)


def _process_batch(
    idem: Idempotency,
    func: Callable[..., Any],
    keys: _Keys,
    records: list[Mapping[str, Any]],
    context: Any,
    lease: float | None,
    ttl: float | None,
    result_type: Any,
) -> dict[str, Any]:
    failures: list[str] = []
    fifo = any(str(r.get("eventSourceARN", "")).endswith(".fifo") for r in records)
    found: list[tuple[str, Any] | None] = []
    for record in records:
        try:
            found.append(keys(record))
        except KeyMissing:
            logger.warning("record %s has no idempotency key", _item_id(record))
            found.append(None)
    # One claim per distinct key: a key twice in one batch is applied by its first record.
    unique: dict[str, Any] = {}
    for item in found:
        if item is not None:
            unique.setdefault(item[0], item[1])
    calls: dict[str, Call] = {}
    if unique:
        claimed = idem.claim_many(
            list(unique.items()),
            scope=keys.name,
            lease=lease or lease_from(context, idem.lease),
            ttl=ttl,
            result_type=result_type,
        )
        calls = dict(zip(unique, claimed, strict=True))
    done: dict[str, bool] = {}
    failed = False
    for record, item in zip(records, found, strict=True):
        ident = _item_id(record)
        if failed and fifo:
            # FIFO order: nothing after a failure may run before it is retried.
            failures.append(ident)
            continue
        if item is None:
            if keys.raise_on_missing_key:
                ok = False
            else:
                ok = _run_unprotected(func, record, context, ident)
        elif item[0] in done:
            ok = done[item[0]]
        else:
            ok = _run_claimed(func, record, context, calls[item[0]], ident)
            done[item[0]] = ok
        if not ok:
            failed = True
            failures.append(ident)
    # Claims not run (FIFO stop) go back at once rather than when their lease ends.
    for call in calls.values():
        call.release()
    return {"batchItemFailures": [{"itemIdentifier": i} for i in failures]}


def _run_claimed(
    func: Callable[..., Any], record: Any, context: Any, call: Call, ident: str
) -> bool:
    outcome = call.outcome
    if outcome is ClaimOutcome.COMPLETED:
        return True
    if outcome is ClaimOutcome.IN_PROGRESS:
        logger.info("record %s is being processed elsewhere: retry later", ident)
        return False
    if outcome is ClaimOutcome.MISMATCH:
        logger.warning("record %s reuses a key with a different payload", ident)
        return False
    try:
        result = func(record, context)
    except Exception:
        logger.exception("record %s failed", ident)
        call.release()
        return False
    try:
        call.complete(result)
    except (LeaseLost, StoreUnavailable):
        # Applied, but not recorded: retrying the record would apply it a second time.
        logger.exception("record %s was processed but its result could not be stored", ident)
    return True


def _run_unprotected(func: Callable[..., Any], record: Any, context: Any, ident: str) -> bool:
    try:
        func(record, context)
    except Exception:
        logger.exception("record %s failed", ident)
        return False
    return True
