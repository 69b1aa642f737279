"""Issue 12 on ASGI, in process on every store: credentials never stored, JSON fingerprinted
by meaning, any identity value, fail-closed identity, a response the store refuses."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from idem_core import ConfigurationError, Idempotency
from idem_core.integrations.asgi import IdempotencyMiddleware
from idem_core.integrations.http import HttpRequest, hash_identity


class Runs:
    def __init__(self) -> None:
        self.n = 0


def make_app(runs: Runs, size: int = 0) -> Starlette:
    async def echo(request: Request) -> Response:
        runs.n += 1
        body = await request.body()
        headers = [
            ("x-run", str(runs.n)),
            ("set-cookie", "session=new; HttpOnly"),
            ("Set-Cookie", "other=1"),
            ("www-authenticate", 'Bearer realm="api"'),
            ("authorization", "Bearer leaked"),
            ("proxy-authenticate", "Basic"),
            ("x-internal-token", "s3cr3t"),
            ("x-order", uuid.uuid4().hex),
            ("cache-control", "no-store"),
        ]
        payload = body + uuid.uuid4().hex.encode() + os.urandom(size)  # incompressible
        response = Response(payload, status_code=201, media_type="application/octet-stream")
        for name, value in headers:
            response.raw_headers.append((name.lower().encode(), value.encode()))
        return response

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


class Client(httpx.AsyncClient):
    """Sends only the cookies each request names: a jar would turn a Set-Cookie of the app
    into a credential of the next request, another identity."""

    async def post(self, *args: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        self.cookies.clear()
        return await super().post(*args, **kwargs)


def client(app: Any, raise_errors: bool = False, **headers: str) -> Client:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_errors)
    return Client(transport=transport, base_url="http://t", headers=headers)


def is_problem(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == f"idempotency_key_{code}"


@pytest.fixture
async def aidem(store_url: str) -> AsyncIterator[Idempotency]:
    idem = Idempotency.from_url(store_url, namespace=f"t{uuid.uuid4().hex[:12]}")
    yield idem
    await idem.aclose()


@pytest.fixture
async def midem() -> AsyncIterator[Idempotency]:
    idem = Idempotency.from_url("memory://", namespace=f"t{uuid.uuid4().hex[:12]}")
    yield idem
    await idem.aclose()


AUTH = {"authorization": "Bearer alice"}


async def test_credentials_are_never_stored_nor_replayed(aidem: Idempotency) -> None:
    runs = Runs()
    app = IdempotencyMiddleware(make_app(runs), idem=aidem, deny_headers=["X-Internal-Token"])
    async with client(app, **AUTH) as c:
        h = {"Idempotency-Key": "cred-1"}
        first = await c.post("/echo", content=b"pay", headers=h)
        again = await c.post("/echo", content=b"pay", headers=h)
    assert runs.n == 1
    # the first caller gets everything its app sent
    assert first.headers.get_list("set-cookie") == ["session=new; HttpOnly", "other=1"]
    assert first.headers["x-internal-token"] == "s3cr3t"
    never = {
        b"set-cookie",
        b"www-authenticate",
        b"authorization",
        b"proxy-authenticate",
        b"x-internal-token",
    }
    expected = [(k, v) for k, v in first.headers.raw if k.lower() not in never]
    replayed = [(k, v) for k, v in again.headers.raw if k.lower() != b"idempotent-replayed"]
    assert replayed == expected  # the rest, in order, byte for byte
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.status_code == 201


async def test_json_bodies_are_fingerprinted_by_meaning(aidem: Idempotency) -> None:
    runs = Runs()
    app = IdempotencyMiddleware(make_app(runs), idem=aidem)
    json_ct = {"content-type": "application/json"}
    async with client(app, **AUTH) as c:
        h = {"Idempotency-Key": "json-1", **json_ct}
        a = await c.post("/echo", content=b'{"amount": 10, "to": {"x": 1, "y": [1, 2]}}', headers=h)
        b = await c.post("/echo", content=b'{"to":{"y":[1,2],"x":1},  "amount":10}', headers=h)
        other = await c.post(
            "/echo", content=b'{"amount": 11, "to": {"x": 1, "y": [1, 2]}}', headers=h
        )
        order = await c.post(
            "/echo", content=b'{"amount": 10, "to": {"x": 1, "y": [2, 1]}}', headers=h
        )
        h = {"Idempotency-Key": "bytes-1", "content-type": "text/plain"}
        t1 = await c.post("/echo", content=b'{"a": 1, "b": 2}', headers=h)
        t2 = await c.post("/echo", content=b'{"b": 2, "a": 1}', headers=h)
        h = {"Idempotency-Key": "vendor-json", "content-type": "application/vnd.api+json"}
        v1 = await c.post("/echo", content=b'{"a": 1, "b": 2}', headers=h)
        v2 = await c.post("/echo", content=b'{"b":2,"a":1}', headers=h)
        h = {"Idempotency-Key": "broken-json", **json_ct}
        j1 = await c.post("/echo", content=b'{"a": 1', headers=h)
        j2 = await c.post("/echo", content=b'{"a":  1', headers=h)
    assert b.content == a.content and b.headers["idempotent-replayed"] == "true"
    is_problem(other, 422, "mismatch")
    is_problem(order, 422, "mismatch")  # arrays keep their order
    is_problem(t2, 422, "mismatch")  # not JSON: byte for byte
    assert t1.status_code == 201
    assert v2.content == v1.content
    assert j1.status_code == 201
    is_problem(j2, 422, "mismatch")  # not parseable: byte for byte
    assert runs.n == 4


async def test_custom_fingerprint_hook(midem: Idempotency) -> None:
    runs = Runs()
    seen: list[HttpRequest] = []

    def meaning(request: HttpRequest) -> Any:
        seen.append(request)
        return [request.path, request.body.split(b";")[0]]  # what follows ';' is noise

    app = IdempotencyMiddleware(make_app(runs), idem=midem, fingerprint=meaning)
    async with client(app, **AUTH) as c:
        h = {"Idempotency-Key": "fp-1"}
        a = await c.post("/echo", content=b"order-7;sent-at=1", headers=h)
        b = await c.post("/echo", content=b"order-7;sent-at=2", headers=h)
        other = await c.post("/echo", content=b"order-8;sent-at=2", headers=h)
    assert b.content == a.content
    is_problem(other, 422, "mismatch")
    assert runs.n == 1
    assert seen[0].method == "POST" and seen[0].header(b"idempotency-key") == b"fp-1"


@pytest.mark.parametrize("value", [42, uuid.UUID(int=7), ("tenant", 3), "user-42"])
async def test_identify_may_return_any_value(midem: Idempotency, value: Any) -> None:
    """On main an int user id (the docstring's own example) failed every request."""
    runs = Runs()
    events: list[str] = []
    midem.on_event(lambda e: events.append(e.key))
    app = IdempotencyMiddleware(make_app(runs), idem=midem, identify=lambda scope: value)
    async with client(app) as c:
        h = {"Idempotency-Key": "any-1"}
        a = await c.post("/echo", content=b"x", headers=h)
        b = await c.post("/echo", content=b"x", headers=h)
    assert a.status_code == 201
    assert b.content == a.content
    assert runs.n == 1
    # the stored key's identity part is the value's hash, never the value itself
    assert events and all(k.split(":")[2] == hash_identity(["identify", value]) for k in events)
    other = IdempotencyMiddleware(make_app(runs), idem=midem, identify=lambda scope: 43)
    async with client(other) as c:
        c1 = await c.post("/echo", content=b"x", headers={"Idempotency-Key": "any-1"})
    assert "idempotent-replayed" not in c1.headers  # another identity, another scope


async def test_no_credentials_is_400_unless_anonymous_is_chosen(
    midem: Idempotency, caplog: pytest.LogCaptureFixture
) -> None:
    runs = Runs()
    app = IdempotencyMiddleware(make_app(runs), idem=midem)
    async with client(app) as c:
        resp = await c.post("/echo", content=b"x", headers={"Idempotency-Key": "a-1"})
        empty = await c.post(
            "/echo", content=b"x", headers={"Idempotency-Key": "a-1", "authorization": ""}
        )
    is_problem(resp, 400, "no_identity")
    is_problem(empty, 400, "no_identity")
    assert runs.n == 0
    with caplog.at_level(logging.WARNING, logger="idem_core.http"):
        app = IdempotencyMiddleware(make_app(runs), idem=midem, anonymous=True)
    assert "anonymous=True" in caplog.text
    async with client(app) as c:
        a = await c.post("/echo", content=b"x", headers={"Idempotency-Key": "a-1"})
        b = await c.post("/echo", content=b"x", headers={"Idempotency-Key": "a-1"})
    async with client(app, **AUTH) as c:
        authed = await c.post("/echo", content=b"x", headers={"Idempotency-Key": "a-1"})
    assert b.content == a.content and runs.n == 2
    assert authed.content != a.content  # a caller with credentials never joins the anonymous scope
    with pytest.raises(ConfigurationError, match="share keys"):
        IdempotencyMiddleware(make_app(runs), idem=midem, credential_headers=(), cookies=())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="idem_core.http"):
        IdempotencyMiddleware(
            make_app(runs), idem=midem, credential_headers=(), cookies=(), anonymous=True
        )
    assert "ALL callers" in caplog.text


async def test_cookie_names_and_credential_headers_are_configurable(midem: Idempotency) -> None:
    runs = Runs()
    app = IdempotencyMiddleware(
        make_app(runs), idem=midem, cookies=["sid"], credential_headers=["x-api-key"]
    )
    async with client(app) as c:
        h = {"Idempotency-Key": "c-1"}
        a = await c.post("/echo", content=b"x", headers={**h, "cookie": "theme=dark; sid=u1"})
        b = await c.post("/echo", content=b"x", headers={**h, "cookie": "sid=u2; theme=dark"})
        a2 = await c.post("/echo", content=b"x", headers={**h, "cookie": "sid=u1"})
        k = await c.post("/echo", content=b"x", headers={**h, "x-api-key": "k1"})
        bearer = await c.post("/echo", content=b"x", headers={**h, "authorization": "Bearer z"})
    assert a.content != b.content
    assert a2.content == a.content  # other cookies do not matter
    assert k.status_code == 201 and "idempotent-replayed" not in k.headers
    is_problem(bearer, 400, "no_identity")  # Authorization is no longer listed
    assert runs.n == 3


@pytest.mark.parametrize("store_url", ["dynamodb"], indirect=True)
async def test_a_response_the_store_refuses_is_sent_and_never_run_again(
    aidem: Idempotency,
) -> None:
    """Over DynamoDB's 400 KB item limit: on main the client got its 201 and then
    ResultNotSerializable escaped the middleware into the server's log."""
    runs = Runs()
    app = IdempotencyMiddleware(make_app(runs, size=500_000), idem=aidem)
    async with client(app, raise_errors=True, **AUTH) as c:
        h = {"Idempotency-Key": "big-1"}
        first = await c.post("/echo", content=b"x", headers=h)
        again = await c.post("/echo", content=b"x", headers=h)
    assert first.status_code == 201
    assert len(first.content) > 500_000
    assert first.headers["set-cookie"]  # the response as the app sent it
    # Recorded as not stored: the retry learns why, and the app never runs twice.
    assert again.status_code == 500
    assert again.headers["content-type"] == "application/problem+json"
    assert "response_not_stored" in again.text
    assert runs.n == 1
