"""The lean path (:mod:`idem_dynamodb.wire`): requests as botocore writes and signs them,
replies read as botocore reads them, endpoints as botocore resolves them, botocore's standard
retries (on a scripted server: no real server throttles on demand), credentials that refresh,
kept-alive connections, and a connection dropped while idle."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.credentials import Credentials as BotoCredentials
from ddb_servers import REGION, TABLE, Server
from fault_proxy import FaultProxy
from idem_dynamodb.backend import BACKEND
from idem_dynamodb.wire import resolve
from idem_dynamodb.wire.client import Wire
from idem_dynamodb.wire.protocol import OPERATIONS, ServiceError, encode
from idem_dynamodb.wire.resolve import Credentials
from idem_dynamodb.wire.sigv4 import Frozen, Signer
from scripted_server import Scripted, ScriptedServer, throttled

from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.record import ClaimOutcome, ClaimRequest

TTL = 600.0
WHEN = datetime.datetime(2026, 12, 2, 3, 50, 7)
AMZ_WHEN = "20261202T035007Z"


def req(key: str) -> ClaimRequest:
    return ClaimRequest(key, "f" * 32, uuid.uuid4().hex, 30.0, TTL)


@pytest.fixture
def key() -> str:
    return f"w-{uuid.uuid4().hex}"


# -- requests: botocore's body, botocore's signature ---------------------------------------------

REQUESTS: dict[str, dict[str, Any]] = {
    "put_item": {
        "TableName": "idem_test",
        "Item": {
            "pk": {"S": "key ü/1"},
            "fence": {"N": "17"},
            "result": {"B": b"\x00\xffbinary result"},
        },
        "ReturnValues": "ALL_OLD",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        "ConditionExpression": "attribute_not_exists(#k) OR #f < :fence",
        "ExpressionAttributeNames": {"#k": "pk", "#f": "fence"},
        "ExpressionAttributeValues": {":fence": {"N": "17"}},
    },
    "update_item": {
        "TableName": "idem_test",
        "Key": {"pk": {"S": "k"}},
        "UpdateExpression": "SET #st = :done, #r = :r",
        "ConditionExpression": "#f = :fence",
        "ExpressionAttributeNames": {"#st": "status", "#r": "result", "#f": "fence"},
        "ExpressionAttributeValues": {
            ":done": {"S": "COMPLETED"},
            ":r": {"B": b"x" * 100},
            ":fence": {"N": "3"},
        },
        "ReturnValues": "ALL_OLD",
    },
    "get_item": {"TableName": "idem_test", "Key": {"pk": {"S": "k"}}, "ConsistentRead": True},
    "delete_item": {"TableName": "idem_test", "Key": {"pk": {"S": "k"}}},
}
ENDPOINTS = [
    "http://127.0.0.1:8000",
    "https://dynamodb.eu-west-1.amazonaws.com",
    "http://localhost:4566/some/base",
]


def _split(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    first, *lines = head.decode().split("\r\n")
    return first, dict(line.split(": ", 1) for line in lines), body


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def _botocore_request(op: str, endpoint: str, token: str | None) -> AWSRequest:
    """What boto3 sends for ``op`` (captured before the send; no request is made)."""
    client = boto3.client(
        "dynamodb",
        region_name="eu-west-1",
        endpoint_url=endpoint,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        aws_session_token=token,
    )
    sent: list[AWSRequest] = []

    def capture(request: AWSRequest, **_: Any) -> AWSResponse:
        sent.append(request)
        return AWSResponse(request.url, 200, {}, _Body(b"{}"))

    client.meta.events.register("before-send.dynamodb", capture)
    getattr(client, op)(**REQUESTS[op])
    client.close()
    return sent[0]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzEXAMPLETOKEN"])
@pytest.mark.parametrize("op", sorted(REQUESTS))
def test_request_is_botocore_s(
    monkeypatch: pytest.MonkeyPatch, op: str, token: str | None, endpoint: str
) -> None:
    """The same body (members, order, values; msgspec writes no spaces after separators,
    botocore's json.dumps does), the same target, and the signature botocore's SigV4Auth
    computes for the same request, credentials and time. And the other way round: our
    signer signs botocore's own request exactly as botocore did."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: WHEN)
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    creds = Frozen("AKIDEXAMPLE", secret, token)
    wire = Wire(endpoint, "eu-west-1", Credentials(static=creds), 4)
    body = encode(REQUESTS[op])
    first, headers, sent_body = _split(wire.request(OPERATIONS[op], body, creds, AMZ_WHEN))
    path = endpoint.split("//", 1)[1].partition("/")[2]
    assert first == f"POST /{path} HTTP/1.1"
    assert sent_body == body and headers["content-length"] == str(len(body))

    theirs = _botocore_request(op, endpoint, token)
    assert theirs.body is not None
    assert json.dumps(json.loads(body)) == theirs.body.decode()  # same JSON, same order
    assert headers["x-amz-target"] == _text(theirs.headers["X-Amz-Target"])
    assert headers["content-type"] == _text(theirs.headers["Content-Type"])
    assert headers["host"] == botocore.auth._host_from_url(endpoint)

    # botocore's signer on our request
    unsigned = {
        k: v
        for k, v in headers.items()
        if k not in {"authorization", "x-amz-date", "x-amz-security-token", "content-length"}
    }
    ours = AWSRequest("POST", endpoint, headers=unsigned, data=body)
    SigV4Auth(BotoCredentials("AKIDEXAMPLE", secret, token), "dynamodb", "eu-west-1").add_auth(ours)
    assert headers["authorization"] == ours.headers["Authorization"]
    assert headers["x-amz-date"] == ours.headers["X-Amz-Date"] == AMZ_WHEN
    assert headers.get("x-amz-security-token") == ours.headers.get("X-Amz-Security-Token")

    # our signer on botocore's request
    their_auth = _text(theirs.headers["Authorization"])
    names = their_auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    their_headers = {
        k.lower(): _text(v)
        for k, v in theirs.headers.items()
        if k.lower() in names and k.lower() not in {"x-amz-date", "x-amz-security-token"}
    }
    their_headers["host"] = botocore.auth._host_from_url(endpoint)
    signed = Signer("eu-west-1", path=f"/{path}").sign(
        creds, their_headers, theirs.body, _text(theirs.headers["X-Amz-Date"])
    )
    assert signed["authorization"] == their_auth


# -- replies: read as botocore reads them -------------------------------------------------------


def test_replies_read_as_botocore_reads_them(server: Server, key: str) -> None:
    with server.open() as store:
        wire = store._lean_client()
        client = store.client
        item = {
            "pk": {"S": key},
            "blob": {"B": b"\x00\x01\xfe"},
            "n": {"N": "12"},
            "nested": {"M": {"b": {"B": b"in"}, "l": {"L": [{"B": b"x"}, {"S": "y"}]}}},
            "bs": {"BS": [b"a", b"b"]},
        }
        client.put_item(TableName=TABLE, Item=item)
        mine = wire.call("get_item", {"TableName": TABLE, "Key": {"pk": {"S": key}}})
        theirs = client.get_item(TableName=TABLE, Key={"pk": {"S": key}})
        assert mine["Item"] == theirs["Item"]
        assert mine["Item"]["blob"] == {"B": b"\x00\x01\xfe"}
        kwargs = {
            "TableName": TABLE,
            "Item": {"pk": {"S": key}},
            "ConditionExpression": "attribute_not_exists(pk)",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
        with pytest.raises(ServiceError) as info:
            wire.call("put_item", kwargs)
        with pytest.raises(client.exceptions.ConditionalCheckFailedException) as boto_info:
            client.put_item(**kwargs)
        assert info.value.code == boto_info.value.response["Error"]["Code"]
        assert info.value.response.get("Item") == boto_info.value.response.get("Item")
        assert (info.value.response.get("Item") is not None) is server.returns_old


# -- which path ---------------------------------------------------------------------------------


def test_lean_by_default_and_lean_0_is_boto3_only(server: Server, key: str) -> None:
    with server.open() as store:
        assert store._lean
        store.claim(req(key))
        assert store._client is None  # the hot path built no boto3 client
        assert store._wire is not None
    with server.open(lean="0") as store:
        assert not store._lean
        store.claim(req(f"{key}-b"))
        assert store._wire is None and store._client is not None
    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=server.endpoint)
    with BACKEND.open(server.url(), client=client) as given:
        assert not given._lean  # the caller's client serves everything
    with server.open(retry_mode="adaptive") as adaptive:
        assert not adaptive._lean
    with pytest.raises(ConfigurationError, match="lean must be"):
        server.open(lean="maybe")


async def test_async_lean_builds_no_aiobotocore_client(server: Server, key: str) -> None:
    store = BACKEND.open_async(server.url())
    try:
        assert (await store.claim(req(key))).outcome is ClaimOutcome.CLAIMED
        assert store._bound is not None and store._bound.client is None
        assert store._bound.wire is not None
    finally:
        await store.close()


# -- endpoints and regions as botocore resolves them --------------------------------------------


@pytest.fixture
def _plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment credentials, no config file, no endpoint overrides: the Lambda case."""
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_DYNAMODB",
        "AWS_USE_FIPS_ENDPOINT",
        "AWS_USE_DUALSTACK_ENDPOINT",
        "AWS_PROFILE",
        "AWS_CREDENTIAL_EXPIRATION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/idem-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/idem-credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLAMBDA")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")


REGIONS = ["us-east-1", "eu-central-2", "ap-southeast-5", "mx-central-1", "cn-north-1"]
REGIONS += ["us-gov-west-1", "us-iso-east-1", "eu-isoe-west-1", "local"]


@pytest.mark.usefixtures("_plain_env")
@pytest.mark.parametrize("region", REGIONS)
def test_endpoint_is_botocore_s(region: str) -> None:
    """Public endpoints are worked out without botocore; the rest is botocore's own answer.
    No request is made."""
    with BACKEND.open(f"dynamodb://idem_test?region={region}") as store:
        boto = store.client.meta.endpoint_url
        found = resolve.fast(store.settings)
        assert found is not None and found.credentials.frozen() == Frozen(
            "AKIDLAMBDA", "secret", "token"
        )
        assert found.endpoint in (boto, None)
        assert store._lean_client().wire.endpoint.url == boto


@pytest.mark.usefixtures("_plain_env")
@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("AWS_USE_FIPS_ENDPOINT", "true"),
        ("AWS_USE_DUALSTACK_ENDPOINT", "true"),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
        ("AWS_ENDPOINT_URL_DYNAMODB", "https://ddb.example.test:8443/base"),
    ],
)
def test_endpoint_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    with BACKEND.open("dynamodb://idem_test?region=us-west-2") as store:
        assert store._lean_client().wire.endpoint.url == store.client.meta.endpoint_url


@pytest.mark.usefixtures("_plain_env")
def test_region_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    with BACKEND.open("dynamodb://idem_test") as store:
        wire = store._lean_client().wire
        assert wire.region == "eu-west-3" == store.client.meta.region_name
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    with BACKEND.open("dynamodb://idem_test") as store, pytest.raises(ConfigurationError):
        store.get("k")


# -- botocore's standard retries, on a scripted server ------------------------------------------


@pytest.fixture
def scripted(_aws_env: None) -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


def test_throttling_is_retried_then_unavailable(scripted: ScriptedServer, key: str) -> None:
    scripted.script = [throttled(), throttled()]
    with BACKEND.open(scripted.url(max_attempts=3)) as store:
        assert store.claim(req(key)).outcome is ClaimOutcome.CLAIMED  # third attempt
    assert [r.target for r in scripted.received] == ["DynamoDB_20120810.PutItem"] * 3
    assert len({r.body for r in scripted.received}) == 1  # the same request, signed anew
    scripted.received.clear()
    scripted.script = [throttled()] * 5
    with BACKEND.open(scripted.url(max_attempts=2)) as store:
        with pytest.raises(StoreUnavailable, match="ProvisionedThroughputExceeded") as info:
            store.claim(req(f"{key}-2"))
    cause = info.value.__cause__
    assert isinstance(cause, ServiceError) and "reached max retries: 1" in str(cause)
    assert cause.response["Error"]["Code"] == "ProvisionedThroughputExceededException"
    assert len(scripted.received) == 2


@pytest.mark.parametrize(
    ("reply", "retried"),
    [
        (Scripted(500, {"__type": "InternalServerError", "message": "boom"}), True),
        (Scripted(503, b"<html>Service Unavailable</html>"), True),
        (Scripted(200, {}, bad_crc=True), True),
        (Scripted(200, b"not json"), True),
        (Scripted(400, {"__type": "x#ValidationException", "message": "bad"}), False),
    ],
    ids=["500", "503-html", "crc32", "garbled", "validation"],
)
def test_what_is_retried(
    scripted: ScriptedServer, key: str, reply: Scripted, retried: bool
) -> None:
    scripted.script = [reply]
    with BACKEND.open(scripted.url(max_attempts=2)) as store:
        if retried:
            assert store.claim(req(key)).outcome is ClaimOutcome.CLAIMED
        else:
            with pytest.raises(StoreUnavailable, match="ValidationException"):
                store.claim(req(key))
    assert len(scripted.received) == (2 if retried else 1)


async def test_async_throttling_is_retried(scripted: ScriptedServer, key: str) -> None:
    scripted.script = [throttled(), throttled()]
    store = BACKEND.open_async(scripted.url(max_attempts=3))
    try:
        assert (await store.claim(req(key))).outcome is ClaimOutcome.CLAIMED
        scripted.script = [throttled()] * 3
        with pytest.raises(StoreUnavailable, match="ProvisionedThroughputExceeded"):
            await store.claim(req(f"{key}-2"))
    finally:
        await store.close()
    assert len(scripted.received) == 6


def test_retry_quota_stops_retries(scripted: ScriptedServer, key: str) -> None:
    """botocore's quota: 500 units, 5 per retry. Once spent, errors come back at once."""
    with BACKEND.open(scripted.url(max_attempts=2)) as store:
        wire = store._lean_client()
        wire.wire.retries.quota = 7
        scripted.script = [throttled(), throttled(), throttled()]
        with pytest.raises(StoreUnavailable):
            store.claim(req(key))  # throttled, retried (quota 2 left), throttled again
        scripted.received.clear()
        with pytest.raises(StoreUnavailable):
            store.claim(req(f"{key}-2"))  # throttled: no quota for a retry
        assert len(scripted.received) == 1


# -- credentials --------------------------------------------------------------------------------


def _access_key(received: Any) -> str:
    return str(received.headers["authorization"].split("Credential=")[1].split("/")[0])


def test_credentials_refresh(
    scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """Credentials that expire (here botocore's environment provider with an expiry, which
    re-reads the environment when they near it) are refreshed between requests."""
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", soon.strftime("%Y-%m-%dT%H:%M:%SZ"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFIRST")
    with BACKEND.open(scripted.url()) as store:
        store.claim(req(key))
        assert store._lean_client().wire.credentials.refreshable
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECOND")
        monkeypatch.setenv("AWS_SESSION_TOKEN", "second-token")
        store.claim(req(f"{key}-2"))
    first, second = scripted.received
    assert _access_key(first) == "AKIDFIRST" and "x-amz-security-token" not in first.headers
    assert _access_key(second) == "AKIDSECOND"
    assert second.headers["x-amz-security-token"] == "second-token"


async def test_async_credentials_refresh(
    scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", soon.strftime("%Y-%m-%dT%H:%M:%SZ"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFIRST")
    store = BACKEND.open_async(scripted.url())
    try:
        await store.claim(req(key))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECOND")
        await store.claim(req(f"{key}-2"))
    finally:
        await store.close()
    assert [_access_key(r) for r in scripted.received] == ["AKIDFIRST", "AKIDSECOND"]


# -- connections --------------------------------------------------------------------------------


def test_connections_are_kept_alive(
    dynamodb_local: Server, scripted: ScriptedServer, key: str
) -> None:
    """One connection for many requests (moto's server closes every connection after one
    reply, so it is not used here)."""
    with dynamodb_local.open() as store:
        for i in range(20):
            store.claim(req(f"{key}-{i}"))
        assert store._lean_client().pool.opened == 1
    with BACKEND.open(scripted.url()) as store:
        for i in range(10):
            store.claim(req(f"{key}-s{i}"))
    assert len({r.peer for r in scripted.received}) == 1  # one TCP connection


async def test_async_connections_are_kept_alive(dynamodb_local: Server, key: str) -> None:
    store = BACKEND.open_async(dynamodb_local.url())
    try:
        for i in range(20):
            await store.claim(req(f"{key}-{i}"))
        assert (await store._get_wire()).pool.opened == 1
    finally:
        await store.close()


@pytest.fixture
def proxy(dynamodb_local: Server) -> Iterator[FaultProxy]:
    port = int(dynamodb_local.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as p:
        yield p


def _proxied(dynamodb_local: Server, proxy: FaultProxy, **options: Any) -> str:
    # A dropped path fails at once (the proxy closes what it accepts): the read timeout only
    # bounds a healthy DynamoDB Local, which on a loaded machine can take seconds to answer.
    url = dynamodb_local.url(connect_timeout=0.5, read_timeout=10, **options)
    return url.replace(dynamodb_local.endpoint, f"http://127.0.0.1:{proxy.port}")


def test_connection_dropped_while_idle_is_resent_once(
    dynamodb_local: Server, proxy: FaultProxy, key: str
) -> None:
    """A kept-alive connection closed while idle (here by the path; in life by DynamoDB or
    a load balancer) fails before any reply: the request goes once more on a new connection,
    without the retry policy's backoff. With the path still down, StoreUnavailable."""
    with BACKEND.open(_proxied(dynamodb_local, proxy, max_attempts=1)) as store:
        store.claim(req(key))
        proxy.drop()
        proxy.heal()
        assert store.claim(req(f"{key}-2")).outcome is ClaimOutcome.CLAIMED
        assert store._lean_client().pool.opened == 2
        proxy.drop()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            store.claim(req(f"{key}-3"))
        assert time.monotonic() - t0 < 2
        assert isinstance(info.value.__cause__, OSError)


async def test_async_connection_dropped_while_idle_is_resent_once(
    dynamodb_local: Server, proxy: FaultProxy, key: str
) -> None:
    store = BACKEND.open_async(_proxied(dynamodb_local, proxy, max_attempts=1))
    try:
        await store.claim(req(key))
        proxy.drop()
        proxy.heal()
        await asyncio.sleep(0.05)  # the close reaches the client
        assert (await store.claim(req(f"{key}-2"))).outcome is ClaimOutcome.CLAIMED
        assert (await store._get_wire()).pool.opened == 2
        proxy.drop()
        with pytest.raises(StoreUnavailable):
            await store.claim(req(f"{key}-3"))
    finally:
        proxy.heal()
        await store.close()


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost, made by the openssl command."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key]
    argv += ["-out", cert, "-days", "1", "-subj", "/CN=localhost"]
    argv += ["-addext", "subjectAltName=DNS:localhost"]
    subprocess.run(
        argv,
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.usefixtures("_aws_env")
async def test_https_is_verified_with_the_ca_bundle(
    certificate: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    key: str,
) -> None:
    """HTTPS, verified against AWS_CA_BUNDLE as botocore does; an unknown certificate is
    refused (StoreUnavailable, an SSL error as the cause), sync and async."""
    with ScriptedServer(tls=certificate) as tls:
        monkeypatch.setenv("AWS_CA_BUNDLE", certificate[0])
        with BACKEND.open(tls.url()) as store:
            assert store.claim(req(key)).outcome is ClaimOutcome.CLAIMED
            assert store.claim(req(f"{key}-2")).outcome is ClaimOutcome.CLAIMED
        astore = BACKEND.open_async(tls.url())
        try:
            assert (await astore.claim(req(f"{key}-3"))).outcome is ClaimOutcome.CLAIMED
        finally:
            await astore.close()
        assert len(tls.received) == 3 and len({r.peer for r in tls.received}) == 2
        monkeypatch.delenv("AWS_CA_BUNDLE")
        with BACKEND.open(tls.url(max_attempts=1)) as store:
            with pytest.raises(StoreUnavailable) as info:
                store.claim(req(f"{key}-4"))
            assert isinstance(info.value.__cause__, ssl.SSLError)
        astore = BACKEND.open_async(tls.url(max_attempts=1))
        try:
            with pytest.raises(StoreUnavailable) as ainfo:
                await astore.claim(req(f"{key}-5"))
            assert isinstance(ainfo.value.__cause__, ssl.SSLError)
        finally:
            await astore.close()


# -- the reply parser, byte by byte -------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\nx-amz-crc32: 1\r\n\r\n{"a": "bc"}',
        b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"a": "bc"}',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;ext=1\r\n{"a"\r\n7\r\n: "bc"}\r\n0\r\n\r\n',
        b'HTTP/1.0 200 OK\r\nContent-Type: x\r\n\r\n{"a": "bc"}',
    ],
    ids=["length", "interim", "chunked", "until-close"],
)
@pytest.mark.parametrize("step", [1, 7, 4096])
def test_reply_parser(raw: bytes, step: int) -> None:
    from idem_dynamodb.wire.http import Reply

    reply = Reply()
    done = False
    for i in range(0, len(raw), step):
        assert not done
        done = reply.feed(raw[i : i + step])
    if not done:
        done = reply.feed(b"")  # the server closes: the end of a close-delimited body
    assert done and reply.status == 200 and reply.body == b'{"a": "bc"}'
    assert reply.keep_alive is raw.startswith(b"HTTP/1.1")
    cut = Reply()
    cut.feed(raw[: len(raw) - 3])
    if raw.startswith(b"HTTP/1.1"):
        with pytest.raises(ConnectionResetError, match="middle of the reply"):
            cut.feed(b"")
