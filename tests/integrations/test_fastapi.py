"""FastAPI: a per-route dependency (only the routes that depend on it are guarded) and the
Idempotency-Key header in the OpenAPI schema of those routes."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel

from idem_core import Idempotency
from idem_core.integrations.fastapi import IdempotencyKey, IdempotentRoute


class Payment(BaseModel):
    amount: int
    to: str = "x"


@pytest.fixture
async def aidem(store_url: str) -> AsyncIterator[Idempotency]:
    idem = Idempotency.from_url(store_url, namespace=f"t{uuid.uuid4().hex[:12]}")
    yield idem
    await idem.aclose()


def make_api(idem: Idempotency, **options: Any) -> tuple[FastAPI, itertools.count[int]]:
    api = FastAPI()
    api.router.route_class = IdempotentRoute
    guard = IdempotencyKey(idem, **options)
    runs = itertools.count(1)

    @api.post("/payments", status_code=201, dependencies=[Depends(guard)])
    async def pay(body: Payment) -> dict[str, Any]:
        return {"paid": body.amount, "run": next(runs), "id": uuid.uuid4().hex}

    @api.put("/items/{item}", dependencies=[Depends(guard)])
    def put_item(item: str, body: Payment) -> dict[str, Any]:
        return {"item": item, "run": next(runs)}

    @api.post("/unguarded")
    async def free(body: Payment) -> dict[str, Any]:
        return {"run": next(runs)}

    return api, runs


def client(app: Any, **headers: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": "Bearer alice", **headers}
    return httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers)


async def test_only_the_routes_that_depend_on_the_guard_are_guarded(aidem: Idempotency) -> None:
    api, runs = make_api(aidem)
    async with client(api) as c:
        h = {"Idempotency-Key": "pay-1"}
        a = await c.post("/payments", json={"amount": 10, "to": "bob"}, headers=h)
        b = await c.post("/payments", json={"to": "bob", "amount": 10}, headers=h)
        other = await c.post("/payments", json={"amount": 11}, headers=h)
        missing = await c.post("/payments", json={"amount": 10})
        put1 = await c.put("/items/a", json={"amount": 1}, headers={"Idempotency-Key": "p"})
        put2 = await c.put("/items/a", json={"amount": 1}, headers={"Idempotency-Key": "p"})
        free1 = await c.post("/unguarded", json={"amount": 1})
        free2 = await c.post("/unguarded", json={"amount": 1}, headers=h)
    assert a.status_code == 201
    assert b.content == a.content and b.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert missing.status_code == 400
    assert missing.json()["code"] == "idempotency_key_missing"
    assert put2.content == put1.content  # any method of a guarded route
    assert free1.status_code == free2.status_code == 200
    assert free2.json()["run"] == free1.json()["run"] + 1  # never guarded
    assert next(runs) == 5  # pay, put, and the two free runs


async def test_the_header_is_in_the_openapi_schema_of_guarded_routes(
    aidem: Idempotency,
) -> None:
    api, _ = make_api(aidem, max_key_length=64)
    schema = api.openapi()

    def header_params(path: str, method: str) -> list[dict[str, Any]]:
        params = schema["paths"][path][method].get("parameters", [])
        return [p for p in params if p["in"] == "header"]

    (pay,) = header_params("/payments", "post")
    assert pay["name"] == "Idempotency-Key"
    assert pay["required"] is True
    assert pay["schema"]["maxLength"] == 64
    assert "retry" in pay["description"]
    assert [p["name"] for p in header_params("/items/{item}", "put")] == ["Idempotency-Key"]
    assert header_params("/unguarded", "post") == []
    optional, _ = make_api(aidem, required=False)
    (opt,) = [
        p
        for p in optional.openapi()["paths"]["/payments"]["post"]["parameters"]
        if p["in"] == "header"
    ]
    assert opt.get("required", False) is False


async def test_a_guard_without_its_route_class_fails_closed(aidem: Idempotency) -> None:
    api = FastAPI()  # route_class not set: the guard cannot see the response
    runs = itertools.count(1)

    @api.post("/payments", dependencies=[Depends(IdempotencyKey(aidem))])
    async def pay() -> dict[str, int]:
        return {"run": next(runs)}

    async with client(api) as c:
        resp = await c.post("/payments", headers={"Idempotency-Key": "x"})
    assert resp.status_code == 500
    assert "IdempotentRoute" in resp.json()["detail"]
    assert next(runs) == 1  # the endpoint never ran


async def test_a_router_of_guarded_routes(aidem: Idempotency) -> None:
    guard = IdempotencyKey(aidem)
    router = APIRouter(route_class=IdempotentRoute, dependencies=[Depends(guard)])
    runs = itertools.count(1)

    @router.post("/orders")
    async def order() -> dict[str, Any]:
        return {"run": next(runs), "id": uuid.uuid4().hex}

    api = FastAPI()
    api.include_router(router, prefix="/v1")
    async with client(api) as c:
        a = await c.post("/v1/orders", headers={"Idempotency-Key": "o1"})
        b = await c.post("/v1/orders", headers={"Idempotency-Key": "o1"})
    assert b.content == a.content and b.headers["idempotent-replayed"] == "true"
    assert next(runs) == 2
