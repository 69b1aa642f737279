"""Servers and stores for the HTTP integration tests (WSGI, Django): PostgreSQL in a records
table of this run's own, and a WSGI server (waitress) on a free loopback port."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from integration_ports import free_port
from support import port_open, server_missing

RUN = uuid.uuid4().hex[:10]
PG_BASE = os.environ.get(
    "IDEM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PG_TABLE = f"idem_http_{RUN}"


def postgres_url() -> str:
    if not port_open("127.0.0.1", 5432) and "IDEM_TEST_POSTGRES_URL" not in os.environ:
        server_missing("PostgreSQL", "nothing listens on 127.0.0.1:5432")
    sep = "&" if "?" in PG_BASE else "?"
    return f"{PG_BASE}{sep}table={PG_TABLE}"


def drop_pg_table() -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_BASE.split("?", 1)[0])
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {PG_TABLE}"))
    finally:
        engine.dispose()


@contextmanager
def waitress_server(app: Callable[..., Any], threads: int = 24) -> Iterator[str]:
    """A real WSGI server on loopback, serving ``app`` from a thread; yields its base URL."""
    from waitress.server import create_server

    port = free_port()
    server = create_server(app, host="127.0.0.1", port=port, threads=threads, backlog=256)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port):
        assert time.monotonic() < deadline, "waitress did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        thread.join(10)
