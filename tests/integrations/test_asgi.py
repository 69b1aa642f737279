"""The Idempotency-Key middleware, in process with httpx on every store, and under 50
concurrent requests against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from integration_ports import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from idem_core import Idempotency, StoreUnavailable
from idem_core.integrations.asgi import IdempotencyMiddleware, parse_key


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.by_path: dict[str, int] = {}
        self.lock = threading.Lock()

    def hit(self, path: str) -> int:
        with self.lock:
            self.n += 1
            self.by_path[path] = self.by_path.get(path, 0) + 1
            return self.n


def make_app(counter: Counter, gate: asyncio.Event | None = None) -> Starlette:
    fail_once: set[str] = set()

    async def orders(request: Request) -> Response:
        body = await request.json()
        n = counter.hit(request.url.path)
        if gate is not None:
            await gate.wait()
        return JSONResponse(
            {"order": body, "run": n, "id": uuid.uuid4().hex},
            status_code=201,
            headers={"x-order-id": uuid.uuid4().hex, "set-cookie": "a=1"},
        )

    async def stream(request: Request) -> Response:
        counter.hit(request.url.path)
        token = uuid.uuid4().hex

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"chunk {i} {token}\n".encode()
                await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def flaky(request: Request) -> Response:
        counter.hit(request.url.path)
        key = request.headers["idempotency-key"]
        if key not in fail_once:
            fail_once.add(key)
            return PlainTextResponse("down", status_code=503)
        return PlainTextResponse(f"ok {uuid.uuid4().hex}", status_code=200)

    async def boom(request: Request) -> Response:
        counter.hit(request.url.path)
        key = request.headers["idempotency-key"]
        if key not in fail_once:
            fail_once.add(key)
            raise RuntimeError("boom")
        return PlainTextResponse("recovered")

    async def invalid(request: Request) -> Response:
        counter.hit(request.url.path)
        return JSONResponse({"error": "bad card", "id": uuid.uuid4().hex}, status_code=402)

    async def limited(request: Request) -> Response:
        counter.hit(request.url.path)
        return PlainTextResponse("slow down", status_code=429)

    async def read(request: Request) -> Response:
        counter.hit(request.url.path)
        return PlainTextResponse("read")

    return Starlette(
        routes=[
            Route("/orders", orders, methods=["POST", "PATCH", "PUT"]),
            Route("/orders/{id}", orders, methods=["POST", "PATCH"]),
            Route("/stream", stream, methods=["POST"]),
            Route("/flaky", flaky, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/invalid", invalid, methods=["POST"]),
            Route("/limited", limited, methods=["POST"]),
            Route("/read", read, methods=["GET", "POST"]),
        ]
    )


@pytest.fixture
async def aidem(store_url: str) -> AsyncIterator[Idempotency]:
    idem = Idempotency.from_url(store_url, namespace=f"t{uuid.uuid4().hex[:12]}")
    yield idem
    await idem.aclose()


async def until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def client_for(app: Any, raise_errors: bool = False, **headers: str) -> httpx.AsyncClient:
    """A client of one caller: keys are scoped by credentials, so it sends some."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_errors)
    headers = {"authorization": "Bearer tester", **headers}
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers)


def wrapped(idem: Idempotency, counter: Counter, **options: Any) -> Any:
    return IdempotencyMiddleware(make_app(counter), idem=idem, **options)


def is_problem(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    doc = resp.json()
    assert doc["status"] == status
    assert doc["code"] == f"idempotency_key_{code}"
    assert doc["title"] and doc["detail"]


# -- on every store ------------------------------------------------------------------------


async def test_replays_first_response_byte_for_byte(aidem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(aidem, counter)) as client:
        headers = {"Idempotency-Key": "order-1"}
        first = await client.post("/orders", json={"sku": "A", "qty": 2}, headers=headers)
        again = await client.post("/orders", json={"sku": "A", "qty": 2}, headers=headers)
    assert first.status_code == 201
    assert counter.n == 1
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    replayed = [(k, v) for k, v in again.headers.raw if k.lower() != b"idempotent-replayed"]
    # everything but the credential the first response set, in order, byte for byte
    assert replayed == [(k, v) for k, v in first.headers.raw if k.lower() != b"set-cookie"]
    assert first.headers["set-cookie"] == "a=1"


async def test_reused_key_for_another_request_is_422(aidem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(aidem, counter)) as client:
        headers = {"Idempotency-Key": "k-422"}
        ok = await client.post("/orders", json={"sku": "A"}, headers=headers)
        assert ok.status_code == 201
        body = await client.post("/orders", json={"sku": "B"}, headers=headers)
        path = await client.post("/orders/7", json={"sku": "A"}, headers=headers)
        method = await client.patch("/orders", json={"sku": "A"}, headers=headers)
        query = await client.post("/orders?x=1", json={"sku": "A"}, headers=headers)
    for resp in (body, path, method, query):
        is_problem(resp, 422, "mismatch")
    assert counter.n == 1


async def test_streamed_body_is_stored_and_replayed(aidem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(aidem, counter)) as client:
        headers = {"Idempotency-Key": "stream-1"}
        first = await client.post("/stream", content=b"x", headers=headers)
        again = await client.post("/stream", content=b"x", headers=headers)
    assert first.content.count(b"\n") == 5
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert counter.n == 1


async def test_5xx_releases_the_key_so_a_retry_runs(aidem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(aidem, counter)) as client:
        headers = {"Idempotency-Key": "flaky-1"}
        first = await client.post("/flaky", headers=headers)
        second = await client.post("/flaky", headers=headers)
        third = await client.post("/flaky", headers=headers)
    assert first.status_code == 503
    assert second.status_code == 200
    assert "idempotent-replayed" not in second.headers
    assert third.content == second.content
    assert third.headers["idempotent-replayed"] == "true"
    assert counter.n == 2


async def test_in_progress_is_409_then_replay(aidem: Idempotency) -> None:
    counter = Counter()
    gate = asyncio.Event()
    app = IdempotencyMiddleware(make_app(counter, gate), idem=aidem)
    async with client_for(app) as client:
        headers = {"Idempotency-Key": "slow-1"}
        first = asyncio.create_task(client.post("/orders", json={"a": 1}, headers=headers))
        await until(lambda: counter.n > 0)
        busy = await client.post("/orders", json={"a": 1}, headers=headers)
        is_problem(busy, 409, "in_progress")
        assert busy.headers["retry-after"] == "1"
        gate.set()
        done = await first
        again = await client.post("/orders", json={"a": 1}, headers=headers)
    assert again.content == done.content
    assert counter.n == 1


# -- behaviour that does not depend on the store (memory://) --------------------------------


@pytest.fixture
async def midem() -> AsyncIterator[Idempotency]:
    idem = Idempotency.from_url("memory://", namespace=f"t{uuid.uuid4().hex[:12]}")
    yield idem
    await idem.aclose()


async def test_wait_mode_replays_instead_of_409(midem: Idempotency) -> None:
    counter = Counter()
    gate = asyncio.Event()
    app = IdempotencyMiddleware(make_app(counter, gate), idem=midem, on_in_progress="wait")
    async with client_for(app) as client:
        headers = {"Idempotency-Key": "wait-1"}
        first = asyncio.create_task(client.post("/orders", json={"a": 1}, headers=headers))
        await until(lambda: counter.n > 0)
        second = asyncio.create_task(client.post("/orders", json={"a": 1}, headers=headers))
        await asyncio.sleep(0.1)
        assert not second.done()
        gate.set()
        a, b = await first, await second
    assert a.status_code == b.status_code == 201
    assert b.content == a.content
    assert b.headers["idempotent-replayed"] == "true"
    assert counter.n == 1


async def test_missing_key_is_400_only_where_required(midem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(midem, counter)) as client:
        missing = await client.post("/orders", json={})
        get = await client.get("/read")
        put = await client.put("/orders", json={"a": 1})
    is_problem(missing, 400, "missing")
    assert get.status_code == 200
    assert put.status_code == 201  # PUT is not in the default methods
    async with client_for(wrapped(midem, counter, required=False)) as client:
        optional = await client.post("/orders", json={"a": 1})
        again = await client.post("/orders", json={"a": 1})
    assert optional.status_code == again.status_code == 201
    assert optional.content != again.content  # no key: no protection, both ran


async def test_routes_and_methods_are_configurable(midem: Idempotency) -> None:
    counter = Counter()
    app = wrapped(midem, counter, routes=["/orders*"], methods=["POST", "PUT"])
    async with client_for(app) as client:
        unprotected = await client.post("/read")
        put_missing = await client.put("/orders", json={"a": 1})
        headers = {"Idempotency-Key": "put-1"}
        put = await client.put("/orders", json={"a": 1}, headers=headers)
        put_again = await client.put("/orders", json={"a": 1}, headers=headers)
        patch = await client.patch("/orders", json={"a": 1})
    assert unprotected.status_code == 200
    is_problem(put_missing, 400, "missing")
    assert put_again.content == put.content
    assert patch.status_code == 201
    app = wrapped(midem, counter, routes=lambda scope: scope["path"] == "/stream")
    async with client_for(app) as client:
        assert (await client.post("/orders", json={})).status_code == 201
        is_problem(await client.post("/stream"), 400, "missing")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty"),
        (b'""', "empty"),
        (b"x" * 256, "longer than 255"),
        (b'"abc', "unterminated"),
        (b'"a"b', "after the closing quote"),
        (b'"a\\x"', "bad escape"),
        (b"two words", "visible ASCII"),
        ("clé".encode(), "ASCII"),
    ],
)
def test_malformed_keys(raw: bytes, problem: str) -> None:
    key, why = parse_key(raw, 255)
    assert key is None
    assert problem in why


def test_key_forms() -> None:
    assert parse_key(b'"8e03978e-40d5-43e8-bc93-6894a57f9324"', 255)[0] == (
        "8e03978e-40d5-43e8-bc93-6894a57f9324"
    )
    assert parse_key(b"8e03978e-40d5", 255)[0] == "8e03978e-40d5"
    assert parse_key(b'"with space \\"q\\""', 255)[0] == 'with space "q"'
    assert parse_key(b"x" * 255, 255)[0] == "x" * 255


async def test_malformed_key_is_a_clear_400(midem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(midem, counter, max_key_length=16)) as client:
        long = await client.post("/orders", json={}, headers={"Idempotency-Key": "k" * 17})
        spaced = await client.post("/orders", json={}, headers={"Idempotency-Key": "a b"})
        two = await client.post(
            "/orders", json={}, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        )
        quoted = await client.post("/orders", json={}, headers={"Idempotency-Key": '"k"'})
        bare = await client.post("/orders", json={}, headers={"Idempotency-Key": "k"})
    for resp in (long, spaced, two):
        is_problem(resp, 400, "malformed")
    assert "longer than 16" in long.json()["detail"]
    assert bare.content == quoted.content  # the same key, quoted or not
    assert counter.n == 1


async def test_keys_are_scoped_by_identity(midem: Idempotency) -> None:
    counter = Counter()
    app = wrapped(midem, counter)
    key = {"Idempotency-Key": "shared-guess"}
    async with client_for(app, authorization="Bearer alice") as alice:
        a1 = await alice.post("/orders", json={"who": "x"}, headers=key)
        a2 = await alice.post("/orders", json={"who": "x"}, headers=key)
    async with client_for(app, authorization="Bearer mallory") as mallory:
        m1 = await mallory.post("/orders", json={"who": "x"}, headers=key)
    assert a2.content == a1.content
    assert m1.content != a1.content  # mallory's own execution, never alice's response
    assert "idempotent-replayed" not in m1.headers
    assert counter.n == 2

    def tenant(scope: Any) -> str:
        return dict(scope["headers"]).get(b"x-tenant", b"").decode()

    counter = Counter()
    app = wrapped(midem, counter, identify=tenant)
    async with client_for(app, authorization="") as client:
        t1 = await client.post("/orders", json={}, headers={**key, "x-tenant": "t1"})
        t2 = await client.post("/orders", json={}, headers={**key, "x-tenant": "t2"})
        t1b = await client.post("/orders", json={}, headers={**key, "x-tenant": "t1"})
    assert t1.content != t2.content
    assert t1b.content == t1.content
    assert counter.n == 2

    seen: list[str] = []
    midem.on_event(lambda e: seen.append(e.key))

    async def async_identity(scope: Any) -> str:
        return "user:42"  # not in the stored key: hashed

    app = wrapped(midem, Counter(), identify=async_identity)
    async with client_for(app) as client:
        await client.post("/orders", json={}, headers={"Idempotency-Key": "scoped"})
    assert seen
    assert all("user:42" not in k and k.endswith(":scoped") for k in seen)  # hashed scope
    assert seen[0].startswith(f"{midem.namespace}:http:")


async def test_stored_statuses_are_configurable(midem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(midem, counter)) as client:
        h = {"Idempotency-Key": "s-1"}
        declined = await client.post("/invalid", headers=h)
        replay = await client.post("/invalid", headers=h)
        h = {"Idempotency-Key": "s-2"}
        await client.post("/limited", headers=h)
        await client.post("/limited", headers=h)
    assert declined.status_code == 402
    assert replay.content == declined.content  # a 4xx answer is final
    assert counter.by_path == {"/invalid": 1, "/limited": 2}  # 429 is not stored

    counter = Counter()
    app = wrapped(midem, counter, store_status=range(200, 300))
    async with client_for(app) as client:
        h = {"Idempotency-Key": "s-3"}
        await client.post("/invalid", headers=h)
        await client.post("/invalid", headers=h)
        h = {"Idempotency-Key": "s-4"}
        first = await client.post("/flaky", headers=h)
        assert first.status_code == 503
    assert counter.by_path["/invalid"] == 2

    counter = Counter()
    app = wrapped(midem, counter, store_status=lambda status: True)
    async with client_for(app) as client:
        h = {"Idempotency-Key": "s-5"}
        a = await client.post("/flaky", headers=h)
        b = await client.post("/flaky", headers=h)
    assert a.status_code == b.status_code == 503  # a stored 5xx is replayed when asked
    assert counter.n == 1


async def test_app_exception_releases_the_key(midem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(midem, counter)) as client:
        h = {"Idempotency-Key": "boom-1"}
        failed = await client.post("/boom", headers=h)
        retried = await client.post("/boom", headers=h)
        replayed = await client.post("/boom", headers=h)
    assert failed.status_code == 500
    assert retried.text == "recovered"
    assert replayed.headers["idempotent-replayed"] == "true"
    assert counter.n == 2


async def test_retention_expires_stored_responses(midem: Idempotency) -> None:
    counter = Counter()
    async with client_for(wrapped(midem, counter, ttl=0.2)) as client:
        h = {"Idempotency-Key": "ttl-1"}
        a = await client.post("/orders", json={}, headers=h)
        await asyncio.sleep(0.3)
        b = await client.post("/orders", json={}, headers=h)
    assert a.content != b.content
    assert counter.n == 2


async def test_body_limit_is_413(midem: Idempotency) -> None:
    async with client_for(wrapped(midem, Counter(), max_body_bytes=10)) as client:
        resp = await client.post("/orders", content=b"x" * 11, headers={"Idempotency-Key": "b"})
    is_problem(resp, 413, "too_large")


class DownStore:
    """An async store whose every operation fails as an unreachable server does."""

    max_key_length = 255
    server_clock = True

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("connection refused")

        return fail


async def test_store_down_is_503_or_fails_open() -> None:
    counter = Counter()
    idem = Idempotency(astore=DownStore(), retries=0)  # type: ignore[arg-type]
    async with client_for(wrapped(idem, counter)) as client:
        resp = await client.post("/orders", json={}, headers={"Idempotency-Key": "x"})
    is_problem(resp, 503, "unavailable")
    assert counter.n == 0
    idem = Idempotency(astore=DownStore(), retries=0, on_store_error="fail_open")  # type: ignore[arg-type]
    async with client_for(wrapped(idem, counter)) as client:
        resp = await client.post("/orders", json={}, headers={"Idempotency-Key": "x"})
    assert resp.status_code == 201
    assert counter.n == 1


async def test_fastapi(midem: Idempotency) -> None:
    api = FastAPI()
    runs = itertools.count(1)

    @api.post("/payments", status_code=201)
    async def pay(body: dict[str, Any]) -> dict[str, Any]:
        return {"paid": body["amount"], "run": next(runs)}

    api.add_middleware(IdempotencyMiddleware, idem=midem)
    async with client_for(api) as client:
        h = {"Idempotency-Key": "pay-1"}
        a = await client.post("/payments", json={"amount": 10}, headers=h)
        b = await client.post("/payments", json={"amount": 10}, headers=h)
        c = await client.post("/payments", json={"amount": 11}, headers=h)
    assert a.status_code == 201
    assert a.json() == {"paid": 10, "run": 1}
    assert b.content == a.content
    is_problem(c, 422, "mismatch")
    # the delegating method wraps any ASGI app the same way
    assert isinstance(midem.asgi(api), IdempotencyMiddleware)


# -- 50 concurrent requests against a real server -------------------------------------------


@pytest.fixture
def uvicorn_server(store_url: str) -> Iterator[tuple[str, Counter]]:
    import uvicorn

    counter = Counter()

    async def slow(request: Request) -> Response:
        body = await request.body()
        n = counter.hit(request.url.path)
        await asyncio.sleep(0.2)  # keep the key held while the others arrive
        return JSONResponse({"run": n, "body": body.decode(), "id": uuid.uuid4().hex})

    idem = Idempotency.from_url(store_url, namespace=f"t{uuid.uuid4().hex[:12]}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await idem.aclose()  # the async store lives on the server's loop

    async def account(request: Request) -> Response:
        # A cookie-session app: the caller is whoever the session cookie names.
        counter.hit(request.url.path)
        user = request.cookies.get("session", "nobody")
        return JSONResponse(
            {"user": user, "id": uuid.uuid4().hex},
            status_code=201,
            headers={
                "set-cookie": f"session={user}-rotated; HttpOnly",
                "www-authenticate": f'Bearer realm="{user}"',
                "x-request-id": uuid.uuid4().hex,
            },
        )

    routes = [Route("/pay", slow, methods=["POST"]), Route("/account", account, methods=["POST"])]
    app = IdempotencyMiddleware(Starlette(routes=routes, lifespan=lifespan), idem=idem)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", counter
    server.should_exit = True
    thread.join(10)
    idem.close()


async def test_50_concurrent_requests_run_the_handler_once(
    uvicorn_server: tuple[str, Counter],
) -> None:
    base, counter = uvicorn_server
    limits = httpx.Limits(max_connections=60)
    auth = {"authorization": "Bearer racer"}
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30, headers=auth) as client:
        h = {"Idempotency-Key": f"race-{uuid.uuid4().hex}"}
        responses = await asyncio.gather(
            *(client.post("/pay", content=b"same", headers=h) for _ in range(50))
        )
        after = await client.post("/pay", content=b"same", headers=h)
    assert counter.n == 1
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 409}, statuses
    ok = [r for r in responses if r.status_code == 200]
    fresh = [r for r in ok if "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1
    for r in responses:
        if r.status_code == 200:
            assert r.content == fresh[0].content
        else:
            assert r.headers["content-type"] == "application/problem+json"
            assert json.loads(r.content)["code"] == "idempotency_key_in_progress"
    assert after.status_code == 200
    assert after.content == fresh[0].content
    assert after.headers["idempotent-replayed"] == "true"


async def test_cookie_sessions_never_share_a_key(uvicorn_server: tuple[str, Counter]) -> None:
    """Two users of a cookie-session app send the same key: each gets their own response,
    never the other's body or Set-Cookie (on main the second got the first's)."""
    base, counter = uvicorn_server
    key = {"Idempotency-Key": "checkout-1", "content-type": "application/json"}
    body = b'{"cart": 1}'

    async def post(**headers: str) -> httpx.Response:
        # a client of its own per request: no cookie jar carries one caller's cookie over
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await client.post("/account", content=body, headers={**key, **headers})

    alice = await post(cookie="session=alice")
    bob = await post(cookie="session=bob")
    alice_again = await post(cookie="session=alice")
    # A cookie the app does not name as a credential, and no credentials at all: refused.
    unnamed = await post(cookie="sid=x")
    nothing = await post()
    assert alice.status_code == bob.status_code == 201
    assert alice.json()["user"] == "alice"
    assert bob.json()["user"] == "bob"
    assert "idempotent-replayed" not in bob.headers
    assert bob.headers["set-cookie"] == "session=bob-rotated; HttpOnly"
    assert alice_again.content == alice.content
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert counter.by_path["/account"] == 2
    # the replay carries no credential the first response set
    assert "set-cookie" not in alice_again.headers
    assert "www-authenticate" not in alice_again.headers
    assert alice_again.headers["x-request-id"] == alice.headers["x-request-id"]
    is_problem(unnamed, 400, "no_identity")
    assert "cookies=" in unnamed.json()["detail"]
    is_problem(nothing, 400, "no_identity")
