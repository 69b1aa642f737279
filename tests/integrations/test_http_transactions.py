"""Exactly-once HTTP effects on SQL (PostgreSQL): the endpoint writes on the connection the
middleware/dependency hands it, and that transaction also stores the response. Killing the
server between the endpoint's write and the stored response leaves neither visible, and the
retry runs the endpoint once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_support import PG_TABLE, drop_pg_table, postgres_url
from integration_ports import free_port
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from support import port_open
from tx_apps import make_asgi, make_wsgi

from idem_core import Idempotency
from idem_core.registry import open_store

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ORDERS = f"tx_orders_{uuid.uuid4().hex[:10]}"
AUTH = {"Authorization": "Bearer alice"}


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    url = postgres_url()
    store = open_store(url)
    store.setup()  # type: ignore[attr-defined]
    store.close()
    engine = create_engine(url.split("?", 1)[0])
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {ORDERS} (id text PRIMARY KEY, key text)"))
    try:
        yield url
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {ORDERS}"))
        engine.dispose()
        drop_pg_table()


def counts(url: str, key: str) -> tuple[int, int]:
    """(orders written with this key, records stored for it), as another client sees them."""
    engine = create_engine(url.split("?", 1)[0])
    try:
        with engine.connect() as conn:
            orders = conn.execute(
                text(f"SELECT count(*) FROM {ORDERS} WHERE key = :k"), {"k": key}
            ).scalar_one()
            records = conn.execute(
                text(f"SELECT count(*) FROM {PG_TABLE} WHERE key LIKE :k"), {"k": f"%:{key}"}
            ).scalar_one()
            return int(orders), int(records)
    finally:
        engine.dispose()


@pytest.fixture
async def asgi_app(pg: str) -> AsyncIterator[Any]:
    idem = Idempotency.from_url(pg, namespace=f"t{uuid.uuid4().hex[:12]}")
    engine = create_async_engine(pg.split("?", 1)[0])
    yield make_asgi(idem, engine, ORDERS)
    await engine.dispose()
    await idem.aclose()


async def test_asgi_write_and_response_commit_together(pg: str, asgi_app: Any) -> None:
    transport = httpx.ASGITransport(app=asgi_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as c:
        key = f"a-{uuid.uuid4().hex}"
        failed = await c.post("/orders", headers={"Idempotency-Key": key, "X-Fail": "1"})
        assert failed.status_code == 500
        assert counts(pg, key) == (0, 0)  # the write and the claim rolled back together
        first = await c.post("/orders", headers={"Idempotency-Key": key})
        again = await c.post("/orders", headers={"Idempotency-Key": key})
    assert first.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert counts(pg, key) == (1, 1)
    # a route that only asks for the connection is guarded, and documents the header
    params = asgi_app.openapi()["paths"]["/orders"]["post"]["parameters"]
    assert [p["name"] for p in params if p["in"] == "header"] == ["Idempotency-Key"]


def test_wsgi_write_and_response_commit_together(pg: str) -> None:
    from werkzeug.test import Client

    idem = Idempotency.from_url(pg, namespace=f"t{uuid.uuid4().hex[:12]}")
    engine = create_engine(pg.split("?", 1)[0])
    try:
        c = Client(make_wsgi(idem, engine, ORDERS))
        key = f"w-{uuid.uuid4().hex}"
        with pytest.raises(RuntimeError):
            c.post("/orders", headers={"Idempotency-Key": key, "X-Fail": "1", **AUTH})
        assert counts(pg, key) == (0, 0)
        first = c.post("/orders", headers={"Idempotency-Key": key, **AUTH})
        again = c.post("/orders", headers={"Idempotency-Key": key, **AUTH})
        assert first.status_code == 201
        assert again.get_data() == first.get_data()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert counts(pg, key) == (1, 1)
    finally:
        engine.dispose()
        idem.close()


class Uvicorn:
    def __init__(self, url: str, pause_file: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "IDEM_TEST_RECORDS_URL": url,
            "IDEM_TEST_ORDERS": ORDERS,
            "IDEM_TEST_PAUSE_FILE": str(pause_file),
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "tests"), str(ROOT)]),
        }
        argv = [sys.executable, "-m", "uvicorn", "tx_apps:asgi_app", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--log-level", "warning"],
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.port):
            assert self.proc.poll() is None, "uvicorn exited"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def test_uvicorn_killed_between_the_write_and_the_stored_response(pg: str, tmp_path: Path) -> None:
    pause = tmp_path / "paused"
    key = f"kill-{uuid.uuid4().hex}"
    h = {"Idempotency-Key": key, **AUTH}
    server = Uvicorn(pg, pause)

    def killer() -> None:
        deadline = time.monotonic() + 30
        while not pause.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        # the endpoint has written its order (uncommitted) and has not returned yet
        server.kill()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        with (
            httpx.Client(base_url=server.base, timeout=60) as c,
            pytest.raises(httpx.TransportError),
        ):
            c.post("/orders", headers={**h, "X-Pause": "1"})
    finally:
        thread.join()
        server.kill()
    assert pause.exists()
    deadline = time.monotonic() + 10
    while counts(pg, key) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)  # PostgreSQL ends the dead connection's transaction
    assert counts(pg, key) == (0, 0)  # never the write without the record
    server = Uvicorn(pg, pause)
    try:
        with httpx.Client(base_url=server.base, timeout=60) as c:
            retried = c.post("/orders", headers=h)
            replay = c.post("/orders", headers=h)
    finally:
        server.kill()
    assert retried.status_code == 201
    assert replay.content == retried.content
    assert replay.headers["idempotent-replayed"] == "true"
    assert counts(pg, key) == (1, 1)  # the endpoint's effect happened exactly once


async def test_a_database_that_cannot_be_reached_is_503(pg: str) -> None:
    from werkzeug.test import Client

    dead = "postgresql+psycopg://postgres@127.0.0.1:1/test"  # nothing listens on port 1
    idem = Idempotency.from_url(pg, namespace=f"t{uuid.uuid4().hex[:12]}")
    aengine = create_async_engine(dead)
    engine = create_engine(dead)
    try:
        transport = httpx.ASGITransport(app=make_asgi(idem, aengine, ORDERS))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            resp = await c.post("/orders", headers={"Idempotency-Key": "d", **AUTH})
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["code"] == "idempotency_key_unavailable"
        wsgi = Client(make_wsgi(idem, engine, ORDERS))
        wresp = wsgi.post("/orders", headers={"Idempotency-Key": "d", **AUTH})
        assert wresp.status_code == 503
        assert wresp.headers["Content-Type"] == "application/problem+json"
    finally:
        await aengine.dispose()
        engine.dispose()
        await idem.aclose()
