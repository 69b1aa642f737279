"""``assert_idempotent`` and the fixtures users test their own handlers with."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from lambda_events import api_gateway_v1

from idem_core import Idempotency
from idem_core.testing import (
    FakeLambdaContext,
    aassert_idempotent,
    assert_idempotent,
)


def make_handler(idem: Idempotency, event_key: str = "body.order_id") -> Any:
    @idem.lambda_handler(event_key=event_key, payload_key="body.amount")
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"statusCode": 201, "body": f"charged {uuid.uuid4().hex}"}

    return handler


def test_lambda_handler_on_every_store(idem: Idempotency) -> None:
    handler = make_handler(idem)
    report = assert_idempotent(
        handler,
        api_gateway_v1({"order_id": "o-1", "amount": 10}),
        FakeLambdaContext(),
        changed=api_gateway_v1({"order_id": "o-1", "amount": 11}),
    )
    assert report.result["statusCode"] == 201
    assert len(report.concurrent_results) + report.in_progress == 8
    assert report.key.endswith(":o-1")  # namespace:handler:key
    # Run again (a second test run on a shared store): the stale record is set aside.
    assert_idempotent(handler, api_gateway_v1({"order_id": "o-1", "amount": 10}), None)


def test_with_the_fixtures(idempotency: Idempotency, lambda_context: FakeLambdaContext) -> None:
    assert lambda_context.get_remaining_time_in_millis() > 29_000
    assert_idempotent(
        make_handler(idempotency),
        api_gateway_v1({"order_id": "o-2", "amount": 1}),
        lambda_context,
        concurrency=16,
    )


def test_catches_a_misconfigured_key(memory_idem: Idempotency) -> None:
    # Keyed on the request id, which API Gateway changes on every retry: not idempotent.
    handler = make_handler(memory_idem, event_key="requestContext.requestId")
    retried = api_gateway_v1({"order_id": "o-3", "amount": 1})

    def fresh_request_id(event: dict[str, Any], context: Any) -> Any:
        event = {**event, "requestContext": {**event["requestContext"]}}
        event["requestContext"]["requestId"] = str(uuid.uuid4())
        return handler(event, context)

    fresh_request_id.idempotency = memory_idem  # type: ignore[attr-defined]
    with pytest.raises(AssertionError, match="ran 2 times"):
        assert_idempotent(fresh_request_id, retried, FakeLambdaContext())


def test_catches_a_missing_payload_check(memory_idem: Idempotency) -> None:
    @memory_idem.lambda_handler(event_key="body.order_id")
    def handler(event: dict[str, Any], context: Any) -> str:
        return "ok"

    with pytest.raises(AssertionError, match="expected PayloadMismatch"):
        assert_idempotent(
            handler,
            api_gateway_v1({"order_id": "o", "amount": 1}),
            None,
            changed=api_gateway_v1({"order_id": "o", "amount": 2}),
        )


def test_catches_unequal_replays(memory_idem: Idempotency) -> None:
    @memory_idem.idempotent(key="k")
    def work(k: str) -> dict[str, Any]:
        return {"when": uuid.uuid4().hex}

    assert_idempotent(work, "a", idem=memory_idem)
    with pytest.raises(AssertionError, match="replay"):
        assert_idempotent(work, "b", idem=memory_idem, equal=lambda a, b: a is b)


async def test_async_handlers(memory_idem: Idempotency) -> None:
    @memory_idem.consumer(dedup_id=lambda m: m["id"], payload=lambda m: m["amount"])
    async def apply(message: dict[str, Any]) -> int:
        await asyncio.sleep(0.02)
        return int(message["amount"]) * 2

    report = await aassert_idempotent(
        apply, {"id": "m", "amount": 2}, changed={"id": "m", "amount": 3}
    )
    assert report.result == 4
    assert report.in_progress > 0  # the concurrent calls overlapped the first one


def test_needs_to_know_the_idempotency() -> None:
    from idem_core import ConfigurationError

    with pytest.raises(ConfigurationError, match="idem="):
        assert_idempotent(lambda e: e, {})
