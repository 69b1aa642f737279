"""Issue 11 "Failures and lifecycles", SQL side: what a failure becomes, fed identically to
the sync store (through ``AsyncView``) and the async one.

* nothing answers (a closed port, a SQLite file that cannot be opened): ``StoreUnavailable``
  with the driver's error as ``__cause__``, never a raw driver exception;
* a caller's failing ``with_items`` statement: its own exception when it is the caller's
  error (a constraint violation), ``StoreUnavailable`` when it is an ``OperationalError``;
  the same in both twins;
* a caller's connection on a database without the records table: ``ConfigurationError``
  naming ``idem setup`` and the table.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from idem_sql.backend import driver_url
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from idem_core import Idempotency
from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.record import ClaimOutcome, ClaimRequest, Status
from idem_core.registry import open_async_store, open_store
from idem_core.testing.scenarios import AsyncView

TWINS = ["sync", "async"]


def req(key: str) -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=30, ttl=600)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def async_url(url: str) -> str:
    """``url`` with the async driver the store would use."""
    return driver_url(url, asynchronous=True)[0]


async def opened(url: str, twin: str) -> Any:
    """The store for ``url``, as coroutines whatever the twin."""
    return AsyncView(open_store(url)) if twin == "sync" else open_async_store(url)


async def closed(store: Any) -> None:
    await store.close()


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres@127.0.0.1:{port}/test",
        "postgresql+asyncpg://postgres@127.0.0.1:{port}/test",
        "mysql+pymysql://root@127.0.0.1:{port}/test",
        "sqlite:////nonexistent/dir/x.db",
    ],
    ids=["psycopg", "asyncpg", "mysql", "sqlite-unopenable"],
)
async def test_nothing_answers_at_first_use_is_store_unavailable(url: str, twin: str) -> None:
    store = await opened(url.format(port=closed_port()), twin)
    try:
        for call in (
            lambda: store.claim(req("k")),
            lambda: store.get("k"),
            lambda: store.complete("k", 1, b"r", 60),
            lambda: store.setup(),
            lambda: store.diagnostics(),
        ):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await call()
            assert time.monotonic() - start < 5, "a refused connection is not worth waiting for"
            assert caught.value.__cause__ is not None
            assert not isinstance(caught.value.__cause__, StoreUnavailable)
    finally:
        await closed(store)


# -- a caller's failing statement in complete(with_items=...) ------------------------------


@pytest.fixture
async def business(base_url: str) -> AsyncIterator[Table]:
    """A business table with one row (id 1), so inserting id 1 again violates its key."""
    table = Table(
        f"orders_{uuid.uuid4().hex[:8]}", MetaData(), Column("id", Integer, primary_key=True)
    )
    engine = create_engine(base_url)
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table).values(id=1))
    yield table
    table.drop(engine)
    engine.dispose()


def outage_statement(db: str) -> Any:
    """A statement of the caller's that fails with an ``OperationalError``."""
    if db == "postgresql":
        return text("SELECT pg_terminate_backend(pg_backend_pid())")
    if db == "mysql":
        return text("KILL CONNECTION_ID()")
    return text("SELEC 1")  # SQLite reports a syntax error as OperationalError


async def complete_with(
    db: str, base_url: str, db_url: str, twin: str, on_connection: bool, item: Any
) -> tuple[type[BaseException], Status | None]:
    """Claim a key, complete it with ``item``; (the error raised, the record's status)."""
    key = f"items-{uuid.uuid4().hex}"
    main = await opened(db_url, twin)
    await main.setup()
    try:
        if not on_connection:
            res = await main.claim(req(key))
            try:
                await main.complete(key, res.fence, b"r", 600, with_items=[item])
            except Exception as exc:
                error: type[BaseException] = type(exc)
            else:
                raise AssertionError("the failing statement passed")
        elif twin == "sync":
            engine = create_engine(base_url)
            try:
                with engine.connect() as conn:
                    bound = AsyncView(main._store.bind(conn))
                    res = await bound.claim(req(key))
                    conn.commit()
                    try:
                        await bound.complete(key, res.fence, b"r", 600, with_items=[item])
                    except Exception as exc:
                        error = type(exc)
                    else:
                        raise AssertionError("the failing statement passed")
                    if conn.in_transaction() and not conn.invalidated:
                        conn.rollback()
            finally:
                engine.dispose()
        else:
            aengine = create_async_engine(async_url(base_url))
            try:
                async with aengine.connect() as aconn:
                    bound = main.bind(aconn)
                    res = await bound.claim(req(key))
                    await aconn.commit()
                    try:
                        await bound.complete(key, res.fence, b"r", 600, with_items=[item])
                    except Exception as exc:
                        error = type(exc)
                    else:
                        raise AssertionError("the failing statement passed")
                    if aconn.in_transaction() and not aconn.invalidated:
                        await aconn.rollback()
            finally:
                await aengine.dispose()
        record = await main.get(key)
        return error, None if record is None else record.status
    finally:
        await closed(main)


@pytest.mark.parametrize("on_connection", [False, True], ids=["own-engine", "callers-connection"])
async def test_a_callers_failing_statement_is_the_same_error_in_both_twins(
    db: str, base_url: str, db_url: str, business: Table, on_connection: bool
) -> None:
    """A constraint violation in the caller's statement is the caller's IntegrityError; an
    OperationalError (the connection or server failing) is StoreUnavailable. Either way
    nothing is completed, and both twins agree."""
    violation = insert(business).values(id=1)
    for item, expected in ((violation, IntegrityError), (outage_statement(db), StoreUnavailable)):
        seen = [
            await complete_with(db, base_url, db_url, twin, on_connection, item) for twin in TWINS
        ]
        assert seen[0] == seen[1], f"the twins differ on {item}: {seen}"
        error, status = seen[0]
        assert issubclass(error, expected), (item, seen)
        assert status is not Status.COMPLETED


# -- a caller's connection on a database without the table ---------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_callers_connection_without_the_table_is_a_configuration_error(
    base_url: str, twin: str
) -> None:
    table = f"idem_missing_{uuid.uuid4().hex[:8]}"
    url = f"{base_url}{'&' if '?' in base_url else '?'}table={table}"
    idem = Idempotency.from_url(url, namespace="missing")
    if twin == "sync":
        engine = create_engine(base_url)
        try:
            with engine.connect() as conn, pytest.raises(ConfigurationError) as caught:
                with idem.claim("k", payload=1, connection=conn):
                    raise AssertionError("ran without a table")
        finally:
            engine.dispose()
            idem.close()
    else:
        aengine = create_async_engine(async_url(base_url))
        try:
            async with aengine.connect() as aconn:
                with pytest.raises(ConfigurationError) as caught:
                    async with idem.aclaim("k", payload=1, connection=aconn):
                        raise AssertionError("ran without a table")
        finally:
            await aengine.dispose()
            await idem.aclose()
    message = str(caught.value)
    assert "idem setup" in message and table in message, message


@pytest.mark.parametrize("twin", TWINS)
async def test_create_0_without_the_table_is_a_configuration_error(
    base_url: str, twin: str
) -> None:
    table = f"idem_missing_{uuid.uuid4().hex[:8]}"
    store = await opened(f"{base_url}{'&' if '?' in base_url else '?'}table={table}&create=0", twin)
    try:
        with pytest.raises(ConfigurationError, match="idem setup") as caught:
            await store.claim(req("k"))
        assert table in str(caught.value)
    finally:
        await closed(store)


@pytest.mark.parametrize("twin", TWINS)
async def test_a_claim_after_the_failures_still_works(db_url: str, twin: str) -> None:
    """The translation point keeps the store usable: a normal call afterwards succeeds."""
    store = await opened(db_url, twin)
    try:
        await store.setup()
        res = await store.claim(req(f"after-{uuid.uuid4().hex}"))
        assert res.outcome is ClaimOutcome.CLAIMED
    finally:
        await closed(store)
