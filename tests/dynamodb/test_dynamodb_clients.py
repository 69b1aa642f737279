"""Errors, given clients and sessions, fork, URLs and botocore's retries."""

from __future__ import annotations

import asyncio
import http.client
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import boto3
import pytest
import urllib3.exceptions
from ddb_servers import REGION, TABLE, Server
from idem_dynamodb.backend import BACKEND
from idem_dynamodb.store import DynamoDBStore

from idem_core.errors import (
    ConfigurationError,
    StoreUnavailable,
)
from idem_core.record import ClaimOutcome, ClaimRequest

TTL = 600.0
SIDE_TABLE = "idem_side_effects"


def req(key: str, lease: float = 30.0, fingerprint: str = "f" * 32) -> ClaimRequest:
    return ClaimRequest(key, fingerprint, uuid.uuid4().hex, lease, TTL)


@pytest.fixture
def key() -> str:
    return f"t-{uuid.uuid4().hex}"


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
    """On boto3 (``lean=0``); the lean path's retries are in test_dynamodb_wire.py."""
    with server.open(max_attempts=3, lean=0) as store:
        store.client.meta.events.register("before-send.dynamodb.PutItem", _throttle(2))
        assert store.claim(req(key)).outcome is ClaimOutcome.CLAIMED  # third attempt
    with server.open(max_attempts=2, lean=0) as store:
        store.client.meta.events.register("before-send.dynamodb.PutItem", _throttle(5))
        with pytest.raises(StoreUnavailable, match="Throttling") as info:
            store.claim(req(f"{key}-2"))
        cause = info.value.__cause__
        assert cause is not None and type(cause).__name__ == "ThrottlingException"


# -- one translation for every driver error (boto3's path: lean=0) ----------------------------


def _raising(exc: BaseException) -> Any:
    """A before-send hook raising ``exc`` below botocore's own error handling, as the HTTP
    layer does for some broken connections."""

    def hook(**_: Any) -> None:
        raise exc

    return hook


LOW_LEVEL = [
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
    http.client.IncompleteRead(b"partial"),
    urllib3.exceptions.ProtocolError("Connection broken"),
]


@pytest.mark.parametrize("error", LOW_LEVEL, ids=lambda e: type(e).__name__)
def test_sync_low_level_errors_are_store_unavailable(
    dynamodb_local: Server, key: str, error: BaseException
) -> None:
    with dynamodb_local.open(max_attempts=1, lean=0) as store:
        store.client.meta.events.register("before-send.dynamodb.GetItem", _raising(error))
        with pytest.raises(StoreUnavailable) as info:
            store.get(key)
        assert info.value.__cause__ is error


@pytest.mark.parametrize(
    "error",
    [*LOW_LEVEL, aiohttp.ClientPayloadError("cut"), aiohttp.ServerDisconnectedError()],
    ids=lambda e: type(e).__name__,
)
async def test_async_low_level_errors_are_store_unavailable(
    dynamodb_local: Server, key: str, error: BaseException
) -> None:
    store = BACKEND.open_async(dynamodb_local.url(max_attempts=1, lean=0))
    try:
        client = await store._get_client()
        client.meta.events.register("before-send.dynamodb.GetItem", _raising(error))
        with pytest.raises(StoreUnavailable) as info:
            await store.get(key)
        assert info.value.__cause__ is error
    finally:
        await store.close()


# -- one fork policy for both stores ----------------------------------------------------------


def _in_child(check: Callable[[], bool]) -> bool:
    """Runs ``check`` in a forked child; whether it returned True."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without pytest's teardown
        status = 1
        try:
            status = 0 if check() else 2
        finally:
            os.write(write, bytes([status]))
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        status = pipe.read(1)
    os.waitpid(pid, 0)
    return status == b"\x00"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_after_fork_a_given_client_is_refused_and_a_session_works(
    dynamodb_local: Server, key: str
) -> None:
    """Sync and async alike: the child never uses the parent's client (refused with a clear
    error), while a store opened from the URL or a session builds its own."""
    import aioboto3

    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=dynamodb_local.endpoint)
    given = BACKEND.open(dynamodb_local.url(), client=client)
    from_session = BACKEND.open(dynamodb_local.url(), client=boto3.session.Session())
    given.get(key)
    from_session.get(key)
    aio_session = BACKEND.open_async(dynamodb_local.url(), client=aioboto3.Session())
    loop = asyncio.new_event_loop()
    context = aioboto3.Session().client("dynamodb", endpoint_url=dynamodb_local.endpoint)
    aclient = loop.run_until_complete(context.__aenter__())
    aio_given = BACKEND.open_async(dynamodb_local.url(), client=aclient)
    loop.run_until_complete(aio_given.get(key))

    def child() -> bool:
        with pytest.raises(ConfigurationError, match="forked child"):
            given.get(key)
        assert from_session.client is not client
        assert from_session.claim(req(f"{key}-child")).outcome.acquired

        async def aio() -> None:
            with pytest.raises(ConfigurationError, match="forked child"):
                await aio_given.get(key)
            assert await aio_session.get(f"{key}-child") is not None
            await aio_session.close()

        asyncio.run(aio())
        return True

    assert _in_child(child)
    assert given.client is client  # the parent's is untouched
    assert given.get(f"{key}-child") is not None
    assert loop.run_until_complete(aio_given.get(f"{key}-child")) is not None
    loop.run_until_complete(context.__aexit__(None, None, None))
    loop.close()
    given.close()
    from_session.close()
    client.close()
