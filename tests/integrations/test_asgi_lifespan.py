"""The ASGI middleware and the lifespan: the app's own startup and shutdown run untouched, and
the store opened for the server's event loop is closed once the app has shut down."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from tracked_backend import Tracked, install

from idem_core import Idempotency
from idem_core.integrations.asgi import IdempotencyMiddleware


@pytest.fixture
def tracked() -> Tracked:
    return install()


def app_with_lifespan(idem: Idempotency, log: list[str]) -> FastAPI:
    @idem.idempotent(key="k", scope="shutdown-report")
    async def report(k: str) -> str:
        log.append(f"report {k}")
        return k

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.append("startup")
        yield
        await report("final")  # the app's shutdown may still use the store
        log.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders")
    async def orders() -> dict[str, str]:
        log.append("order")
        return {"id": "o1"}

    app.add_middleware(IdempotencyMiddleware, idem=idem)
    return app


def test_shutdown_closes_the_servers_store_after_the_apps_shutdown(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace=f"t{uuid.uuid4().hex[:8]}")
    log: list[str] = []
    app = app_with_lifespan(idem, log)
    for run in range(2):  # a lifespan per test case: closed is not finished
        with TestClient(app) as client:
            response = client.post(
                "/orders", headers={"Idempotency-Key": "abc", "Authorization": "Bearer t"}
            )
            assert response.status_code == 200
            assert len(tracked.opened) == run + 1
            assert tracked.closed == tracked.opened[:run]
        # Closed after the app's shutdown used it, on the server's loop, exactly once.
        assert tracked.closed == tracked.opened[: run + 1]
        assert tracked.closed[-1].loop is tracked.opened[run].loop
    assert log == ["startup", "order", "report final", "shutdown", "startup", "shutdown"]


def test_close_on_shutdown_can_be_turned_off(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace=f"t{uuid.uuid4().hex[:8]}")
    app = FastAPI()

    @app.post("/orders")
    async def orders() -> dict[str, str]:
        return {"id": "o1"}

    app.add_middleware(IdempotencyMiddleware, idem=idem, close_on_shutdown=False)
    with TestClient(app) as client:
        assert (
            client.post(
                "/orders", headers={"Idempotency-Key": "k", "Authorization": "Bearer t"}
            ).status_code
            == 200
        )
    assert len(tracked.opened) == 1 and tracked.closed == []


async def test_lifespan_messages_pass_through_unchanged(tracked: Tracked) -> None:
    idem = Idempotency.from_url("tracked://", namespace=f"t{uuid.uuid4().hex[:8]}")
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "lifespan.startup":
                await idem.astore.get("x")  # opens this loop's store
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.failed", "message": "boom"})
                return

    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for kind in ("lifespan.startup", "lifespan.shutdown"):
        inbox.put_nowait({"type": kind})
    middleware = IdempotencyMiddleware(app, idem=idem)
    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
    assert seen == ["lifespan.startup", "lifespan.shutdown"]
    assert sent == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.failed", "message": "boom"},
    ]
    assert tracked.closed == tracked.opened  # a failed shutdown still ends the process


async def test_an_app_without_lifespan_support_still_raises_to_the_server() -> None:
    idem = Idempotency.from_url("memory://")

    async def http_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("lifespan is not supported")

    middleware = IdempotencyMiddleware(http_only, idem=idem)

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent")

    # The server sees the app's error and runs without lifespan, as without the middleware.
    with pytest.raises(RuntimeError, match="not supported"):
        await middleware({"type": "lifespan"}, receive, send)
