"""Issue 10 "Keys and results", SQL side: every byte of a key counts on every dialect, a
result too large for the database is refused before anything is written, and a table made
by an older version (MySQL ``VARCHAR … utf8mb4_bin``) is reported with its migration."""

from __future__ import annotations

import unicodedata
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from idem_core.errors import KeyMissing, ResultNotSerializable
from idem_core.record import ClaimOutcome, ClaimRequest, Status
from idem_core.registry import open_async_store, open_store
from idem_core.testing.scenarios import AsyncView

TWINS = ["sync", "async"]


def req(key: str) -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint="fp", attempt=uuid.uuid4().hex, lease=30, ttl=600)


async def opened(url: str, twin: str) -> Any:
    return AsyncView(open_store(url)) if twin == "sync" else open_async_store(url)


E_NFC = unicodedata.normalize("NFC", "\u00c9")
E_NFD = unicodedata.normalize("NFD", "\u00c9")
# Pairs that a text collation may take for one key: each must be two records.
PAIRS = [
    ("order-7", "order-7 "),  # PAD SPACE collations ignore trailing spaces
    ("order-7", "Order-7"),  # case-insensitive collations
    (f"caf{E_NFC}", f"caf{E_NFD}"),  # Unicode normalisation
    ("a", "a\t"),
]


@pytest.mark.parametrize("twin", TWINS)
async def test_every_byte_of_a_key_counts(db_url: str, twin: str) -> None:
    store = await opened(db_url, twin)
    try:
        await store.setup()
        run = uuid.uuid4().hex[:8]
        for i, (first, second) in enumerate(PAIRS):
            a, b = f"{run}-{i}-{first}", f"{run}-{i}-{second}"
            res = await store.claim(req(a))
            assert res.outcome is ClaimOutcome.CLAIMED
            await store.complete(a, res.fence, b"first", 600)
            other = await store.claim(req(b))
            assert other.outcome is ClaimOutcome.CLAIMED, f"{b!r} replayed {a!r}"
            await store.complete(b, other.fence, b"second", 600)
            got_a, got_b = await store.get(a), await store.get(b)
            assert got_a is not None and got_a.key == a and got_a.result == b"first"
            assert got_b is not None and got_b.key == b and got_b.result == b"second"
    finally:
        await store.close()


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
async def test_a_nul_in_a_key_on_postgresql_is_key_missing(db_url: str, twin: str) -> None:
    """The core refuses such keys first; one that reaches the store is not an outage."""
    store = await opened(db_url, twin)
    try:
        await store.setup()
        with pytest.raises(KeyMissing):
            await store.claim(req("a\x00b"))
        assert (await store.claim(req(f"ok-{uuid.uuid4().hex}"))).outcome.acquired
    finally:
        await store.close()


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("db", ["mysql"], indirect=True)
async def test_a_result_above_max_allowed_packet_is_refused_before_writing(
    db_url: str, twin: str
) -> None:
    """MariaDB used to report StoreUnavailable after the work ran; now ``complete`` refuses
    the result (the core records the error), nothing is written, the claim is untouched."""
    store = await opened(db_url, twin)
    try:
        await store.setup()
        key = f"big-{uuid.uuid4().hex}"
        res = await store.claim(req(key))
        size = await server_packet(db_url) + 1  # can never be sent in one statement
        with pytest.raises(ResultNotSerializable, match="max_result_size"):
            await store.complete(key, res.fence, b"\x00" * size, 600)
        assert store.max_result_size < size
        record = await store.get(key)
        assert record is not None and record.status is Status.IN_PROGRESS
        assert record.fence == res.fence
        # The largest result it accepts goes through, even if every byte needs escaping.
        fits = b"'" * store.max_result_size
        done = await store.complete(key, res.fence, fits, 600)
        assert done.status is Status.COMPLETED and done.result == fits
    finally:
        await store.close()


@pytest.mark.parametrize("twin", TWINS)
async def test_max_result_size_is_known_and_a_result_within_it_is_stored(
    db: str, db_url: str, twin: str
) -> None:
    store = await opened(db_url, twin)
    try:
        await store.setup()
        limit = store.max_result_size
        expected = {"postgresql": (2**30 - 2**20) // 2, "sqlite": 1_000_000_000 - 64 * 1024}
        if db in expected:
            assert limit == expected[db]
        assert isinstance(limit, int) and limit > 1024 * 1024
        key = f"mid-{uuid.uuid4().hex}"
        res = await store.claim(req(key))
        result = bytes(range(256)) * 4096  # 1 MiB, every byte value
        done = await store.complete(key, res.fence, result, 600)
        assert done.result == result
    finally:
        await store.close()


async def server_packet(url: str) -> int:
    engine = create_engine(url.split("?", 1)[0])
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT @@max_allowed_packet")).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.parametrize("db", ["mysql"], indirect=True)
def test_mysql_max_result_size_follows_max_allowed_packet(db_url: str) -> None:
    store = open_store(db_url)
    try:
        store.setup()
        store.diagnostics()
        engine = create_engine(db_url.split("?", 1)[0])
        with engine.connect() as conn:
            packet = int(conn.execute(text("SELECT @@max_allowed_packet")).scalar_one())
        engine.dispose()
        assert store.max_result_size < packet // 2
        assert store.max_result_size > packet // 2 - 128 * 1024
    finally:
        store.close()


@pytest.mark.parametrize("db", ["mysql"], indirect=True)
def test_an_old_mysql_key_column_is_reported_with_its_migration(base_url: str) -> None:
    """A table made by an older version (VARCHAR utf8mb4_bin) is flagged by diagnostics
    (``idem check``); the documented ALTER fixes it."""
    table = f"idem_old_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE {table} (`key` VARCHAR(255) CHARACTER SET utf8mb4 "
                "COLLATE utf8mb4_bin NOT NULL PRIMARY KEY, status VARCHAR(16) NOT NULL, "
                "fingerprint TEXT NOT NULL, fence BIGINT NOT NULL, lease_expires_at BIGINT "
                "NOT NULL, expires_at BIGINT NOT NULL, attempt TEXT NOT NULL, created_at BIGINT "
                "NOT NULL, updated_at BIGINT NOT NULL, result LONGBLOB)"
            )
        )
    store = open_store(f"{base_url}?table={table}")
    try:
        column = str(store.diagnostics()["key_column"])
        assert column.startswith("MIGRATE") and "ALTER TABLE" in column, column
        alter = column.split("run: ", 1)[1]
        res = store.claim(req("k"))
        store.complete("k", res.fence, b"kept", 600)
        with admin.begin() as conn:
            conn.execute(text(alter))
        assert "byte for byte" in str(store.diagnostics()["key_column"])
        record = store.get("k")  # the migration keeps the records
        assert record is not None and record.result == b"kept"
        assert store.claim(req("k ")).outcome is ClaimOutcome.CLAIMED
    finally:
        store.close()
        with admin.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        admin.dispose()
