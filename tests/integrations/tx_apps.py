"""Apps whose endpoint writes on the connection the idempotency layer hands it (FastAPI with
``Depends(guard.connection)``, Flask with ``environ["idem_core.connection"]``), so the write
and the stored response commit together. Also served by uvicorn in a subprocess
(``python -m uvicorn tx_apps:asgi_app``) for the kill test: configured from the environment.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from flask import Flask
from flask import request as flask_request
from sqlalchemy import text

from idem_core import Idempotency
from idem_core.integrations.fastapi import IdempotencyKey, IdempotentRoute
from idem_core.integrations.wsgi import IdempotencyMiddleware


def make_asgi(idem: Idempotency, engine: Any, orders: str, pause_file: str = "") -> FastAPI:
    app = FastAPI()
    app.router.route_class = IdempotentRoute
    guard = IdempotencyKey(idem, engine=engine)

    @app.post("/orders", status_code=201)
    async def create(request: Request, conn: Any = Depends(guard.connection)) -> dict[str, Any]:
        order = uuid.uuid4().hex
        await conn.execute(
            text(f"INSERT INTO {orders} (id, key) VALUES (:id, :key)"),
            {"id": order, "key": request.headers["idempotency-key"]},
        )
        if request.headers.get("x-fail"):
            raise RuntimeError("after the write")
        if request.headers.get("x-pause") and pause_file:
            Path(pause_file).write_text(order)  # noqa: ASYNC240 (a test hook, a few bytes)
            await asyncio.sleep(60)  # the test kills the server here
        return {"order": order}

    return app


def make_wsgi(idem: Idempotency, engine: Any, orders: str) -> Any:
    app = Flask(__name__)

    @app.post("/orders")
    def create() -> Any:
        conn = flask_request.environ["idem_core.connection"]
        order = uuid.uuid4().hex
        conn.execute(
            text(f"INSERT INTO {orders} (id, key) VALUES (:id, :key)"),
            {"id": order, "key": flask_request.headers["Idempotency-Key"]},
        )
        if flask_request.headers.get("X-Fail"):
            raise RuntimeError("after the write")
        return {"order": order}, 201

    app.config["PROPAGATE_EXCEPTIONS"] = True
    return IdempotencyMiddleware(app.wsgi_app, idem=idem, engine=engine)


def __getattr__(name: str) -> Any:
    # ``uvicorn tx_apps:asgi_app`` in a subprocess: built from the environment on first use.
    if name == "asgi_app":
        from sqlalchemy.ext.asyncio import create_async_engine

        url = os.environ["IDEM_TEST_RECORDS_URL"]
        idem = Idempotency.from_url(url, namespace="tx")
        engine = create_async_engine(url.split("?", 1)[0])
        return make_asgi(
            idem, engine, os.environ["IDEM_TEST_ORDERS"], os.environ["IDEM_TEST_PAUSE_FILE"]
        )
    raise AttributeError(name)
