"""The key rules are the core's, before any store is touched: the same on every store.

Before: a NUL in a key was StoreUnavailable on PostgreSQL (and under fail_open the function
ran on every call), and a lone surrogate raised a raw UnicodeEncodeError."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support import port_open, server_missing

from idem_core import Idempotency, IdempotencyError, KeyMissing

RUN = uuid.uuid4().hex[:10]

SERVERS = {
    "postgresql": (
        "PostgreSQL",
        "IDEM_TEST_POSTGRES_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    ),
    "mysql": ("MariaDB", "IDEM_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
    "redis": ("Redis", "IDEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
}


def _drop(url: str, table: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        engine.dispose()


@pytest.fixture(params=["memory", "sqlite", "postgresql", "mysql", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    kind = str(request.param)
    if kind == "memory":
        yield "memory://"
        return
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
        return
    name, env, default = SERVERS[kind]
    base = os.environ.get(env, default)
    parts = urlsplit(base)
    if not port_open(parts.hostname or "127.0.0.1", parts.port or 0):
        server_missing(name, f"nothing listens on {parts.netloc} ({env})")
    if kind == "redis":
        yield f"{base}?prefix=idemkeys:{RUN}:"
        return
    table = f"idem_keys_{RUN}"
    yield f"{base}?table={table}"
    with contextlib.suppress(Exception):
        _drop(base, table)


@pytest.fixture(params=["fail", "fail_open"])
def idem(store_url: str, request: pytest.FixtureRequest) -> Iterator[Idempotency]:
    idem = Idempotency.from_url(
        store_url, namespace=f"k{uuid.uuid4().hex[:8]}", on_store_error=request.param
    )
    setup = getattr(idem.store, "setup", None)
    if setup is not None and not store_url.startswith("memory"):
        setup()
    yield idem
    idem.close()


@pytest.mark.parametrize("bad", ["a\x00b", "a\udc80b"])
def test_unstorable_key_is_refused_on_every_store(idem: Idempotency, bad: str) -> None:
    runs: list[str] = []

    @idem.idempotent(key="k")
    def work(k: str) -> int:
        runs.append(k)
        return len(runs)

    for _ in range(2):
        with pytest.raises(KeyMissing, match=r"NUL|surrogate"):
            work(bad)
    with pytest.raises(KeyMissing, match=r"NUL|surrogate"):
        idem.claim(bad)
    assert runs == []  # never ran unprotected, even with fail_open
    assert work("fine") == 1 and work("fine") == 1  # and the store is fine


async def test_unstorable_key_is_refused_on_every_store_async(idem: Idempotency) -> None:
    runs: list[str] = []

    @idem.idempotent(key="k")
    async def work(k: str) -> int:
        runs.append(k)
        return len(runs)

    for bad in ("a\x00b", "a\udc80b"):
        with pytest.raises(KeyMissing):
            await work(bad)
        with pytest.raises(KeyMissing):
            idem.aclaim(bad)
    assert runs == []
    await idem.aclose()


def test_surrogate_payload_is_refused_on_every_store(idem: Idempotency) -> None:
    runs: list[str] = []

    @idem.idempotent(key="k")
    def work(k: str, note: str) -> int:
        runs.append(k)
        return 1

    with pytest.raises(IdempotencyError, match="lone surrogate"):
        work("k", "\udc80")
    assert runs == []


def test_keys_with_colons_and_backslashes_round_trip(idem: Idempotency) -> None:
    values = {}
    for i, (raw, scope) in enumerate(
        [("a:b", ""), ("b", "a"), (("a", "b"), ""), ("a\\:b", ""), ("a\\", ""), ("x" * 400, "")]
    ):
        with idem.claim(raw, scope=scope) as call:
            assert not call.replayed, raw
            call.complete(i)
        values[idem.key_for(raw, scope=scope)] = i
    assert len(values) == 6
