"""The Django integration on PostgreSQL: the view decorator with Django's test client, and a
real server (waitress, in a subprocess, on the minimal project in django_site.py) killed
between the view's write and the response being stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_support import PG_TABLE, drop_pg_table, postgres_url
from integration_ports import free_port
from support import port_open

pytest.importorskip("django")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ORDERS = f"orders_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """Django configured on the machine's PostgreSQL; yields the records' store URL."""
    url = postgres_url()
    os.environ["IDEM_TEST_RECORDS_URL"] = url
    os.environ["IDEM_TEST_ORDERS"] = ORDERS
    import django_site

    django_site.RECORDS_URL = url
    django_site.ORDERS = ORDERS
    django_site.configure()
    from django.db import connection

    from idem_core.registry import open_store

    store = open_store(url)
    store.setup()  # type: ignore[attr-defined]
    store.close()
    with connection.cursor() as cur:
        cur.execute(f"CREATE TABLE {ORDERS} (id text PRIMARY KEY, key text, amount int)")
    try:
        yield url
    finally:
        with connection.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {ORDERS}")
        connection.close()
        drop_pg_table()


def orders_for(key: str) -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {ORDERS} WHERE key = %s", [key])
        return int(cur.fetchone()[0])


def records_for(key: str) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"SELECT * FROM {PG_TABLE} WHERE key LIKE %s", [f"%:{key}"])
        return list(cur.fetchall())


AUTH = {"HTTP_AUTHORIZATION": "Bearer alice"}


def test_view_decorator_runs_once_and_replays(site: str) -> None:
    from django.test import Client

    c = Client()
    key = f"k-{uuid.uuid4().hex}"
    h = {"HTTP_IDEMPOTENCY_KEY": key, **AUTH}
    first = c.post("/orders/tx", b'{"amount": 5, "to": "x"}', content_type="application/json", **h)
    again = c.post("/orders/tx", b'{"to":"x","amount":5}', content_type="application/json", **h)
    other = c.post("/orders/tx", b'{"amount": 6}', content_type="application/json", **h)
    assert first.status_code == 201
    assert again.status_code == 201
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true"
    assert again["X-Order"] == first["X-Order"]
    assert "last_order" in first.cookies
    assert "last_order" not in again.cookies  # a cookie is never stored nor replayed
    assert other.status_code == 422
    assert other["Content-Type"] == "application/problem+json"
    assert orders_for(key) == 1
    assert len(records_for(key)) == 1
    bob = c.post(
        "/orders/tx",
        b'{"amount": 5, "to": "x"}',
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key,
        HTTP_COOKIE="sessionid=bob",
    )
    assert bob.status_code == 201 and "Idempotent-Replayed" not in bob
    anon = c.post("/orders/tx", b"{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY=key)
    assert anon.status_code == 400
    assert json.loads(anon.content)["code"] == "idempotency_key_no_identity"
    assert orders_for(key) == 2


def test_the_record_commits_with_the_view_or_not_at_all(site: str) -> None:
    """The view raises after its write: the write and the claim roll back together, so a
    retry runs (and a failed view never leaves a claim behind)."""
    import django_site
    from django.db import connection, transaction
    from django.test import Client

    from idem_core.integrations.django import idempotent_view, sqlalchemy_connection

    key = f"k-{uuid.uuid4().hex}"
    seen_inside: list[int] = []

    @idempotent_view(django_site.idem())
    def failing(request: Any) -> Any:
        django_site._order(request)
        # inside the view's transaction the claim is there, outside it is not yet
        seen_inside.append(len(records_for(key)))
        raise RuntimeError("after the write")

    from django.test import RequestFactory

    req = RequestFactory().post(
        "/x", b"{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY=key, **AUTH
    )
    with pytest.raises(RuntimeError):
        failing(req)
    assert seen_inside == [1]
    assert orders_for(key) == 0
    assert records_for(key) == []
    # the SQLAlchemy connection a view may use runs in the same transaction as Django's
    with transaction.atomic(), sqlalchemy_connection() as conn:
        from sqlalchemy import text

        conn.execute(
            text(f"INSERT INTO {ORDERS} (id, key, amount) VALUES ('sa', :k, 1)"), {"k": key}
        )
        assert orders_for(key) == 1  # Django's cursor sees SQLAlchemy's write: one transaction
        transaction.set_rollback(True)
    assert orders_for(key) == 0
    assert connection.in_atomic_block is False
    ok = Client().post(
        "/orders/tx", b"{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY=key, **AUTH
    )
    assert ok.status_code == 201
    assert orders_for(key) == 1


# -- a real server, killed between the view's write and the stored response -----------------


class Server:
    def __init__(self, url: str, pause_file: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "django_site",
            "IDEM_TEST_RECORDS_URL": url,
            "IDEM_TEST_ORDERS": ORDERS,
            "IDEM_TEST_PAUSE_FILE": str(pause_file),
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "tests"), str(ROOT)]),
        }
        code = (
            "import django; django.setup();"
            "from django.core.wsgi import get_wsgi_application;"
            "from waitress import serve;"
            f"serve(get_wsgi_application(), host='127.0.0.1', port={self.port}, threads=8)"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.port):
            assert self.proc.poll() is None, "the Django server exited"
            assert time.monotonic() < deadline, "the Django server did not start"
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.mark.parametrize("path", ["/orders/tx", "/orders/plain"])
def test_killed_between_the_write_and_the_stored_response(
    site: str, tmp_path: Path, path: str
) -> None:
    pause = tmp_path / "paused"
    key = f"kill-{uuid.uuid4().hex}"
    h = {
        "Idempotency-Key": key,
        "Authorization": "Bearer alice",
        "content-type": "application/json",
    }
    server = Server(site, pause)
    try:
        with httpx.Client(base_url=server.base, timeout=60) as c:
            with pytest.raises(httpx.TransportError):
                # the server dies while this request is in the view, after its write
                import threading

                def killer() -> None:
                    deadline = time.monotonic() + 30
                    while not pause.exists() and time.monotonic() < deadline:
                        time.sleep(0.02)
                    server.kill()

                t = threading.Thread(target=killer)
                t.start()
                try:
                    c.post(path, content=b'{"amount": 1}', headers={**h, "X-Pause": "1"})
                finally:
                    t.join()
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert pause.exists()
    time.sleep(0.2)  # PostgreSQL notices the dead connection and ends its transaction
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _in_flight(key):
        time.sleep(0.1)
    if path == "/orders/plain":
        # Records on the store's own connection: the write is visible without the response
        # stored. This is what the transactional mode prevents.
        assert orders_for(key) == 1
        assert records_for(key) and all(r is not None for r in records_for(key))
        return
    # Transactional: neither the write nor the record survived the crash.
    assert orders_for(key) == 0
    assert records_for(key) == []
    server = Server(site, pause)
    try:
        with httpx.Client(base_url=server.base, timeout=60) as c:
            retried = c.post(path, content=b'{"amount": 1}', headers=h)
            replay = c.post(path, content=b'{"amount": 1}', headers=h)
    finally:
        server.kill()
    assert retried.status_code == 201
    assert replay.content == retried.content
    assert replay.headers["idempotent-replayed"] == "true"
    assert orders_for(key) == 1  # the view ran exactly once in effect
    assert len(records_for(key)) == 1


def _in_flight(key: str) -> bool:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'"
            " AND query LIKE %s",
            [f"%{ORDERS}%"],
        )
        return bool(cur.fetchone()[0])


def test_middleware_guards_every_matching_request(site: str) -> None:
    import django_site
    from django.http import JsonResponse
    from django.test import RequestFactory, override_settings

    from idem_core.integrations.django import IdempotencyMiddleware

    runs: list[int] = []

    def get_response(request: Any) -> Any:
        runs.append(1)
        response = JsonResponse({"run": len(runs), "id": uuid.uuid4().hex}, status=201)
        response.set_cookie("sessionid", "rotated")
        response["X-Run"] = str(len(runs))
        return response

    settings = {"idem": django_site.idem(), "routes": ["/api/*"]}
    with override_settings(IDEMPOTENCY=settings):
        middleware = IdempotencyMiddleware(get_response)
    rf = RequestFactory()
    key = f"mw-{uuid.uuid4().hex}"

    def post(path: str, **extra: Any) -> Any:
        return middleware(rf.post(path, b"{}", content_type="application/json", **extra))

    first = post("/api/orders", HTTP_IDEMPOTENCY_KEY=key, HTTP_COOKIE="sessionid=alice")
    again = post("/api/orders", HTTP_IDEMPOTENCY_KEY=key, HTTP_COOKIE="sessionid=alice")
    bob = post("/api/orders", HTTP_IDEMPOTENCY_KEY=key, HTTP_COOKIE="sessionid=bob")
    missing = post("/api/orders", HTTP_COOKIE="sessionid=alice")
    other = post("/elsewhere")
    assert first.status_code == 201 and first.cookies["sessionid"].value == "rotated"
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true"
    assert again["X-Run"] == "1"
    assert "sessionid" not in again.cookies
    assert json.loads(bob.content)["run"] == 2
    assert missing.status_code == 400
    assert other.status_code == 201  # not a guarded route
    assert len(runs) == 3


def test_an_async_view_is_refused_at_decoration(site: str) -> None:
    import django_site

    from idem_core import ConfigurationError
    from idem_core.integrations.django import idempotent_view

    async def view(request: Any) -> Any:
        raise AssertionError("never runs")

    with pytest.raises(ConfigurationError, match="async view"):
        idempotent_view(django_site.idem())(view)
