"""What the conformance suite does not cover: request counts, transactions, item size,
compression, corrupt items, clock skew, setup and diagnostics. Errors, clients, fork and URLs
are in test_dynamodb_clients.py."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any

import boto3
import pytest
from ddb_servers import REGION, SHARED_TABLE, TABLE, Server, counting, store_calls
from idem_dynamodb import TransactionCanceled
from idem_dynamodb.backend import BACKEND
from idem_dynamodb.store import DynamoDBStore

from idem_core.clock import ManualClock, SkewedClock
from idem_core.errors import (
    ConfigurationError,
    CorruptRecord,
    LeaseLost,
    ResultNotSerializable,
)
from idem_core.record import ClaimOutcome, ClaimRequest, Status

TTL = 600.0
SIDE_TABLE = "idem_side_effects"


def req(key: str, lease: float = 30.0, fingerprint: str = "f" * 32) -> ClaimRequest:
    return ClaimRequest(key, fingerprint, uuid.uuid4().hex, lease, TTL)


@pytest.fixture
def key() -> str:
    return f"t-{uuid.uuid4().hex}"


# -- request counts ---------------------------------------------------------------------------


def test_requests_per_call(store: DynamoDBStore, server: Server, key: str) -> None:
    """First call: one conditional write to claim, one to complete. Replay: the failed
    condition returns the record (1 request) where the server supports it, else one GetItem."""
    calls = store_calls(store)
    claimed = store.claim(req(key))
    store.complete(key, claimed.fence, b"result", TTL)
    assert calls.take() == ["PutItem", "UpdateItem"]
    replay = store.claim(req(key))
    assert replay.outcome is ClaimOutcome.COMPLETED and replay.record.result == b"result"
    expected = ["PutItem"] if server.returns_old else ["PutItem", "GetItem"]
    assert calls.take() == expected
    # In progress elsewhere: the same single round trip.
    other = f"{key}-b"
    store.claim(req(other))
    calls.take()
    assert store.claim(req(other)).outcome is ClaimOutcome.IN_PROGRESS
    assert calls.take() == expected
    # Release and renew are one conditional write each.
    store.renew(other, store.get(other).fence, 30)  # type: ignore[union-attr]
    calls.take()
    fence = store.claim(req(f"{key}-c")).fence
    calls.take()
    store.renew(f"{key}-c", fence, 30)
    store.release(f"{key}-c", fence)
    assert calls.take() == ["UpdateItem", "UpdateItem"]


def _requests(store: DynamoDBStore) -> list[tuple[str, dict[str, Any]]]:
    """The requests a sync store sends from now on: (operation, parameters)."""
    from idem_dynamodb.wire.protocol import OPERATIONS

    sent: list[tuple[str, dict[str, Any]]] = []
    if store._lean:
        wire = store._lean_client()
        call = wire.call

        def recorded(op: str, kwargs: dict[str, Any]) -> Any:
            sent.append((OPERATIONS[op], kwargs))
            return call(op, kwargs)

        wire.call = recorded  # type: ignore[method-assign]
    else:

        def seen(params: dict[str, Any], model: Any, **_: Any) -> None:
            sent.append((model.name, dict(params)))

        store.client.meta.events.register("provide-client-params.dynamodb.*", seen)
    return sent


def test_a_completion_asks_back_only_for_what_this_process_does_not_know(
    server: Server, store: DynamoDBStore, key: str
) -> None:
    """The store that claimed a key knows the record it completes: its one UpdateItem asks
    for nothing back and removes nothing (the claim wrote the whole item, without a result).
    A store that did not claim it gets the record back with the same one request."""
    sent = _requests(store)
    claimed = store.claim(req(key))
    done = store.complete(key, claimed.fence, b"result", TTL)
    (op, params) = sent[-1]
    assert op == "UpdateItem" and "ReturnValues" not in params
    assert "REMOVE" not in params["UpdateExpression"]
    assert set(params["ExpressionAttributeNames"]) == {"#st", "#f", "#l", "#e", "#t", "#u", "#r"}
    assert (done.fingerprint, done.attempt, done.created_at, done.fence) == (
        claimed.record.fingerprint,
        claimed.record.attempt,
        claimed.record.created_at,
        claimed.fence,
    )
    assert done.status is Status.COMPLETED and done.result == b"result"
    replay = store.claim(req(key))
    assert replay.outcome is ClaimOutcome.COMPLETED and replay.record.result == b"result"
    # An empty result is told from no result by its encoding, written with it.
    empty = f"{key}-e"
    store.complete(empty, store.claim(req(empty)).fence, b"", TTL)
    assert store.claim(req(empty)).record.result == b""

    other_key = f"{key}-b"
    claimed = store.claim(req(other_key))
    with server.open() as other:
        theirs = _requests(other)
        done = other.complete(other_key, claimed.fence, b"r", TTL)
    assert [op for op, _ in theirs] == ["UpdateItem"]
    assert theirs[0][1]["ReturnValues"] == "ALL_OLD"
    assert (done.fingerprint, done.attempt, done.created_at) == (
        claimed.record.fingerprint,
        claimed.record.attempt,
        claimed.record.created_at,
    )
    assert store.claim(req(other_key)).record.result == b"r"


async def test_requests_per_call_async(server: Server, key: str) -> None:
    store = BACKEND.open_async(server.url())
    try:
        claimed = await store.claim(req(key))  # builds the client
        calls = counting(await store._get_client(), await store._get_wire())
        await store.complete(key, claimed.fence, b"r", TTL)
        assert calls.take() == ["UpdateItem"]
        assert (await store.claim(req(key))).outcome is ClaimOutcome.COMPLETED
        assert calls.take() == (["PutItem"] if server.returns_old else ["PutItem", "GetItem"])
    finally:
        await store.close()


def test_diagnostics_and_setup(server: Server) -> None:
    with server.open() as store:
        facts = store.diagnostics()
        assert facts["key_schema_ok"] is True and facts["ttl_ok"] is True
        assert facts["returns_old_item"] is server.returns_old
        assert facts["server_clock"] is False and facts["problems"] == []
        assert "already exists" in store.setup()
    name = f"idem_setup_{uuid.uuid4().hex[:8]}"
    with server.open(name, sort_key="sk") as store:
        assert store.diagnostics()["table_exists"] is False
        did = store.setup()
        assert "created table" in did and "enabled TTL on 'ttl'" in did
        facts = store.diagnostics()
        assert facts["key_schema_ok"] is True and facts["ttl_ok"] is True
        assert facts["billing_mode"] == "PAY_PER_REQUEST"
        store.client.delete_table(TableName=name)
    # A table of the wrong shape is reported, and setup refuses to use it.
    with server.open(SHARED_TABLE) as store:
        facts = store.diagnostics()
        assert facts["key_schema_ok"] is False and facts["problems"]
        with pytest.raises(ConfigurationError, match="key schema"):
            store.setup()


# -- transactions -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def side_table(server: Server) -> str:
    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=server.endpoint)
    with contextlib.suppress(client.exceptions.ResourceInUseException):
        client.create_table(
            TableName=SIDE_TABLE,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
    client.close()
    return SIDE_TABLE


def _side(store: DynamoDBStore, item_id: str) -> dict[str, Any] | None:
    got = store.client.get_item(
        TableName=SIDE_TABLE, Key={"id": {"S": item_id}}, ConsistentRead=True
    )
    return got.get("Item")


def _put(item_id: str, amount: int = 10) -> dict[str, Any]:
    return {
        "Put": {
            "TableName": SIDE_TABLE,
            "Item": {"id": {"S": item_id}, "amount": {"N": str(amount)}},
        }
    }


def test_complete_with_items_commits_both(store: DynamoDBStore, side_table: str, key: str) -> None:
    claimed = store.claim(req(key))
    calls = store_calls(store)
    done = store.complete(key, claimed.fence, b"paid", TTL, with_items=[_put(key)])
    assert calls.take() == ["TransactWriteItems"]  # the store knows the record it claimed
    assert done.status is Status.COMPLETED and done.result == b"paid"
    assert done.fingerprint == "f" * 32 and done.fence == claimed.fence
    assert _side(store, key) == {"id": {"S": key}, "amount": {"N": "10"}}
    # A retried completion that was applied succeeds without writing again.
    again = store.complete(key, claimed.fence, b"paid", TTL, with_items=[_put(key, 99)])
    assert again.result == b"paid"
    assert _side(store, key)["amount"] == {"N": "10"}  # type: ignore[index]


def test_complete_with_items_from_another_store(
    server: Server, store: DynamoDBStore, side_table: str, key: str
) -> None:
    """A store that did not claim the key reads the record back after the transaction."""
    claimed = store.claim(req(key))
    with server.open() as other:
        done = other.complete(key, claimed.fence, b"r", TTL, with_items=[_put(key)])
    assert done.fingerprint == "f" * 32 and done.created_at == claimed.record.created_at
    assert done.result == b"r"


def test_stale_fence_writes_nothing(server: Server, side_table: str, key: str) -> None:
    clock = ManualClock(time.time())
    with server.open(clock=clock, monotonic=clock) as store:
        zombie = store.claim(req(key, lease=1))
        clock.advance(2)
        successor = store.claim(req(key))
        assert successor.outcome is ClaimOutcome.TOOK_OVER
        with pytest.raises(LeaseLost):
            store.complete(key, zombie.fence, b"zombie", TTL, with_items=[_put(key)])
        assert _side(store, key) is None
        rec = store.get(key)
        assert rec is not None and rec.fence == successor.fence
        assert rec.status is Status.IN_PROGRESS


def test_callers_condition_cancels_everything(
    store: DynamoDBStore, side_table: str, key: str
) -> None:
    claimed = store.claim(req(key))
    check = {
        "ConditionCheck": {
            "TableName": SIDE_TABLE,
            "Key": {"id": {"S": f"{key}-account"}},
            "ConditionExpression": "attribute_exists(id)",
        }
    }
    with pytest.raises(TransactionCanceled) as info:
        store.complete(key, claimed.fence, b"r", TTL, with_items=[_put(key), check])
    assert [r.get("Code") for r in info.value.reasons][2] == "ConditionalCheckFailed"
    assert _side(store, key) is None
    rec = store.get(key)
    assert rec is not None and rec.status is Status.IN_PROGRESS  # still ours to finish
    store.release(key, claimed.fence)


def test_with_items_must_be_transaction_entries(store: DynamoDBStore, key: str) -> None:
    claimed = store.claim(req(key))
    with pytest.raises(ConfigurationError, match="TransactWriteItems"):
        store.complete(key, claimed.fence, b"r", TTL, with_items=[{"TableName": "x"}])


async def test_async_complete_with_items(server: Server, side_table: str, key: str) -> None:
    store = BACKEND.open_async(server.url())
    try:
        claimed = await store.claim(req(key))
        done = await store.complete(key, claimed.fence, b"a", TTL, with_items=[_put(key, 5)])
        assert done.result == b"a"
    finally:
        await store.close()
    with server.open() as sync:
        assert _side(sync, key) == {"id": {"S": key}, "amount": {"N": "5"}}


# -- item size and compression ----------------------------------------------------------------


def test_too_large_result_fails_before_the_write(store: DynamoDBStore, key: str) -> None:
    claimed = store.claim(req(key))
    calls = store_calls(store)
    with pytest.raises(ResultNotSerializable, match="400 KB"):
        store.complete(key, claimed.fence, os.urandom(420_000), TTL)
    assert calls.take() == []  # refused before any request
    rec = store.get(key)
    assert rec is not None and rec.status is Status.IN_PROGRESS
    store.release(key, claimed.fence)


def test_large_compressible_result_is_compressed(server: Server, key: str) -> None:
    payload = b"0123456789abcdef" * 100_000  # 1.6 MB, far past the item limit
    with server.open() as store:
        claimed = store.claim(req(key))
        done = store.complete(key, claimed.fence, payload, TTL)
        assert done.result == payload
        raw = store.client.get_item(TableName=TABLE, Key={"pk": {"S": key}})["Item"]
        assert raw["result_encoding"] == {"S": "zstd"} and len(raw["result"]["B"]) < 400_000
        replay = store.claim(req(key))
        assert replay.outcome is ClaimOutcome.COMPLETED and replay.record.result == payload
    with server.open(compress_above="off") as store:
        other = f"{key}-plain"
        claimed = store.claim(req(other))
        with pytest.raises(ResultNotSerializable, match="compression is off"):
            store.complete(other, claimed.fence, payload, TTL)
        store.complete(other, claimed.fence, payload[:300_000], TTL)
        raw = store.client.get_item(TableName=TABLE, Key={"pk": {"S": other}})["Item"]
        assert "result_encoding" not in raw and len(raw["result"]["B"]) == 300_000


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "sort_key"])
def test_max_result_size_fits_next_to_the_longest_key(server: Server, shared: bool) -> None:
    """``max_result_size`` is a promise: an incompressible result of exactly that size is
    stored next to the longest key the store accepts; one byte more is refused before any
    request, the claim untouched."""
    options: dict[str, Any] = {"sort_key": "sk", "namespace": "limits"} if shared else {}
    with server.open(SHARED_TABLE if shared else TABLE, **options) as store:
        limit = store.max_result_size
        assert 390_000 <= limit < 400_000
        longest = f"{uuid.uuid4().hex}:" + "🔑" * (store.max_key_length - 33)
        claimed = store.claim(req(longest))
        calls = store_calls(store)
        too_big = os.urandom(limit + 1)
        with pytest.raises(ResultNotSerializable, match=f"at most {limit} bytes"):
            store.complete(longest, claimed.fence, too_big, TTL)
        assert calls.take() == []  # nothing sent, nothing written
        held = store.get(longest)
        assert held is not None and held.status is Status.IN_PROGRESS
        assert held.fence == claimed.fence and held.result is None
        exact = os.urandom(limit)
        done = store.complete(longest, claimed.fence, exact, TTL)
        assert done.result == exact
        replay = store.claim(req(longest))
        assert replay.outcome is ClaimOutcome.COMPLETED and replay.record.result == exact


async def test_async_too_large_result_writes_nothing(server: Server, key: str) -> None:
    store = BACKEND.open_async(server.url(compress_above="off"))
    try:
        claimed = await store.claim(req(key))
        calls = counting(await store._get_client(), await store._get_wire())
        with pytest.raises(ResultNotSerializable, match="nothing was written"):
            await store.complete(key, claimed.fence, b"x" * (store.max_result_size + 1), TTL)
        assert calls.take() == []
        held = await store.get(key)
        assert held is not None and held.status is Status.IN_PROGRESS
        assert held.fence == claimed.fence
        await store.complete(key, claimed.fence, b"small", TTL)
    finally:
        await store.close()


# -- corrupt items ----------------------------------------------------------------------------


def test_corrupt_item_is_reported_and_left_alone(store: DynamoDBStore, key: str) -> None:
    garbage = {"pk": {"S": key}, "status": {"S": "bogus"}, "expires_at": {"N": "99999999999999999"}}
    store.client.put_item(TableName=TABLE, Item=garbage)
    with pytest.raises(CorruptRecord, match=key):
        store.get(key)
    with pytest.raises(CorruptRecord):
        store.claim(req(key))
    assert store.client.get_item(TableName=TABLE, Key={"pk": {"S": key}})["Item"] == garbage
    bad_zstd = {
        "pk": {"S": key},
        "status": {"S": "completed"},
        "fingerprint": {"S": "f" * 32},
        "fence": {"N": "5"},
        "lease_expires_at": {"N": "1"},
        "expires_at": {"N": str(store.now() + 10**9)},
        "attempt": {"S": "a"},
        "created_at": {"N": "1"},
        "updated_at": {"N": "1"},
        "result": {"B": b"not zstd"},
        "result_encoding": {"S": "zstd"},
    }
    store.client.put_item(TableName=TABLE, Item=bad_zstd)
    with pytest.raises(CorruptRecord, match="decompress"):
        store.get(key)


# -- clock skew -------------------------------------------------------------------------------
# Leases are taken over by watching them: a claimer that saw the same lease version for the
# lease's whole duration, on its own monotonic clock. Wall clocks only matter past the skew
# allowance (default 300 s). The renewing-holder races against a clock 5 s and 60 s ahead
# are in test_dynamodb_skew.py.


def test_watching_takes_over_after_the_lease_whatever_the_wall_clock(
    server: Server, key: str
) -> None:
    """A claimer whose wall clock runs 60 s behind still takes over a dead lease once it has
    watched it for the lease's duration, with a larger fence; the zombie is fenced off."""
    watch = ManualClock(0)
    with (
        server.open() as holder,
        server.open(clock=SkewedClock(-60.0), monotonic=watch) as behind,
    ):
        held = holder.claim(req(key, lease=2))
        assert behind.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS  # starts watching
        watch.advance(1.9)
        assert behind.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
        watch.advance(0.2)
        took = behind.claim(req(key))
        assert took.outcome is ClaimOutcome.TOOK_OVER and took.fence > held.fence
        with pytest.raises(LeaseLost):
            holder.complete(key, held.fence, b"zombie", TTL)
        behind.complete(key, took.fence, b"successor", TTL)
        rec = holder.get(key)
        assert rec is not None and rec.result == b"successor"


def test_a_renewal_restarts_the_watch(server: Server, key: str) -> None:
    watch = ManualClock(0)
    with server.open() as holder, server.open(monotonic=watch) as watcher:
        held = holder.claim(req(key, lease=1))
        assert watcher.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
        watch.advance(0.8)
        holder.renew(key, held.fence, 1)  # a new lease version
        assert watcher.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
        watch.advance(0.5)  # 1.3 s since the first sight, 0.5 s since the renewal
        assert watcher.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
        watch.advance(0.6)
        assert watcher.claim(req(key)).outcome is ClaimOutcome.TOOK_OVER


def test_two_watchers_one_takeover(server: Server, key: str) -> None:
    """The takeover is a conditional write on the version both watched: one wins, the other
    finds the winner's live lease."""
    watch = ManualClock(0)
    with (
        server.open() as holder,
        server.open(monotonic=watch) as b,
        server.open(monotonic=watch) as c,
    ):
        holder.claim(req(key, lease=1))
        assert b.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
        assert c.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
        watch.advance(1.1)
        first = b.claim(req(key, lease=30))
        second = c.claim(req(key))
        assert first.outcome is ClaimOutcome.TOOK_OVER
        assert second.outcome is ClaimOutcome.IN_PROGRESS and second.fence == first.fence


def test_past_the_skew_allowance_the_wall_clock_decides(server: Server, key: str) -> None:
    """A claimer that never watched the lease (a new process) takes it over by its wall clock
    once the lease ended more than skew_allowance ago."""
    clock = ManualClock(time.time())
    with server.open() as holder, server.open(clock=clock, skew_allowance=2) as fresh:
        held = holder.claim(req(key, lease=1))
        clock.set(held.record.lease_expires_at / 1e6 + 1.8)  # 1.8 s past the lease end
        assert fresh.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
    with server.open(clock=clock, skew_allowance=2) as fresh:  # no memory of the lease
        clock.advance(0.4)
        took = fresh.claim(req(key))
        assert took.outcome is ClaimOutcome.TOOK_OVER and took.fence > held.fence


def test_an_item_without_a_lease_version_is_watched_too(server: Server, key: str) -> None:
    """Items written before lease versions existed are watched by fence and lease end."""
    watch = ManualClock(0)
    with server.open() as holder, server.open(monotonic=watch) as watcher:
        held = holder.claim(req(key, lease=1))
        holder.client.update_item(
            TableName=TABLE, Key={"pk": {"S": key}}, UpdateExpression="REMOVE version"
        )
        assert watcher.claim(req(key)).outcome is ClaimOutcome.IN_PROGRESS
        watch.advance(1.1)
        took = watcher.claim(req(key))
        assert took.outcome is ClaimOutcome.TOOK_OVER and took.fence > held.fence


def test_clock_behind_still_gets_a_larger_fence(server: Server, key: str) -> None:
    """Fences come from the claimer's clock; one running 10 s behind the previous holder's
    still gets a larger fence (max(now, previous + 1), by a condition on the old fence)."""
    with (
        server.open(clock=SkewedClock(10.0)) as ahead,
        server.open(clock=SkewedClock(-10.0)) as behind,
    ):
        first = ahead.claim(req(key))
        ahead.release(key, first.fence)
        calls = store_calls(behind)
        second = behind.claim(req(key))
        assert second.outcome is ClaimOutcome.CLAIMED
        assert second.fence == first.fence + 1
        # The first write assumed our clock was past the stored fence; the retry conditions
        # on the fence it found.
        assert calls.take().count("PutItem") == 2
        behind.complete(key, second.fence, b"ok", TTL)


# -- the shared table ---------------------------------------------------------------------------


def test_namespaces_share_a_table(server: Server, key: str) -> None:
    with (
        server.open(SHARED_TABLE, sort_key="sk", namespace="a") as a,
        server.open(SHARED_TABLE, sort_key="sk", namespace="b") as b,
    ):
        before = time.time()
        assert a.claim(req(key)).outcome is ClaimOutcome.CLAIMED
        assert b.claim(req(key)).outcome is ClaimOutcome.CLAIMED  # another namespace
        raw = a.client.get_item(TableName=SHARED_TABLE, Key={"pk": {"S": "a"}, "sk": {"S": key}})
        assert raw["Item"]["status"] == {"S": "in_progress"}
        ttl = int(raw["Item"]["ttl"]["N"])
        # epoch seconds, after our expiry plus the skew allowance (AWS's clock deletes)
        late = TTL + a.settings.skew_allowance
        assert before + late < ttl < time.time() + late + 10
