"""The lean record layout (``idem_redis.records``), and records of the previous layout (one hash
per key, written here by that version's own scripts): read, converted on first touch, listed."""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import legacy_layout as old
import pytest
import redis
from idem_redis import records

from idem_core import ClaimOutcome, ClaimRequest, CorruptRecord, Status
from idem_core.registry import open_async_store, open_store
from idem_core.scanning import ScanFilter

HEADER = struct.Struct("<BqqqqqII")
FP = "0123456789abcdef" * 2
RESULT = bytes(range(200))


@pytest.fixture(params=["standalone", "cluster"])
def where(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    """A store URL with a prefix of this test's own, and a plain client to the same data."""
    prefix = f"lean-{uuid.uuid4().hex[:8]}:"
    if request.param == "standalone":
        base = request.getfixturevalue("redis_url").split("?")[0]
        raw: Any = redis.Redis.from_url(base)
    else:
        cluster = request.getfixturevalue("cluster")
        base = cluster.url
        raw = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield f"{base}?prefix={prefix}", raw
    raw.close()


def test_a_completed_record_is_one_string(where: tuple[str, Any]) -> None:
    url, raw = where
    store = open_store(url)
    try:
        key, attempt = uuid.uuid4().hex, uuid.uuid4().hex
        res = store.claim(ClaimRequest(key, FP, attempt, 30, 3600))
        done = store.complete(key, res.fence, RESULT, 3600)
        name = store.prefix + key
        value = raw.get(name)
        assert raw.type(name) == b"string"
        # header, ids (flags, fingerprint length, 16 + 16 raw bytes), result; no steps
        assert len(value) == HEADER.size + 5 + 16 + 16 + len(RESULT)
        kind, fence, lease, expires, created, updated, ids_len, result_len = HEADER.unpack_from(
            value
        )
        assert (kind, ids_len, result_len) == (records.COMPLETED, 5 + 32, len(RESULT))
        assert (fence, lease, expires) == (done.fence, done.lease_expires_at, done.expires_at)
        assert (created, updated) == (done.created_at, done.updated_at)
        ids = value[HEADER.size : HEADER.size + ids_len]
        assert ids == bytes([records.FP_RAW | records.ATTEMPT_RAW]) + struct.pack("<I", 16) + (
            bytes.fromhex(FP) + bytes.fromhex(attempt)
        )
        assert value.endswith(RESULT)
        # the key expires with the record (to the millisecond, rounded up)
        assert raw.pexpiretime(name) == -(-done.expires_at // 1000)
        assert records.decode(key, value) == done
    finally:
        store.close()


def test_text_ids_and_steps_in_the_value(where: tuple[str, Any]) -> None:
    """A fingerprint or attempt that is not lowercase hex is kept as text; steps are entries
    after the result, kept by complete, and read back last-written-wins."""
    url, raw = where
    store = open_store(url)
    try:
        key = uuid.uuid4().hex
        fp, attempt = "Not-Hex:é", "a1b2c3d4e5f6-17"
        res = store.claim(ClaimRequest(key, fp, attempt, 30, 3600))
        assert res.record.fingerprint == fp and res.record.attempt == attempt
        until = res.record.expires_at
        store.record_step(key, res.fence, "one", b"1", until)
        store.record_step(key, res.fence, "two", b"\x00\xff", until)
        store.record_step(key, res.fence, "one", b"1", until)  # a retried write
        done = store.complete(key, res.fence, b"r", 3600)
        value = raw.get(store.prefix + key)
        entries = [
            records.step_entry(n, until, d) for n, d in [("one", b"1"), ("two", b"\x00\xff")]
        ]
        assert value.endswith(b"r" + entries[0] + entries[1] + entries[0])
        assert records.steps_of(value) == entries[0] + entries[1] + entries[0]
        assert store.load_steps(key) == {"one": (until, b"1"), "two": (until, b"\x00\xff")}
        got = store.get(key)
        assert got == done and got is not None
        assert (got.fingerprint, got.attempt, got.result) == (fp, attempt, b"r")
    finally:
        store.close()


def test_a_value_of_another_layout_is_corrupt_and_left_alone(where: tuple[str, Any]) -> None:
    url, raw = where
    store = open_store(url)
    try:
        key = uuid.uuid4().hex
        name = store.prefix + key
        for value in (b"\xf2short", b"x" * 80, b"\xf2" + b"\x00" * 40 + b"\xff" * 8):
            raw.set(name, value)
            for call in (lambda: store.get(key), lambda: store.complete(key, 1, b"", 60)):
                with pytest.raises(CorruptRecord):
                    call()
            assert raw.get(name) == value
        raw.rpush(name + ":list", b"x")
        with pytest.raises(CorruptRecord):
            store.get(key + ":list")
        store.delete(key)  # a corrupt record can still be forgotten
        store.delete(key + ":list")
        assert raw.exists(name, name + ":list") == 0
    finally:
        store.close()


def _legacy(raw: Any, name: str, lease_us: int = 30_000_000) -> dict[str, Any]:
    """Three records written by the previous version's scripts under ``name``: ``held``
    (in progress, with a step), ``done`` (completed, binary result), ``freed`` (released)."""
    fences = {}
    for what in ("held", "done", "freed"):
        reply = old.run(raw, old.CLAIM, f"{name}{what}", FP, f"att-{what}", lease_us, 3600_000_000)
        assert reply[0] == 1
        fences[what] = int(old.run(raw, old.GET, f"{name}{what}")[4])
    held = fences["held"]
    until = int(old.run(raw, old.GET, f"{name}held")[6])
    assert old.run(raw, old.RECORD_STEP, f"{name}held", str(held), "s1", b"\x00data:x", until)[0]
    assert old.run(raw, old.COMPLETE, f"{name}done", str(fences["done"]), RESULT, 60_000_000)[0]
    assert old.run(raw, old.RELEASE, f"{name}freed", str(fences["freed"]))[0]
    for what in fences:
        assert raw.type(f"{name}{what}") == b"hash"
    return {"fences": fences, "until": until}


def test_previous_layout_is_read_and_converted_on_touch(where: tuple[str, Any]) -> None:
    url, raw = where
    store = open_store(url)
    try:
        base = uuid.uuid4().hex[:8] + ":"
        name = store.prefix + base
        made = _legacy(raw, name)
        fences = made["fences"]
        # listings read the old layout without converting it
        listed = {r.key: r for page in store.scan(ScanFilter(prefix=base), 10) for r in page}
        assert sorted(listed) == [base + "done", base + "freed", base + "held"]
        assert listed[base + "done"].status is Status.COMPLETED
        assert raw.type(name + "held") == b"hash"
        expiry = raw.pexpiretime(name + "held")
        held = store.get(base + "held")
        assert held is not None and held.fence == fences["held"] and held.attempt == "att-held"
        assert held.fingerprint == FP and held.status is Status.IN_PROGRESS
        assert held == listed[base + "held"]
        # converted in place, expiry kept, steps carried over
        assert raw.type(name + "held") == b"string"
        assert raw.pexpiretime(name + "held") == expiry
        assert store.load_steps(base + "held") == {"s1": (made["until"], b"\x00data:x")}
        renewed = store.renew(base + "held", fences["held"], 60)
        assert renewed.fence == fences["held"]
        store.complete(base + "held", fences["held"], b"late", 60)
        replay = store.claim(ClaimRequest(base + "held", FP, "other", 30, 60))
        assert replay.outcome is ClaimOutcome.COMPLETED and replay.record.result == b"late"
        assert store.load_steps(base + "held") == {"s1": (made["until"], b"\x00data:x")}
        # a completed record replays its result at the first touch
        replay = store.claim(ClaimRequest(base + "done", FP, "other", 30, 60))
        assert replay.outcome is ClaimOutcome.COMPLETED and replay.record.result == RESULT
        assert raw.type(name + "done") == b"string"
        # a released one is taken by the next claim, with a later fence
        again = store.claim(ClaimRequest(base + "freed", FP, "next", 30, 60))
        assert again.outcome is ClaimOutcome.CLAIMED and again.fence > fences["freed"]
    finally:
        store.close()


def test_previous_layout_async(where: tuple[str, Any]) -> None:
    url, raw = where

    async def main() -> None:
        store = open_async_store(url)
        try:
            base = uuid.uuid4().hex[:8] + ":"
            made = _legacy(raw, store.prefix + base)
            fences = made["fences"]
            assert await store.load_steps(base + "held") == {"s1": (made["until"], b"\x00data:x")}
            await store.complete(base + "held", fences["held"], b"late", 60)
            replay = await store.claim(ClaimRequest(base + "done", FP, "other", 30, 60))
            assert replay.outcome is ClaimOutcome.COMPLETED and replay.record.result == RESULT
            await store.release(base + "freed", fences["freed"])  # already released: a no-op
            again = await store.claim(ClaimRequest(base + "freed", FP, "next", 30, 60))
            assert again.outcome is ClaimOutcome.CLAIMED
            for what in ("held", "done", "freed"):
                assert raw.type(f"{store.prefix}{base}{what}") == b"string"
        finally:
            await store.close()

    asyncio.run(main())


def test_encode_is_what_the_scripts_write(where: tuple[str, Any]) -> None:
    """``records.encode`` (for tools writing records in bulk) makes the scripts' bytes."""
    url, raw = where
    store = open_store(url)
    try:
        key = uuid.uuid4().hex
        res = store.claim(ClaimRequest(key, FP, "attempt-1", 30, 3600))
        store.record_step(key, res.fence, "s", b"d", res.record.expires_at)
        done = store.complete(key, res.fence, RESULT, 3600)
        steps = {"s": (res.record.expires_at, b"d")}
        assert raw.get(store.prefix + key) == records.encode(done, steps)
    finally:
        store.close()
