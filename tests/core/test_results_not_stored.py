"""Never a silent second run (issue 10, point 4): once the function has returned, a duplicate
never runs it again, even when its result cannot be stored. The record is completed with a
small "not stored" error; the first caller gets its value and a ``result_not_stored`` event;
duplicates raise ``ResultNotSerializable`` naming the key and the type, until the record
expires or is deleted."""

from __future__ import annotations

import asyncio
import dataclasses
import decimal
import uuid
from pathlib import Path
from typing import Any

import pytest

from idem_core import (
    Event,
    EventKind,
    Idempotency,
    ManualClock,
    ResultNotSerializable,
    Status,
)
from idem_core.memory import MemoryStore


@dataclasses.dataclass
class Receipt:
    order_id: str
    amount: decimal.Decimal


class Opaque:
    """A result nothing can encode (an open handle, a client...)."""


class Declined(Exception):
    pass


class Capped(MemoryStore):
    """A store with a result size limit, refusing larger results with nothing written, as
    the SQL, Redis and DynamoDB stores do (``max_result_size``)."""

    max_result_size = 1024

    def complete(self, key: str, fence: int, result: bytes, ttl: float, **kw: Any) -> Any:
        if len(result) > self.max_result_size:
            raise ResultNotSerializable(
                f"a result of {len(result)} bytes is over this store's {self.max_result_size}"
            )
        return super().complete(key, fence, result, ttl, **kw)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> Capped:
    return Capped(clock=clock)


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def idem(store: Capped, events: list[Event]) -> Idempotency:
    return Idempotency(store, namespace="shop", on_event=events.append, ttl=600)


def _not_stored(events: list[Event]) -> list[Event]:
    return [e for e in events if e.kind is EventKind.RESULT_NOT_STORED]


# The three ways a result cannot be stored, each from a function that has run once.
CASES = {
    "not serialisable": ("Any", lambda k: Opaque(), "Opaque"),
    "wrong type": ("Receipt", lambda k: None, "NoneType"),
    "too large for the store": ("str", lambda k: "x" * 5000, "refused"),
}


def _decorate(idem: Idempotency, case: str, runs: list[str], is_async: bool = False) -> Any:
    annotation, make, _ = CASES[case]

    if is_async:

        async def afn(k: str) -> Any:
            runs.append(k)
            return make(k)

        fn: Any = afn
    else:

        def sfn(k: str) -> Any:
            runs.append(k)
            return make(k)

        fn = sfn
    fn.__annotations__["return"] = {"Any": Any, "Receipt": Receipt, "str": str}[annotation]
    return idem.idempotent(key="k", scope=f"charge-{uuid.uuid4().hex[:8]}")(fn)


@pytest.mark.parametrize("case", list(CASES))
def test_a_result_that_cannot_be_stored_never_runs_twice(
    idem: Idempotency, store: Capped, events: list[Event], case: str
) -> None:
    runs: list[str] = []
    charge = _decorate(idem, case, runs)
    named = CASES[case][2]

    first = charge("card-1")  # the caller that ran it keeps its value
    assert first is not None or case == "wrong type"
    (event,) = _not_stored(events)
    assert isinstance(event.error, ResultNotSerializable) and named in str(event.error)
    for _ in range(3):
        with pytest.raises(ResultNotSerializable) as info:
            charge("card-1")
        assert named in str(info.value) and "card-1" in str(info.value)
    assert runs == ["card-1"]  # today: run again by every retry
    (rec,) = store._records.values()
    assert rec.status is Status.COMPLETED and rec.result is not None
    assert len(rec.result) < 1024  # the "not stored" record is small


@pytest.mark.parametrize("case", list(CASES))
async def test_async_a_result_that_cannot_be_stored_never_runs_twice(
    idem: Idempotency, events: list[Event], case: str
) -> None:
    runs: list[str] = []
    charge = _decorate(idem, case, runs, is_async=True)
    await charge("card-1")
    assert len(_not_stored(events)) == 1
    for _ in range(2):
        with pytest.raises(ResultNotSerializable, match="card-1"):
            await charge("card-1")
    assert runs == ["card-1"]


def test_forgetting_the_record_on_purpose_or_its_expiry_lets_it_run_again(
    idem: Idempotency, store: Capped, clock: ManualClock
) -> None:
    runs: list[str] = []
    charge = _decorate(idem, "not serialisable", runs)
    charge("a")
    with pytest.raises(ResultNotSerializable):
        charge("a")
    (key,) = store._records
    store.delete(key)
    charge("a")
    assert runs == ["a", "a"]
    clock.advance(601)  # the ttl
    charge("a")
    assert runs == ["a", "a", "a"]


def test_the_local_cache_replays_the_error_too(store: Capped) -> None:
    idem = Idempotency(store, local_cache=16)
    runs: list[str] = []
    charge = _decorate(idem, "wrong type", runs)
    charge("a")
    for _ in range(2):
        with pytest.raises(ResultNotSerializable):
            charge("a")
    assert runs == ["a"]


def test_complete_in_a_claim_records_a_result_that_cannot_be_stored(
    idem: Idempotency, events: list[Event]
) -> None:
    with idem.claim("o-1", payload=1) as call:
        call.complete(Opaque())  # no error: the work is done and must not be redone
    assert len(_not_stored(events)) == 1
    with idem.claim("o-1", payload=1) as call:
        assert call.replayed
        with pytest.raises(ResultNotSerializable, match="Opaque"):
            call.result  # noqa: B018


async def test_complete_in_an_async_claim_records_a_result_that_cannot_be_stored(
    idem: Idempotency, events: list[Event]
) -> None:
    async with idem.aclaim("o-1", payload=1, result_type=Receipt) as call:
        await call.complete("not a receipt")
    assert len(_not_stored(events)) == 1
    async with idem.aclaim("o-1", payload=1, result_type=Receipt) as call:
        assert call.replayed
        with pytest.raises(ResultNotSerializable, match="Receipt"):
            call.result  # noqa: B018


def test_claim_many_hands_duplicates_the_error(idem: Idempotency) -> None:
    with idem.claim("o-1", payload=1) as call:
        call.complete(Opaque())
    (call,) = idem.claim_many([("o-1", 1)])
    assert call.replayed
    with pytest.raises(ResultNotSerializable):
        call.result  # noqa: B018


def test_a_store_that_refuses_even_the_small_record_frees_the_key(
    clock: ManualClock, events: list[Event]
) -> None:
    class Tiny(Capped):
        max_result_size = 16

    idem = Idempotency(Tiny(clock=clock), on_event=events.append)
    runs: list[str] = []
    charge = _decorate(idem, "too large for the store", runs)
    with pytest.raises(ResultNotSerializable, match="5004 bytes"):
        charge("a")  # nothing could be written: the caller must know, and may retry
    assert not _not_stored(events)
    with pytest.raises(ResultNotSerializable):
        charge("a")
    assert runs == ["a", "a"]


# -- a real store: the record replays from SQLite, in another Idempotency object ------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    pytest.importorskip("idem_sql")
    url = f"sqlite:///{tmp_path / 'results.db'}?table=idem_ns_{uuid.uuid4().hex[:8]}"
    setup = Idempotency(url=url)
    setup.store.setup()  # type: ignore[attr-defined]
    setup.close()
    return url


@pytest.mark.parametrize("case", ["not serialisable", "wrong type"])
def test_sqlite_replays_the_not_stored_record(sqlite_url: str, case: str) -> None:
    first_process = Idempotency(url=sqlite_url)
    runs: list[str] = []
    annotation, make, named = CASES[case]

    def charge(k: str) -> Any:
        runs.append(k)
        return make(k)

    charge.__annotations__["return"] = {"Any": Any, "Receipt": Receipt}[annotation]
    first = first_process.idempotent(key="k", scope="charge")(charge)
    first("card-1")
    first_process.close()

    second_process = Idempotency(url=sqlite_url)
    again = second_process.idempotent(key="k", scope="charge")(charge)
    with pytest.raises(ResultNotSerializable, match=named) as info:
        again("card-1")
    assert "card-1" in str(info.value)
    assert runs == ["card-1"]
    second_process.close()


async def test_sqlite_async_replays_the_not_stored_record(sqlite_url: str) -> None:
    idem = Idempotency(url=sqlite_url)
    runs: list[str] = []

    @idem.idempotent(key="k", scope="acharge")
    async def charge(k: str) -> Receipt:
        runs.append(k)
        return Receipt(k, decimal.Decimal("1.5")) if len(runs) > 1 else None  # type: ignore[return-value]

    assert await charge("card-1") is None
    with pytest.raises(ResultNotSerializable, match="Receipt"):
        await charge("card-1")
    assert runs == ["card-1"]
    await idem.aclose()


def test_sqlite_replays_a_cached_error(sqlite_url: str) -> None:
    idem = Idempotency(url=sqlite_url)
    runs: list[str] = []

    @idem.idempotent(key="k", cache_errors=(Declined,))
    def charge(k: str) -> str:
        runs.append(k)
        raise Declined("insufficient funds", 402)

    for _ in range(2):
        with pytest.raises(Declined) as info:
            charge("card-1")
        assert info.value.args == ("insufficient funds", 402)
    assert runs == ["card-1"]
    idem.close()


def test_sqlite_sync_and_async_agree(sqlite_url: str) -> None:
    idem = Idempotency(url=sqlite_url)
    with idem.claim("o-1", payload=1) as call:
        call.complete(Opaque())

    async def replay() -> None:
        async with idem.aclaim("o-1", payload=1) as acall:
            assert acall.replayed
            with pytest.raises(ResultNotSerializable, match="Opaque"):
                acall.result  # noqa: B018
        await idem.aclose()

    asyncio.run(replay())
