"""``Idempotency.http_key`` names the record the HTTP middleware really wrote (issue 15)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from idem_core import Idempotency
from idem_core.integrations.asgi import IdempotencyMiddleware


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"made"})


@pytest.mark.parametrize("how", ["identify", "authorization", "anonymous"])
async def test_http_key_is_the_middlewares(how: str) -> None:
    idem = Idempotency.from_url(f"memory://http-{uuid.uuid4().hex[:8]}", namespace="api")
    options: dict[str, Any] = {}
    headers = {"Idempotency-Key": "order:1"}
    if how == "identify":
        options["identify"] = lambda scope: "user:7"
        expected = idem.http_key("order:1", identity="user:7")
    elif how == "authorization":
        headers["Authorization"] = "Bearer abc"
        expected = idem.http_key("order:1", credentials={"authorization": "Bearer abc"})
    else:
        options["anonymous"] = True
        expected = idem.http_key("order:1", anonymous=True)
    wrapped = IdempotencyMiddleware(app, idem=idem, **options)
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        resp = await client.post("/orders", json={"sku": "A"}, headers=headers)
    assert resp.status_code == 201
    assert expected.startswith("api:http:") and expected.endswith(":order\\:1")
    assert (await idem.ainspect(expected)).status == "completed"


def test_http_key_needs_an_identity() -> None:
    idem = Idempotency.from_url("memory://", namespace="api")
    with pytest.raises(Exception, match="identity="):
        idem.http_key("k")
