"""Lambda handlers and SQS batches with real event shapes and a fake context, on memory://,
Redis and DynamoDB (moto's server)."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import pytest
from lambda_events import api_gateway_v1, api_gateway_v2, eventbridge, sqs_event, sqs_record

from idem_core import AlreadyInProgress, Event, EventKind, Idempotency, KeyMissing, PayloadMismatch
from idem_core.integrations.aws_lambda import Selector, key_of, lease_from
from idem_core.testing import FakeLambdaContext


def keys_seen(idem: Idempotency) -> list[Event]:
    seen: list[Event] = []
    idem.on_event(seen.append)
    return seen


# -- on every store ------------------------------------------------------------------------


def test_api_gateway_retry_replays(idem: Idempotency) -> None:
    runs: list[str] = []

    @idem.lambda_handler(event_key="body.order_id", raise_on_missing_key=True)
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        runs.append(event["requestContext"]["requestId"])
        return {"statusCode": 201, "body": f'{{"charged": "{uuid.uuid4().hex}"}}'}

    ctx = FakeLambdaContext()
    first = handler(api_gateway_v1({"order_id": "o-1", "amount": 10}), ctx)
    # A client retry: the same body, a new request id, new trace headers.
    again = handler(api_gateway_v1({"order_id": "o-1", "amount": 10}), ctx)
    assert again == first
    assert len(runs) == 1
    other = handler(api_gateway_v1({"order_id": "o-2", "amount": 10}), ctx)
    assert other != first
    assert len(runs) == 2


def test_sqs_batch_partial_response(idem: Idempotency) -> None:
    applied: Counter[str] = Counter()

    @idem.batch_handler(record_key="body.order_id")
    def process(record: dict[str, Any], context: Any) -> str:
        order = record["body"]
        if '"poison"' in order:
            raise ValueError("cannot process")
        oid = key_of(Selector("body.order_id")(record))
        applied[oid] += 1
        return oid

    ctx = FakeLambdaContext()
    a, b, bad = (
        sqs_record({"order_id": "a"}),
        sqs_record({"order_id": "b"}),
        sqs_record({"order_id": "poison"}),
    )
    dup_a = sqs_record({"order_id": "a"})  # the producer sent it twice: another messageId
    out = process(sqs_event(a, b, dup_a, bad), ctx)
    assert out == {"batchItemFailures": [{"itemIdentifier": bad["messageId"]}]}
    assert applied == {"a": 1, "b": 1}
    # SQS redelivers the whole batch (visibility timeout): only the failure would run again.
    out = process(sqs_event(a, b, dup_a), ctx)
    assert out == {"batchItemFailures": []}
    assert applied == {"a": 1, "b": 1}


# -- selection, options and semantics (memory://) -------------------------------------------


def test_event_key_forms(memory_idem: Idempotency) -> None:
    runs: list[Any] = []
    ctx = FakeLambdaContext()

    @memory_idem.lambda_handler(event_key="powertools_json(body).order_id")
    def powertools_style(event: dict[str, Any], context: Any) -> int:
        runs.append(event)
        return len(runs)

    assert powertools_style(api_gateway_v1({"order_id": "x"}), ctx) == 1
    assert powertools_style(api_gateway_v2({"order_id": "x"}), ctx) == 1
    assert powertools_style(api_gateway_v1({"order_id": "x"}, base64_body=True), ctx) == 1
    assert len(runs) == 1

    @memory_idem.lambda_handler(event_key="[body.customer, body.order_id]")
    def compound(event: dict[str, Any], context: Any) -> int:
        runs.append(event)
        return len(runs)

    assert compound(api_gateway_v2({"customer": "c", "order_id": 1}), ctx) == 2
    assert compound(api_gateway_v2({"customer": "c", "order_id": 1}), ctx) == 2
    assert compound(api_gateway_v2({"customer": "d", "order_id": 1}), ctx) == 3


def test_eventbridge_retries(memory_idem: Idempotency) -> None:
    runs: list[str] = []

    @memory_idem.lambda_handler(event_key="detail.order_id")
    def on_order(event: dict[str, Any], context: Any) -> str:
        runs.append(event["id"])
        return f"shipped {event['detail']['order_id']}"

    @memory_idem.lambda_handler(event_key="id")
    def on_delivery(event: dict[str, Any], context: Any) -> str:
        runs.append(event["id"])
        return "ok"

    ctx = FakeLambdaContext()
    assert on_order(eventbridge({"order_id": "o-9"}), ctx) == "shipped o-9"
    assert on_order(eventbridge({"order_id": "o-9"}), ctx) == "shipped o-9"
    assert len(runs) == 1
    delivery = eventbridge({"order_id": "o-9"})
    on_delivery(delivery, ctx)
    on_delivery(delivery, ctx)  # EventBridge's own retry keeps the event id
    assert len(runs) == 2


def test_payload_validation(memory_idem: Idempotency) -> None:
    @memory_idem.lambda_handler(event_key="body.order_id", payload_key="body.[amount, currency]")
    def charge(event: dict[str, Any], context: Any) -> str:
        return "charged"

    ctx = FakeLambdaContext()
    charge(api_gateway_v1({"order_id": "o", "amount": 5, "currency": "EUR", "note": "a"}), ctx)
    # Fields outside payload_key may change...
    charge(api_gateway_v1({"order_id": "o", "amount": 5, "currency": "EUR", "note": "b"}), ctx)
    # ...the validated ones may not.
    with pytest.raises(PayloadMismatch):
        charge(api_gateway_v1({"order_id": "o", "amount": 6, "currency": "EUR"}), ctx)

    @memory_idem.lambda_handler(event_key="body.order_id")
    def unvalidated(event: dict[str, Any], context: Any) -> int:
        return int(event["body"].count("7"))

    first = unvalidated(api_gateway_v1({"order_id": "u", "amount": 1}), ctx)
    # As with Powertools, without payload validation the key alone decides.
    assert unvalidated(api_gateway_v1({"order_id": "u", "amount": 777}), ctx) == first


def test_missing_key(memory_idem: Idempotency) -> None:
    runs: list[int] = []

    @memory_idem.lambda_handler(event_key="body.order_id", raise_on_missing_key=True)
    def strict(event: dict[str, Any], context: Any) -> None:
        runs.append(1)

    @memory_idem.lambda_handler(event_key="body.order_id")
    def lenient(event: dict[str, Any], context: Any) -> None:
        runs.append(2)

    ctx = FakeLambdaContext()
    with pytest.raises(KeyMissing, match=r"body\.order_id"):
        strict(api_gateway_v1({"other": 1}), ctx)
    assert runs == []
    for _ in range(2):
        with pytest.warns(UserWarning, match="running without idempotency"):
            lenient(api_gateway_v1({"other": 1}), ctx)
    assert runs == [2, 2]


def test_lease_follows_remaining_time(memory_idem: Idempotency) -> None:
    seen = keys_seen(memory_idem)
    leases: list[float] = []

    @memory_idem.lambda_handler(event_key="detail.n")
    def handler(event: dict[str, Any], context: Any) -> None:
        key = next(e.key for e in seen if e.kind is EventKind.CLAIMED)
        rec = memory_idem.store.get(key)
        assert rec is not None
        leases.append((rec.lease_expires_at - memory_idem.store.now()) / 1e6)

    handler(eventbridge({"n": 1}), FakeLambdaContext(timeout_ms=4000))
    assert 3.0 < leases[0] <= 4.0
    assert lease_from(FakeLambdaContext(timeout_ms=0), 30.0) == 1.0  # a floor, never zero
    assert lease_from(None, 30.0) == 30.0
    seen.clear()
    handler(eventbridge({"n": 2}), None)  # no context: the Idempotency's lease
    assert memory_idem.lease - 1 < leases[1] <= memory_idem.lease


def test_timed_out_invocation_is_taken_over(memory_idem: Idempotency) -> None:
    started = threading.Event()
    release = threading.Event()
    runs: list[int] = []

    @memory_idem.lambda_handler(event_key="detail.n")
    def handler(event: dict[str, Any], context: Any) -> int:
        runs.append(1)
        started.set()
        release.wait(5)
        return len(runs)

    event = eventbridge({"n": 1})
    t = threading.Thread(target=handler, args=(event, FakeLambdaContext(timeout_ms=1000)))
    t.start()
    started.wait(5)
    with pytest.raises(AlreadyInProgress):
        handler(event, FakeLambdaContext())
    release.set()
    t.join()
    assert len(runs) == 1


def test_response_hook_and_typed_results(memory_idem: Idempotency) -> None:
    hooked: list[Any] = []

    def mark(result: dict[str, Any], record: Any) -> dict[str, Any]:
        hooked.append(record.fence)
        return {**result, "headers": {"x-idempotent-replay": "true"}}

    @memory_idem.lambda_handler(event_key="body.id", response_hook=mark)
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"statusCode": 200, "body": "done"}

    ctx = FakeLambdaContext()
    assert handler(api_gateway_v2({"id": 1}), ctx) == {"statusCode": 200, "body": "done"}
    replay = handler(api_gateway_v2({"id": 1}), ctx)
    assert replay["headers"] == {"x-idempotent-replay": "true"}
    assert len(hooked) == 1


class Declined(Exception):
    pass


def test_errors_release_unless_cached(memory_idem: Idempotency) -> None:
    runs: list[int] = []

    @memory_idem.lambda_handler(event_key="detail.n")
    def flaky(event: dict[str, Any], context: Any) -> str:
        runs.append(1)
        if len(runs) == 1:
            raise TimeoutError("downstream")
        return "ok"

    @memory_idem.lambda_handler(event_key="detail.n", cache_errors=(Declined,))
    def declining(event: dict[str, Any], context: Any) -> str:
        runs.append(2)
        raise Declined("card")

    with pytest.raises(TimeoutError):
        flaky(eventbridge({"n": 1}), None)
    assert flaky(eventbridge({"n": 1}), None) == "ok"
    for _ in range(2):
        with pytest.raises(Declined):
            declining(eventbridge({"n": 1}), None)
    assert runs == [1, 1, 2]


def test_batch_claims_once_and_reports_each_outcome(memory_idem: Idempotency) -> None:
    calls: Counter[str] = Counter()

    def count(store: Any) -> Any:
        class Counting:
            def __getattr__(self, name: str) -> Any:
                calls[name] += 1
                return getattr(store, name)

        return Counting()

    idem = Idempotency(url="memory://", namespace="batchcount", instrument=count)
    applied: list[str] = []

    @idem.batch_handler
    def process(record: dict[str, Any], context: Any) -> None:
        applied.append(record["messageId"])

    records = [sqs_record({"n": i}) for i in range(10)]
    assert process(sqs_event(*records), FakeLambdaContext()) == {"batchItemFailures": []}
    assert calls["claim_many"] == 1
    assert calls["claim"] == 0
    assert len(applied) == 10
    # The same messages redelivered (messageId is the default key): nothing runs again.
    assert process(sqs_event(*records), FakeLambdaContext()) == {"batchItemFailures": []}
    assert len(applied) == 10

    # A record held by a concurrent invocation is retried later, not skipped.
    busy = sqs_record({"n": "busy"})
    name = f"{process.__module__}.{process.__qualname__}"
    call = idem.claim(busy["messageId"], scope=name, payload=busy["messageId"]).enter()
    out = process(sqs_event(busy, sqs_record({"n": "free"})), FakeLambdaContext())
    assert out == {"batchItemFailures": [{"itemIdentifier": busy["messageId"]}]}
    call.release()
    assert process(sqs_event(busy), FakeLambdaContext()) == {"batchItemFailures": []}


def test_batch_payload_mismatch_and_missing_keys(memory_idem: Idempotency) -> None:
    @memory_idem.batch_handler(
        record_key="body.order_id", payload_key="body.amount", raise_on_missing_key=True
    )
    def process(record: dict[str, Any], context: Any) -> None:
        pass

    first = sqs_record({"order_id": "o", "amount": 1})
    assert process(sqs_event(first), None) == {"batchItemFailures": []}
    changed = sqs_record({"order_id": "o", "amount": 2})
    keyless = sqs_record({"amount": 2})
    out = process(sqs_event(changed, keyless), None)
    assert out == {
        "batchItemFailures": [
            {"itemIdentifier": changed["messageId"]},
            {"itemIdentifier": keyless["messageId"]},
        ]
    }


def test_fifo_batch_stops_at_the_first_failure(memory_idem: Idempotency) -> None:
    applied: list[int] = []

    @memory_idem.batch_handler(record_key="body.n")
    def process(record: dict[str, Any], context: Any) -> None:
        n = Selector("body.n")(record)
        if n == 2 and -2 not in applied:
            applied.append(-2)
            raise RuntimeError("transient")
        applied.append(n)

    records = [sqs_record({"n": i}, fifo=True) for i in range(1, 5)]
    out = process(sqs_event(*records), None)
    assert out == {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in records[1:]]}
    assert applied == [1, -2]
    # The retry brings the failed records in order; the claims of the unrun ones were
    # released, so they run now rather than after their lease.
    out = process(sqs_event(*records[1:]), None)
    assert out == {"batchItemFailures": []}
    assert applied == [1, -2, 2, 3, 4]


def test_selector_functions() -> None:
    event = api_gateway_v1({"a": {"b": [1, 2]}})
    assert Selector("body.a.b[1]")(event) == 2
    assert Selector("powertools_json(body).a.b[0]")(event) == 1
    assert Selector("powertools_base64(x)")({"x": "aGk="}) == "hi"
    assert Selector("requestContext.stage")(event) == "prod"
    assert Selector("body")({"body": "not json"}) == "not json"
    assert key_of({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert key_of(7) == "7"
    assert key_of(True) == "true"


# -- keys that are missing, null or partly null: never one shared key ----------------------


def kinesis_record(data: Any, sequence: str) -> dict[str, Any]:
    import base64
    import json

    shard = "shardId-000000000006"
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": "1",
            "sequenceNumber": sequence,
            "data": base64.b64encode(json.dumps(data).encode()).decode(),
            "approximateArrivalTimestamp": 1700000000.1,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"{shard}:{sequence}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-role",
        "awsRegion": "us-east-1",
        "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/orders",
    }


def test_batch_records_without_a_key_are_retried_not_acknowledged(
    memory_idem: Idempotency,
) -> None:
    applied: list[Any] = []

    @memory_idem.batch_handler(record_key="body.order_id")
    def process(record: dict[str, Any], context: Any) -> None:
        applied.append(Selector("body.order_id")(record))

    keyed = sqs_record({"order_id": "o1"})
    keyless = [sqs_record({"amount": 1}), sqs_record({"order_id": None})]
    out = process(sqs_event(keyed, *keyless), None)
    # Before: run without idempotency and acknowledged. Now: back to the queue (and, after
    # maxReceiveCount, to its dead-letter queue), never run unprotected by default.
    assert out == {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in keyless]}
    assert applied == ["o1"]

    @memory_idem.batch_handler(record_key="body.order_id", raise_on_missing_key=False)
    def lenient(record: dict[str, Any], context: Any) -> None:
        applied.append(Selector("body.order_id")(record))

    with pytest.warns(UserWarning, match="running without idempotency"):
        assert lenient(sqs_event(*keyless), None) == {"batchItemFailures": []}
    assert applied == ["o1", None, None]


def test_kinesis_batches_are_keyed_by_event_id_by_default(memory_idem: Idempotency) -> None:
    applied: list[str] = []

    @memory_idem.batch_handler
    def process(record: dict[str, Any], context: Any) -> None:
        applied.append(record["kinesis"]["sequenceNumber"])

    records = [kinesis_record({"n": i}, f"4954{i:020d}") for i in range(3)]
    assert process({"Records": records}, None) == {"batchItemFailures": []}
    # The redelivered batch (a retry after a timeout) is recognised record by record.
    assert process({"Records": records}, None) == {"batchItemFailures": []}
    assert applied == [r["kinesis"]["sequenceNumber"] for r in records]


def test_a_key_with_a_null_part_is_missing(memory_idem: Idempotency) -> None:
    runs: list[Any] = []

    @memory_idem.lambda_handler(
        event_key="[body.customer, body.order_id]", raise_on_missing_key=True
    )
    def listed(event: dict[str, Any], context: Any) -> str:
        runs.append(event["body"])
        return "ok"

    @memory_idem.lambda_handler(
        event_key="{c: body.customer, o: body.order_id}", raise_on_missing_key=True
    )
    def mapped(event: dict[str, Any], context: Any) -> str:
        runs.append(event["body"])
        return "ok"

    for handler in (listed, mapped):
        # Two different orders of one customer, both without an order id: one shared key
        # would replay the second as a duplicate of the first, without running it.
        for amount in (1, 2):
            with pytest.raises(KeyMissing):
                handler(api_gateway_v1({"customer": "c1", "amount": amount}), None)
        assert handler(api_gateway_v1({"customer": "c1", "order_id": "o"}), None) == "ok"
    assert len(runs) == 2
