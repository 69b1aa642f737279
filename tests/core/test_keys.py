"""Stored keys on memory://: distinct (namespace, scope, key parts) never share a record, and
keys no store can hold are refused before anything runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idem_core import ClaimOutcome, Idempotency, IdempotencyError, KeyMissing
from idem_core.keys import full_key
from idem_core.memory import MemoryStore


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def idem(store: MemoryStore) -> Idempotency:
    return Idempotency(store, namespace="shop")


# -- 1. parts are encoded, never joined as they are ------------------------------------------


def test_multi_field_key_parts_never_meet_across_tenants(idem: Idempotency) -> None:
    runs: list[tuple[str, str]] = []

    @idem.idempotent(key=["tenant", "order"])
    def charge(tenant: str, order: str) -> str:
        runs.append((tenant, order))
        return f"{tenant}/{order}"

    assert charge("acme:eu", "7") == "acme:eu/7"
    assert charge("acme", "eu:7") == "acme/eu:7"  # before: replayed "acme:eu/7"
    assert charge("acme\\", ":7") == "acme\\/:7"
    assert charge("acme", "eu:7") == "acme/eu:7"  # a true duplicate still replays
    assert runs == [("acme:eu", "7"), ("acme", "eu:7"), ("acme\\", ":7")]


def test_a_key_callable_may_return_parts(idem: Idempotency) -> None:
    runs: list[str] = []

    @idem.idempotent(key=lambda tenant, order: (tenant, order))
    def charge(tenant: str, order: str) -> str:
        runs.append(tenant + "|" + order)
        return order

    charge("a:b", "c")
    charge("a", "b:c")
    charge("a", "b:c")
    assert runs == ["a:b|c", "a|b:c"]


def test_a_scope_never_meets_a_key_with_a_colon(idem: Idempotency) -> None:
    with idem.claim("refund:7") as call:
        assert not call.replayed
        call.complete("plain")
    with idem.claim("7", scope="refund") as call:  # before: replayed "plain"
        assert not call.replayed
        call.complete("scoped")
    with idem.claim(("refund", "7")) as call:  # two parts, no scope
        assert not call.replayed
        call.complete("parts")
    with idem.claim("7", scope="refund") as call:
        assert call.replayed and call.result == "scoped"


async def test_aclaim_scope_never_meets_a_key_with_a_colon(idem: Idempotency) -> None:
    async with idem.aclaim("refund:7") as call:
        assert not call.replayed
        await call.complete("plain")
    async with idem.aclaim("7", scope="refund") as call:
        assert not call.replayed
        await call.complete("scoped")


def test_claim_many_scope_never_meets_a_key_with_a_colon(idem: Idempotency) -> None:
    with idem.claim("refund:7") as call:
        call.complete("plain")
    (scoped,) = idem.claim_many([("7", None)], scope="refund")
    assert scoped.outcome is ClaimOutcome.CLAIMED
    (plain,) = idem.claim_many([("refund:7", None)])
    assert plain.outcome is ClaimOutcome.COMPLETED


async def test_aclaim_many_scope_never_meets_a_key_with_a_colon(idem: Idempotency) -> None:
    async with idem.aclaim("refund:7") as call:
        await call.complete("plain")
    (scoped,) = await idem.aclaim_many([("7", None)], scope="refund")
    assert scoped.outcome is ClaimOutcome.CLAIMED


def test_keys_stay_readable_in_the_common_case(idem: Idempotency) -> None:
    assert idem.key_for("order-7") == "shop:order-7"
    assert idem.key_for("7", scope="refund") == "shop:refund:7"
    assert idem.key_for(("acme", "7"), scope="charge") == "shop:charge:acme:7"
    assert idem.key_for("refund:7") == "shop:refund\\:7"
    assert idem.key_for(("refund", "7")) == "shop::refund:7"
    assert idem.key_for("a\\b") == "shop:a\\\\b"


def test_decorator_scope_and_key_for_agree(idem: Idempotency, store: MemoryStore) -> None:
    @idem.idempotent(key=["tenant", "order"], scope="charge")
    def charge(tenant: str, order: str) -> int:
        return 1

    charge("acme:eu", "7")
    assert store.get(idem.key_for(("acme:eu", "7"), scope="charge")) is not None
    assert store.get(idem.key_for(("acme", "eu:7"), scope="charge")) is None


def test_long_keys_are_hashed_from_the_encoded_form(idem: Idempotency) -> None:
    a = idem.key_for(("x" * 300 + ":", "y"), scope="s", max_length=255)
    b = idem.key_for(("x" * 300, ":y"), scope="s", max_length=255)
    assert a != b
    assert a.startswith("shop:\\#") and len(a) == len("shop:\\#") + 32
    # A plain key can never look like a hashed one: "\\#" is escaped to "\\\\#".
    assert idem.key_for(a[len("shop:") :], max_length=255) != a


_part = st.text(alphabet=":\\#ab", min_size=1, max_size=6)
_keys = st.tuples(
    st.sampled_from(["", "s", "s:", "s\\", ":s"]),
    st.one_of(_part, st.lists(_part, min_size=1, max_size=3).map(tuple)),
)


@given(_keys, _keys, st.sampled_from([255, 24 + 8]))
def test_distinct_tuples_never_share_a_stored_key(a: Any, b: Any, limit: int) -> None:
    def norm(k: Any) -> Any:
        scope, raw = k
        parts = (raw,) if isinstance(raw, str) else raw
        return scope, parts

    if norm(a) != norm(b):
        assert full_key("ns", a[0], a[1], limit) != full_key("ns", b[0], b[1], limit)


# -- 2. NUL, lone surrogates: refused before anything runs, whatever the store ---------------


@pytest.mark.parametrize(
    "bad", ["a\x00b", "\x00", "a\udc80b", "\ud800", "é\x00", "x" * 300 + "\x00"]
)
@pytest.mark.parametrize("mode", ["fail", "fail_open"])
def test_unstorable_keys_are_refused_before_the_function_runs(
    store: MemoryStore, bad: str, mode: str
) -> None:
    idem = Idempotency(store, namespace="shop", on_store_error=mode)
    runs: list[str] = []

    @idem.idempotent(key="k")
    def work(k: str) -> int:
        runs.append(k)
        return 1

    with pytest.raises(KeyMissing, match=r"NUL|surrogate"):
        work(bad)
    with pytest.raises(KeyMissing, match=r"NUL|surrogate"):
        idem.claim(bad)
    with pytest.raises(KeyMissing, match=r"NUL|surrogate"):
        idem.claim("k", scope=bad)
    with pytest.raises(KeyMissing, match=r"NUL|surrogate"):
        idem.claim_many([("ok", None), (bad, None)])
    with pytest.raises(KeyMissing, match=r"NUL|surrogate"):
        idem.key_for(bad)
    assert runs == []


async def test_unstorable_keys_are_refused_async(idem: Idempotency) -> None:
    runs: list[str] = []

    @idem.idempotent(key="k")
    async def work(k: str) -> int:
        runs.append(k)
        return 1

    for bad in ("a\x00b", "a\udc80b"):
        with pytest.raises(KeyMissing):
            await work(bad)
        with pytest.raises(KeyMissing):
            idem.aclaim(bad)
        with pytest.raises(KeyMissing):
            await idem.aclaim_many([(bad, None)])
    assert runs == []


@pytest.mark.parametrize("mode", ["fail", "fail_open"])
def test_payload_with_a_lone_surrogate_is_refused_clearly(store: MemoryStore, mode: str) -> None:
    idem = Idempotency(store, namespace="shop", on_store_error=mode)
    runs: list[str] = []

    @idem.idempotent(key="k")
    def work(k: str, note: str) -> int:
        runs.append(k)
        return 1

    with pytest.raises(IdempotencyError, match="lone surrogate"):
        work("k", "bad \udc80 bytes")
    with pytest.raises(IdempotencyError, match="lone surrogate"):
        idem.claim("k", payload={"note": "\udc80"})
    with pytest.raises(IdempotencyError, match="lone surrogate"):
        idem.claim("k", payload={"\udc80": 1})
    assert runs == []


def test_payload_with_a_lone_surrogate_is_refused_async(idem: Idempotency) -> None:
    @idem.idempotent(key="k")
    async def work(k: str, note: str) -> int:
        return 1

    with pytest.raises(IdempotencyError, match="lone surrogate"):
        asyncio.run(work("k", "\udc80"))
    with pytest.raises(IdempotencyError, match="lone surrogate"):
        idem.aclaim("k", payload=["\udc80"])


def test_other_characters_are_kept_exactly(idem: Idempotency, store: MemoryStore) -> None:
    # Case, trailing space, normalisation and control characters are part of the key.
    keys = ["order-7", "order-7 ", "Order-7", "\u00e9", "e\u0301", "a\tb", "a\x7fb", "\U0001f511"]
    for k in keys:
        with idem.claim(k) as call:
            assert not call.replayed, k
            call.complete(k)
    for k in keys:
        with idem.claim(k) as call:
            assert call.replayed and call.result == k


def test_consumer_name_and_dedup_id_never_meet(idem: Idempotency) -> None:
    runs: list[str] = []

    def handler(message: dict[str, str]) -> str:
        runs.append(message["id"])
        return message["id"]

    # Before: both stored as "shop:a#b#c".
    first = idem.consumer(handler, dedup_id=lambda m: m["id"], name="a#b")
    second = idem.consumer(handler, dedup_id=lambda m: m["id"], name="a")
    assert first({"id": "c"}) == "c"
    assert second({"id": "b#c"}) == "b#c"
    assert first({"id": "c"}) == "c"
    assert runs == ["c", "b#c"]
    with idem.claim("a#b#c") as call:  # nor a plain key that reads the same
        assert not call.replayed
        call.release()


def test_str_subclasses_count_by_their_text(idem: Idempotency) -> None:
    import enum

    class Region(str, enum.Enum):  # noqa: UP042  (str() of this one is "Region.EU")
        EU = "eu"

    assert idem.key_for(Region.EU) == idem.key_for("eu")
    assert idem.key_for(("acme", Region.EU), scope="s") == idem.key_for(("acme", "eu"), scope="s")


def test_lambda_handler_name_and_event_key_never_meet(idem: Idempotency) -> None:
    runs: list[str] = []

    def handler(event: dict[str, str], context: object) -> str:
        runs.append(event["id"])
        return event["id"]

    # Before: both stored as "shop:a#b#c".
    first = idem.lambda_handler(handler, event_key="id", name="a#b")
    second = idem.lambda_handler(handler, event_key="id", name="a")
    assert first({"id": "c"}, None) == "c"
    assert second({"id": "b#c"}, None) == "b#c"
    assert first({"id": "c"}, None) == "c"
    assert runs == ["c", "b#c"]
