"""The WSGI middleware: in process on Flask's test client, and under 50 concurrent requests
against a real WSGI server (waitress) on loopback, on memory://, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask, Response, request
from http_support import drop_pg_table, postgres_url, waitress_server

from idem_core import Idempotency, StoreUnavailable
from idem_core.integrations.wsgi import IdempotencyMiddleware


class Counter:
    def __init__(self) -> None:
        self.by_path: dict[str, int] = {}
        self.lock = threading.Lock()

    def hit(self, path: str) -> int:
        with self.lock:
            self.by_path[path] = self.by_path.get(path, 0) + 1
            return sum(self.by_path.values())

    @property
    def n(self) -> int:
        return sum(self.by_path.values())


def make_app(counter: Counter, slow: float = 0.0) -> Flask:
    app = Flask(__name__)
    fail_once: set[str] = set()

    @app.post("/pay")
    def pay() -> Response:
        body = request.get_data()
        n = counter.hit(request.path)
        time.sleep(slow)  # keep the key held while the others arrive
        out = json.dumps({"run": n, "body": body.decode(), "id": uuid.uuid4().hex})
        return Response(out, status=201, mimetype="application/json")

    @app.post("/account")
    def account() -> Response:
        counter.hit(request.path)
        user = request.cookies.get("session", "nobody")
        resp = Response(json.dumps({"user": user, "id": uuid.uuid4().hex}), status=201)
        resp.headers["Content-Type"] = "application/json"
        resp.set_cookie("session", f"{user}-rotated", httponly=True)
        resp.headers["WWW-Authenticate"] = f'Bearer realm="{user}"'
        resp.headers["X-Request-Id"] = uuid.uuid4().hex
        return resp

    @app.post("/stream")
    def stream() -> Response:
        counter.hit(request.path)
        token = uuid.uuid4().hex

        def chunks() -> Iterator[bytes]:
            for i in range(5):
                yield f"chunk {i} {token}\n".encode()

        return Response(chunks(), mimetype="text/plain")

    @app.post("/flaky")
    def flaky() -> Response:
        counter.hit(request.path)
        key = request.headers["idempotency-key"]
        if key not in fail_once:
            fail_once.add(key)
            return Response("down", status=503)
        return Response(f"ok {uuid.uuid4().hex}")

    @app.post("/boom")
    def boom() -> Response:
        counter.hit(request.path)
        key = request.headers["idempotency-key"]
        if key not in fail_once:
            fail_once.add(key)
            raise RuntimeError("boom")
        return Response("recovered")

    return app


@pytest.fixture(scope="module")
def pg_table() -> Iterator[None]:
    yield
    drop_pg_table()


@pytest.fixture(params=["memory", "redis", "postgresql"])
def sidem(request: pytest.FixtureRequest, pg_table: None) -> Iterator[Idempotency]:
    if request.param == "memory":
        url = f"memory://wsgi-{uuid.uuid4().hex[:8]}"
    elif request.param == "redis":
        url = str(request.getfixturevalue("redis_url"))
    else:
        url = postgres_url()
    idem = Idempotency.from_url(url, namespace=f"t{uuid.uuid4().hex[:12]}")
    yield idem
    idem.close()


AUTH = {"Authorization": "Bearer tester"}


def is_problem(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.get_data()
    assert resp.headers["content-type"] == "application/problem+json"
    doc = json.loads(resp.get_data())
    assert doc["status"] == status
    assert doc["code"] == f"idempotency_key_{code}"


def wrapped(idem: Idempotency, counter: Counter, **options: Any) -> Flask:
    app = make_app(counter)
    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, idem=idem, **options)  # type: ignore[method-assign]
    return app


# -- in process (Flask's test client) on every store ----------------------------------------


def test_replays_first_response_byte_for_byte(sidem: Idempotency) -> None:
    counter = Counter()
    c = wrapped(sidem, counter).test_client(use_cookies=False)
    h = {"Idempotency-Key": "order-1", **AUTH}
    first = c.post("/pay", json={"sku": "A", "qty": 2}, headers=h)
    again = c.post("/pay", json={"qty": 2, "sku": "A"}, headers=h)  # same JSON, other order
    other = c.post("/pay", json={"sku": "B", "qty": 2}, headers=h)
    stream = c.post("/stream", data=b"x", headers={"Idempotency-Key": "s-1", **AUTH})
    stream2 = c.post("/stream", data=b"x", headers={"Idempotency-Key": "s-1", **AUTH})
    assert first.status_code == again.status_code == 201
    assert first.status == again.status == "201 CREATED"  # the app's own reason phrase
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    replayed = [(k, v) for k, v in again.headers.items() if k != "idempotent-replayed"]
    assert replayed == list(first.headers.items())
    is_problem(other, 422, "mismatch")
    assert stream.get_data().count(b"\n") == 5
    assert stream2.get_data() == stream.get_data()
    assert counter.by_path == {"/pay": 1, "/stream": 1}


def test_credentials_are_never_replayed(sidem: Idempotency) -> None:
    counter = Counter()
    c = wrapped(sidem, counter, deny_headers=["x-request-id"]).test_client(use_cookies=False)
    h = {"Idempotency-Key": "acc-1", **AUTH}
    first = c.post("/account", headers=h)
    again = c.post("/account", headers=h)
    assert first.headers["Set-Cookie"].startswith("session=nobody-rotated")
    assert "X-Request-Id" in first.headers and "WWW-Authenticate" in first.headers
    for name in ("Set-Cookie", "WWW-Authenticate", "X-Request-Id"):
        assert name not in again.headers
    assert again.get_data() == first.get_data()
    assert counter.n == 1


def test_statuses_exceptions_and_errors() -> None:
    idem = Idempotency.from_url("memory://", namespace=f"t{uuid.uuid4().hex[:12]}")
    counter = Counter()
    c = wrapped(idem, counter, max_body_bytes=100, max_key_length=16).test_client(use_cookies=False)
    h = {"Idempotency-Key": "flaky-1", **AUTH}
    assert c.post("/flaky", headers=h).status_code == 503  # 5xx: released
    ok = c.post("/flaky", headers=h)
    assert c.post("/flaky", headers=h).get_data() == ok.get_data()
    h = {"Idempotency-Key": "boom-1", **AUTH}
    assert c.post("/boom", headers=h).status_code == 500  # Flask's answer to a raise: released
    assert c.post("/boom", headers=h).get_data() == b"recovered"
    assert counter.by_path == {"/flaky": 2, "/boom": 2}
    is_problem(c.post("/pay", data=b"x", headers=AUTH), 400, "missing")
    is_problem(
        c.post("/pay", data=b"x", headers={"Idempotency-Key": "k" * 17, **AUTH}), 400, "malformed"
    )
    is_problem(
        c.post("/pay", data=b"x", headers={"Idempotency-Key": "a b", **AUTH}), 400, "malformed"
    )
    is_problem(
        c.post("/pay", data=b"x" * 101, headers={"Idempotency-Key": "big", **AUTH}),
        413,
        "too_large",
    )
    is_problem(c.post("/pay", data=b"x", headers={"Idempotency-Key": "anon"}), 400, "no_identity")
    assert c.get("/pay").status_code == 405  # not guarded: passes through
    idem.close()


class DownStore:
    """A sync store whose every operation fails as an unreachable server does."""

    max_key_length = 255
    server_clock = True

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("connection refused")

        return fail


def test_store_down_is_503_with_retry_after() -> None:
    counter = Counter()
    idem = Idempotency(DownStore(), retries=0)  # type: ignore[arg-type]
    resp = (
        wrapped(idem, counter)
        .test_client(use_cookies=False)
        .post("/pay", data=b"x", headers={"Idempotency-Key": "x", **AUTH})
    )
    is_problem(resp, 503, "unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert counter.n == 0


def test_identify_over_the_environ_may_return_any_value() -> None:
    idem = Idempotency.from_url("memory://", namespace=f"t{uuid.uuid4().hex[:12]}")
    counter = Counter()
    app = wrapped(idem, counter, identify=lambda environ: int(environ["HTTP_X_USER"]))
    c = app.test_client(use_cookies=False)
    h = {"Idempotency-Key": "u-1"}
    a = c.post("/pay", data=b"x", headers={**h, "X-User": "7"})
    b = c.post("/pay", data=b"x", headers={**h, "X-User": "8"})
    a2 = c.post("/pay", data=b"x", headers={**h, "X-User": "7"})
    assert a.get_data() != b.get_data()
    assert a2.get_data() == a.get_data()
    assert counter.n == 2


# -- a real WSGI server on loopback ---------------------------------------------------------


@pytest.fixture
def waitress_app(sidem: Idempotency) -> Iterator[tuple[str, Counter]]:
    counter = Counter()
    app = make_app(counter, slow=0.2)
    with waitress_server(IdempotencyMiddleware(app.wsgi_app, idem=sidem)) as base:
        yield base, counter


async def test_50_concurrent_requests_run_the_handler_once(
    waitress_app: tuple[str, Counter],
) -> None:
    base, counter = waitress_app
    limits = httpx.Limits(max_connections=60)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60, headers=AUTH) as client:
        h = {"Idempotency-Key": f"race-{uuid.uuid4().hex}"}
        responses = await asyncio.gather(
            *(client.post("/pay", content=b"same", headers=h) for _ in range(50))
        )
        after = await client.post("/pay", content=b"same", headers=h)
    assert counter.n == 1
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {201, 409}, statuses
    fresh = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(fresh) == 1
    for r in responses:
        if r.status_code == 201:
            assert r.content == fresh[0].content
        else:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "idempotency_key_in_progress"
    assert after.status_code == 201
    assert after.content == fresh[0].content
    assert after.headers["idempotent-replayed"] == "true"


async def test_cookie_sessions_never_share_a_key(waitress_app: tuple[str, Counter]) -> None:
    base, counter = waitress_app
    key = {"Idempotency-Key": "checkout-1"}

    async def post(cookie: str) -> httpx.Response:
        # a client of its own per request: no cookie jar carries one caller's cookie over
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await client.post("/account", content=b"{}", headers={**key, "cookie": cookie})

    alice = await post("session=alice")
    bob = await post("session=bob")
    alice2 = await post("session=alice")
    unnamed = await post("sid=1")
    assert alice.json()["user"] == "alice" and bob.json()["user"] == "bob"
    assert bob.headers["set-cookie"].startswith("session=bob-rotated")
    assert "idempotent-replayed" not in bob.headers
    assert alice2.content == alice.content
    assert "set-cookie" not in alice2.headers and "www-authenticate" not in alice2.headers
    assert unnamed.status_code == 400
    assert unnamed.json()["code"] == "idempotency_key_no_identity"
    assert counter.by_path["/account"] == 2


def test_an_app_that_raises_releases_the_key() -> None:
    idem = Idempotency.from_url("memory://", namespace=f"t{uuid.uuid4().hex[:12]}")
    calls: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"second try"]

    from werkzeug.test import Client

    c = Client(IdempotencyMiddleware(app, idem=idem))
    h = {"Idempotency-Key": "raise-1", **AUTH}
    with pytest.raises(RuntimeError):
        c.post("/x", data=b"x", headers=h)
    assert c.post("/x", data=b"x", headers=h).get_data() == b"second try"
    replay = c.post("/x", data=b"x", headers=h)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.status == "200 OK"
    assert len(calls) == 2
    idem.close()
