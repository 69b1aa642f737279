"""Issue 10: SQL store URLs are checked when the store is built, not at the first call.
Unknown query parameters, a bad port, bad numbers and pool settings are a
``ConfigurationError`` naming the parameter; the driver parameters we pass on keep working."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from idem_sql.backend import CONNECT_TIMEOUT, READ_TIMEOUT, SQLITE_POOL_SIZE

from idem_core.errors import ConfigurationError
from idem_core.record import ClaimOutcome, ClaimRequest
from idem_core.registry import open_async_store, open_store

OPENERS = [open_store, open_async_store]

BAD = [
    ("postgresql://u@127.0.0.1:abc/db", "port"),
    ("postgresql://u@127.0.0.1:99999/db", "port"),
    ("mysql://u@127.0.0.1:x1/db", "port"),
    ("postgresql://u@127.0.0.1/db?sslmod=require", "sslmod"),
    ("mysql://u@127.0.0.1/db?conect_timeout=3", "conect_timeout"),
    ("sqlite:///x.db?journal=wal", "journal"),
    ("postgresql://u@127.0.0.1/db?read_timeout=soon", "read_timeout"),
    ("postgresql://u@127.0.0.1/db?connect_timeout=-1", "connect_timeout"),
    ("mysql://u@127.0.0.1/db?read_timeout=0", "read_timeout"),
    ("mysql://u@127.0.0.1/db?read_timeout=inf", "read_timeout"),
    ("mysql://u@127.0.0.1/db?write_timeout=never", "write_timeout"),
    ("mysql://u@127.0.0.1/db?pool_size=-2", "pool_size"),
    ("postgresql://u@127.0.0.1/db?pool_size=ten", "pool_size"),
    ("postgresql://u@127.0.0.1/db?max_overflow=-5", "max_overflow"),
    ("postgresql://u@127.0.0.1/db?pool_timeout=nan", "pool_timeout"),
    ("postgresql://u@127.0.0.1/db?pool_recycle=1.5x", "pool_recycle"),
    ("sqlite:///x.db?busy_timeout=-1", "busy_timeout"),
    ("sqlite:///x.db?read_timeout=3", "read_timeout"),
    ("postgresql://u@127.0.0.1/db?create=maybe", "create"),
    ("postgresql://u@127.0.0.1/db?table=1bad", "1bad"),
]


@pytest.mark.parametrize("opener", OPENERS, ids=["sync", "async"])
@pytest.mark.parametrize(("url", "name"), BAD)
def test_a_bad_url_is_refused_at_construction_naming_the_parameter(
    opener: Any, url: str, name: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        opener(url)
    assert name in str(caught.value)


@pytest.mark.parametrize("opener", OPENERS, ids=["sync", "async"])
def test_an_unknown_keyword_option_is_refused(opener: Any) -> None:
    with pytest.raises(ConfigurationError, match="pool_sise"):
        opener("sqlite://", pool_sise=3)
    with pytest.raises(ConfigurationError, match="read_timeout"):
        opener("postgresql://u@127.0.0.1/db", read_timeout="x")


def test_timeouts_have_documented_defaults() -> None:
    assert (CONNECT_TIMEOUT, READ_TIMEOUT) == (5.0, 10.0)


PASSED = {
    "postgresql": "application_name=idem-test&sslmode=disable&keepalives=1&connect_timeout=3",
    "mysql": "charset=utf8mb4&write_timeout=7&read_timeout=4&connect_timeout=3",
    "sqlite": "timeout=3&cached_statements=50&busy_timeout=2000",
}


async def test_driver_parameters_we_pass_on_still_work(db: str, db_url: str) -> None:
    url = f"{db_url}&{PASSED[db]}"
    store = open_store(url)
    try:
        store.setup()
        assert store.claim(req()).outcome.acquired
    finally:
        store.close()
    astore = open_async_store(url)
    try:
        assert (await astore.claim(req())).outcome.acquired
    finally:
        await astore.close()


def req() -> ClaimRequest:
    return ClaimRequest(key=uuid.uuid4().hex, fingerprint="f", attempt="a", lease=30, ttl=60)


def test_a_sqlite_file_keeps_a_connection_for_each_of_many_threads(tmp_path: Any) -> None:
    """Up to 64 connections to a SQLite file (a thread waiting on SQLAlchemy's 5 cost more
    than a connection), opened as threads need them; ``pool_size`` still decides."""
    store = open_store(f"sqlite:///{tmp_path}/many.db")
    given = open_store(f"sqlite:///{tmp_path}/many.db?pool_size=3")
    try:
        assert (store.engine.pool.size(), given.engine.pool.size()) == (SQLITE_POOL_SIZE, 3)
        # 32 threads race for the same 50 keys: each key is claimed exactly once, every
        # other claim sees it in progress, and nothing fails for want of the write lock.
        keys = [f"k{i}" for i in range(50)]
        outcomes: list[ClaimOutcome] = []
        errors: list[BaseException] = []
        start = threading.Barrier(32)

        def race() -> None:
            try:
                start.wait(10)
                for key in keys:
                    outcomes.append(
                        store.claim(ClaimRequest(key, "f" * 32, uuid.uuid4().hex, 60, 600)).outcome
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=race) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert outcomes.count(ClaimOutcome.CLAIMED) == len(keys)
        assert outcomes.count(ClaimOutcome.IN_PROGRESS) == 31 * len(keys)
        assert (
            1 < store.engine.pool.checkedin() + store.engine.pool.checkedout() <= SQLITE_POOL_SIZE
        )
    finally:
        store.close()
        given.close()
