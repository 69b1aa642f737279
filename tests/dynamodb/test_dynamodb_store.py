"""What the conformance suite does not cover: request counts, transactions, item size,
compression, corrupt items, clock skew, setup and diagnostics, errors, clients and fork."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from ddb_servers import REGION, SHARED_TABLE, TABLE, Server, counting
from idem_dynamodb import TransactionCanceled
from idem_dynamodb.backend import BACKEND
from idem_dynamodb.store import DynamoDBStore

from idem_core.clock import ManualClock, SkewedClock
from idem_core.errors import (
    ConfigurationError,
    CorruptRecord,
    LeaseLost,
    ResultNotSerializable,
    StoreUnavailable,
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
    calls = counting(store.client)
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


async def test_requests_per_call_async(server: Server, key: str) -> None:
    store = BACKEND.open_async(server.url())
    try:
        claimed = await store.claim(req(key))  # builds the client
        calls = counting(await store._get_client())
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
    calls = counting(store.client)
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
    calls = counting(store.client)
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
        calls = counting(behind.client)
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
        assert a.claim(req(key)).outcome is ClaimOutcome.CLAIMED
        assert b.claim(req(key)).outcome is ClaimOutcome.CLAIMED  # another namespace
        raw = a.client.get_item(TableName=SHARED_TABLE, Key={"pk": {"S": "a"}, "sk": {"S": key}})
        assert raw["Item"]["status"] == {"S": "in_progress"}
        ttl = int(raw["Item"]["ttl"]["N"])
        assert time.time() + TTL < ttl < time.time() + TTL + 10  # epoch seconds


# -- errors, clients, fork ----------------------------------------------------------------------


def test_unreachable_server_is_store_unavailable(key: str) -> None:
    with BACKEND.open(
        "dynamodb://idem_test?region=us-east-1&endpoint_url=http://127.0.0.1:9"
        "&connect_timeout=0.5&max_attempts=2"
    ) as store:
        with pytest.raises(StoreUnavailable) as info:
            store.claim(req(key))
        assert info.value.__cause__ is not None


def test_missing_table_names_setup(server: Server, key: str) -> None:
    with (
        server.open("idem_no_such_table") as store,
        pytest.raises(StoreUnavailable, match="idem setup"),
    ):
        store.get(key)


def test_retry_mode_reaches_botocore(server: Server) -> None:
    with server.open(retry_mode="adaptive", max_attempts=7, read_timeout=2.5) as store:
        config = store.client.meta.config
        assert config.retries == {"mode": "adaptive", "total_max_attempts": 7}
        assert config.read_timeout == 2.5


def test_given_client_and_session(server: Server, key: str) -> None:
    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=server.endpoint)
    store = BACKEND.open(server.url(), client=client)
    assert store.client is client
    store.claim(req(key))
    store.close()
    assert client.describe_table(TableName=TABLE)["Table"]["TableName"] == TABLE  # still open
    session = boto3.session.Session(region_name=REGION)
    with BACKEND.open(server.url(), client=session) as from_session:
        assert from_session.get(key) is not None
    table = session.resource("dynamodb", endpoint_url=server.endpoint).Table(TABLE)
    with pytest.raises(ConfigurationError, match="not a resource"):
        BACKEND.open(server.url(), client=table)


async def test_async_given_aioboto3_session(server: Server, key: str) -> None:
    import aioboto3

    session = aioboto3.Session(region_name=REGION)
    store = BACKEND.open_async(server.url(), client=session)
    try:
        assert (await store.claim(req(key))).outcome is ClaimOutcome.CLAIMED
    finally:
        await store.close()
    async with session.client("dynamodb", endpoint_url=server.endpoint) as client:
        given = BACKEND.open_async(server.url(), client=client)
        assert (await given.claim(req(key))).outcome is ClaimOutcome.IN_PROGRESS
        await given.close()
        await client.describe_table(TableName=TABLE)  # not closed by the store


def test_claim_many_runs_side_by_side(store: DynamoDBStore, key: str) -> None:
    keys = [f"{key}-{i}" for i in range(24)]
    out = store.claim_many([req(k) for k in keys])
    assert [r.record.key for r in out] == keys
    assert {r.outcome for r in out} == {ClaimOutcome.CLAIMED}


async def test_async_claim_many_gathers(server: Server, key: str) -> None:
    store = BACKEND.open_async(server.url())
    try:
        keys = [f"{key}-{i}" for i in range(12)]
        out = await store.claim_many([req(k) for k in keys])
        assert [r.record.key for r in out] == keys
        again = await asyncio.gather(store.claim_many([req(k) for k in keys]))
        assert {r.outcome for r in again[0]} == {ClaimOutcome.IN_PROGRESS}
    finally:
        await store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_builds_its_own_client(store: DynamoDBStore, key: str) -> None:
    parent_client = store.client
    store.claim(req(key))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without pytest's teardown
        status = 1
        try:
            child_client = store.client
            rec = store.get(key)
            fresh = store.claim(req(f"{key}-child"))
            ok = child_client is not parent_client and rec is not None and fresh.outcome.acquired
            status = 0 if ok else 2
        finally:
            os.write(write, bytes([status]))
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        status = pipe.read(1)
    os.waitpid(pid, 0)
    assert status == b"\x00"
    assert store.client is parent_client
    assert store.get(f"{key}-child") is not None


# -- the URL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("dynamodb://", "table name"),
        ("dynamodb://ab", "table name"),
        ("dynamodb://t_1?bogus=1", "unknown dynamodb:// option"),
        ("dynamodb://t_1?retry_mode=fast", "retry_mode"),
        ("dynamodb://t_1?skew_allowance=soon", "skew_allowance must be a number"),
        ("dynamodb://t_1?skew_allowance=-1", "skew_allowance must be >= 0"),
        ("dynamodb://t_1?skew=1", "skew= was replaced by skew_allowance="),
        ("dynamodb://t_1?sort_key=pk", "sort_key must differ"),
        ("dynamodb://t_1?endpoint_url=notaurl", "endpoint_url must be an http"),
        ("dynamodb://t_1?endpoint_url=ftp://host", "endpoint_url must be an http"),
        ("dynamodb://t_1?endpoint_url=http://127.0.0.1:port", "endpoint_url .* not a valid"),
        ("dynamodb://t_1?endpoint_url=http://127.0.0.1:99999", "endpoint_url .* not a valid"),
        ("dynamodb://t_1?connect_timeout=fast", "connect_timeout must be a number"),
        ("dynamodb://t_1?read_timeout=0", "read_timeout must be a positive"),
        ("dynamodb://t_1?read_timeout=inf", "read_timeout must be a positive"),
        ("dynamodb://t_1?connect_timeout=nan", "connect_timeout must be a positive"),
        ("dynamodb://t_1?max_attempts=2.5", "max_attempts must be an integer"),
        ("dynamodb://t_1?max_attempts=0", "max_attempts must be at least 1"),
        ("dynamodb://t_1?pool_size=many", "pool_size must be an integer"),
        ("dynamodb://t_1?compress_above=big", "compress_above must be an integer"),
        ("dynamodb://t_1?region=eu-west-1&timeout=3", "unknown dynamodb:// option.* timeout"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    """Refused when the store is built, before any request, naming the parameter."""
    with pytest.raises(ConfigurationError, match=match):
        BACKEND.open(url)
    with pytest.raises(ConfigurationError, match=match):
        BACKEND.open_async(url)


def test_url_options_and_keyword_overrides() -> None:
    store = BACKEND.open(
        "dynamodb://my.table-1?region=eu-west-1&sort_key=sk&namespace=orders"
        "&skew_allowance=0.25&compress_above=off&ttl_attr=expiration&connect_timeout=1.5"
        "&read_timeout=2&max_attempts=3&endpoint_url=http://localhost:8000",
        skew_allowance=120,
    )
    s = store.settings
    assert (s.table, s.region, s.sort_key, s.namespace) == (
        "my.table-1",
        "eu-west-1",
        "sk",
        "orders",
    )
    assert s.skew_allowance == 120 and s.compress_above is None and s.ttl_attr == "expiration"
    assert (s.connect_timeout, s.read_timeout, s.max_attempts) == (1.5, 2.0, 3)
    assert s.endpoint_url == "http://localhost:8000"
    # 3 attempts of 1.5 + 2 s, and botocore's backoff of at most 1 then 2 s between them
    assert s.unavailable_within == 3 * 3.5 + 1 + 2
    assert store.max_key_length == 256 and store.server_clock is False
    store.close()


@pytest.fixture
def _no_region(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)


@pytest.mark.usefixtures("_no_region")
def test_missing_region_is_a_configuration_error(key: str) -> None:
    with (
        BACKEND.open("dynamodb://idem_test") as store,
        pytest.raises(ConfigurationError, match="region"),
    ):
        store.get(key)


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def _throttle(times: int) -> Any:
    """A before-send hook answering the first ``times`` PutItem sends with throttling, as an
    overloaded partition does; botocore's retry mode decides what happens next."""
    from botocore.awsrequest import AWSResponse

    left = [times]

    def hook(request: Any, **_: Any) -> Any:
        if left[0] <= 0:
            return None
        left[0] -= 1
        body = b'{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException",'
        body += b'"message":"Rate of requests exceeds the allowed throughput."}'
        headers = {"x-amzn-ErrorType": "ThrottlingException"}
        return AWSResponse(request.url, 400, headers, _Body(body))

    return hook


def test_throttling_is_retried_then_unavailable(server: Server, key: str) -> None:
    with server.open(max_attempts=3) as store:
        store.client.meta.events.register("before-send.dynamodb.PutItem", _throttle(2))
        assert store.claim(req(key)).outcome is ClaimOutcome.CLAIMED  # third attempt
    with server.open(max_attempts=2) as store:
        store.client.meta.events.register("before-send.dynamodb.PutItem", _throttle(5))
        with pytest.raises(StoreUnavailable, match="Throttling") as info:
            store.claim(req(f"{key}-2"))
        cause = info.value.__cause__
        assert cause is not None and type(cause).__name__ == "ThrottlingException"
