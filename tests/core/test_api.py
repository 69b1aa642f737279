"""The public API on memory://: decorator, context managers, replay types, errors, events."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import multiprocessing
import threading
import uuid
from typing import Any, TypedDict

import msgspec
import pytest

from idem_core import (
    AlreadyInProgress,
    ConfigurationError,
    CorruptRecord,
    Event,
    EventKind,
    Idempotency,
    KeyMissing,
    LeaseLost,
    ManualClock,
    PayloadMismatch,
    ResultNotSerializable,
    Status,
    StoreUnavailable,
)
from idem_core.memory import MemoryStore
from idem_core.testing import FaultyStore


@dataclasses.dataclass
class Receipt:
    order_id: str
    amount: decimal.Decimal
    at: datetime.datetime
    ref: uuid.UUID


class Point(msgspec.Struct):
    x: int
    y: int


class Summary(TypedDict):
    total: int
    names: list[str]


class Declined(Exception):
    pass


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def idem(store: MemoryStore) -> Idempotency:
    return Idempotency(store, namespace="shop")


def test_first_call_runs_and_duplicates_replay_the_declared_type(idem: Idempotency) -> None:
    runs: list[str] = []
    ref = uuid.uuid4()

    @idem.idempotent(key="order_id", ttl=3600, lease=30)
    def charge(order_id: str, amount: int) -> Receipt:
        runs.append(order_id)
        return Receipt(order_id, decimal.Decimal(amount) / 100, datetime.datetime(2026, 1, 2), ref)

    first = charge("o-1", 1050)
    again = charge("o-1", 1050)
    by_keyword = charge(order_id="o-1", amount=1050)
    assert runs == ["o-1"]
    assert again == first == by_keyword
    assert type(again) is Receipt
    assert again.amount == decimal.Decimal("10.5") and again.ref == ref


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (Point, Point(1, 2)),
        (Summary, {"total": 3, "names": ["a", "b"]}),
        (datetime.date, datetime.date(2026, 11, 27)),
        (list[uuid.UUID], [uuid.UUID(int=7)]),
        (tuple[int, str], (1, "a")),
        (None, None),
    ],
)
def test_replay_decodes_many_types(idem: Idempotency, annotation: Any, value: Any) -> None:
    def make(k: str) -> Any:
        return value

    make.__annotations__["return"] = annotation
    fn = idem.idempotent(key="k")(make)
    assert fn("a") == value
    replay = fn("a")
    assert replay == value
    assert type(replay) is type(value)


def test_payload_mismatch(idem: Idempotency) -> None:
    @idem.idempotent(key="order_id")
    def charge(order_id: str, amount: int) -> int:
        return amount

    charge("o", 1)
    with pytest.raises(PayloadMismatch):
        charge("o", 2)


def test_payload_fields_select_the_fingerprint(idem: Idempotency) -> None:
    @idem.idempotent(key="order_id", payload=["amount"])
    def charge(order_id: str, amount: int, trace: str) -> int:
        return amount

    assert charge("o", 1, "t1") == 1
    assert charge("o", 1, "t2") == 1  # trace is not part of the payload
    with pytest.raises(PayloadMismatch):
        charge("o", 2, "t1")


def test_key_from_callable_and_several_names(idem: Idempotency) -> None:
    @idem.idempotent(key=lambda event: event["id"])
    def handle(event: dict[str, Any]) -> str:
        return str(event["id"])

    assert handle({"id": "e1"}) == "e1"

    @idem.idempotent(key=("tenant", "order"))
    def place(tenant: str, order: str) -> str:
        return f"{tenant}/{order}"

    assert place("t", "o") == "t/o"
    assert idem.store.get(f"shop:{place.__module__}.{place.__qualname__}:t:o") is not None


@pytest.mark.parametrize("bad", ["", 42, None])
def test_bad_keys_raise_key_missing(idem: Idempotency, bad: Any) -> None:
    @idem.idempotent(key="k")
    def fn(k: Any) -> int:
        return 1

    with pytest.raises(KeyMissing):
        fn(bad)


def test_unknown_key_argument_is_a_configuration_error(idem: Idempotency) -> None:
    with pytest.raises(ConfigurationError, match="no argument named nope"):

        @idem.idempotent(key="nope")
        def fn(k: str) -> int:
            return 1


def test_long_keys_are_hashed_deterministically() -> None:
    small = MemoryStore()
    small.max_key_length = 64  # type: ignore[misc]
    idem = Idempotency(small, namespace="ns")
    long_key = "x" * 500
    k1 = idem.key_for(long_key)
    assert k1 == idem.key_for(long_key)
    assert len(k1) <= 64 and k1 != idem.key_for("y" * 500)

    @idem.idempotent(key="k")
    def fn(k: str) -> int:
        return len(k)

    assert fn(long_key) == 500
    assert fn(long_key) == 500


def test_in_progress_raises(idem: Idempotency) -> None:
    inner: list[BaseException] = []

    @idem.idempotent(key="k")
    def slow(k: str) -> str:
        try:
            slow(k)
        except AlreadyInProgress as exc:
            inner.append(exc)
        return "done"

    assert slow("a") == "done"
    assert isinstance(inner[0], AlreadyInProgress)


def test_exception_releases_the_claim(idem: Idempotency) -> None:
    attempts: list[int] = []

    @idem.idempotent(key="k")
    def flaky(k: str) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("boom")
        return "ok"

    with pytest.raises(RuntimeError):
        flaky("a")
    assert flaky("a") == "ok"
    assert len(attempts) == 2


def test_cached_errors_replay_as_the_same_type(idem: Idempotency) -> None:
    runs: list[int] = []

    @idem.idempotent(key="k", cache_errors=(Declined,))
    def pay(k: str) -> str:
        runs.append(1)
        raise Declined("card declined", 402)

    with pytest.raises(Declined):
        pay("a")
    with pytest.raises(Declined) as info:
        pay("a")
    assert info.value.args == ("card declined", 402)
    assert len(runs) == 1


def test_unserialisable_result_is_returned_once_and_never_run_again(idem: Idempotency) -> None:
    runs: list[int] = []
    marker = object()

    @idem.idempotent(key="k")
    def fn(k: str) -> Any:
        runs.append(1)
        return marker

    assert fn("a") is marker  # the caller that ran it gets its value
    with pytest.raises(ResultNotSerializable, match=r"type object"):
        fn("a")  # a duplicate is told, it never runs the function again
    assert len(runs) == 1


def test_corrupt_result_raises_corrupt_record(idem: Idempotency, store: MemoryStore) -> None:
    @idem.idempotent(key="k")
    def fn(k: str) -> int:
        return 1

    fn("a")
    key = next(iter(store._records))
    rec = store._records[key]
    store._records[key] = msgspec.structs.replace(rec, result=b"\x01\xc1garbage")
    with pytest.raises(CorruptRecord):
        fn("a")
    assert store.get(key) is not None  # left untouched


def test_lease_lost_is_reported_instead_of_completing(
    idem: Idempotency, clock: ManualClock
) -> None:
    @idem.idempotent(key="k", lease=5)
    def stalls(k: str, who: str) -> str:
        if who == "zombie":
            clock.advance(6)  # a pause past the lease: a duplicate takes over meanwhile
            assert stalls(k, "successor") == "successor"
        return who

    with pytest.raises(LeaseLost):
        stalls("a", "zombie")


def test_renewal_keeps_the_lease_and_reports_loss(idem: Idempotency, store: MemoryStore) -> None:
    renewed = threading.Event()

    class Watch(MemoryStore):
        pass

    real_renew = store.renew

    def renew(key: str, fence: int, lease: float) -> Any:
        out = real_renew(key, fence, lease)
        renewed.set()
        return out

    store.renew = renew  # type: ignore[method-assign]

    @idem.idempotent(key="k", lease=1, renew_every=0.05)
    def work(k: str) -> str:
        assert renewed.wait(5)
        return "ok"

    assert work("a") == "ok"


def test_wait_replays_when_the_first_completes(idem: Idempotency) -> None:
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    @idem.idempotent(key="k", on_in_progress="wait", wait_timeout=5)
    def work(k: str) -> int:
        runs.append(1)
        started.set()
        assert release.wait(5)
        return 7

    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(work("a")))
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=lambda: results.append(work("a")))
    second.start()
    release.set()
    first.join()
    second.join()
    assert results == [7, 7] and runs == [1]


def test_wait_runs_when_the_first_fails_and_times_out_otherwise(idem: Idempotency) -> None:
    started, go = threading.Event(), threading.Event()
    runs: list[str] = []

    @idem.idempotent(key="k", payload=["k"], on_in_progress="wait", wait_timeout=5)
    def work(k: str, who: str) -> str:
        runs.append(who)
        if who == "first":
            started.set()
            assert go.wait(5)
            raise RuntimeError("first failed")
        return who

    errors: list[BaseException] = []

    def first() -> None:
        try:
            work("a", "first")
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(5)
    out: list[str] = []
    t2 = threading.Thread(target=lambda: out.append(work("a", "second")))
    t2.start()
    go.set()
    t.join()
    t2.join()
    assert len(errors) == 1 and out == ["second"] and runs == ["first", "second"]

    @idem.idempotent(key="k", on_in_progress="wait", wait_timeout=0.2)
    def blocked(k: str) -> str:
        with pytest.raises(AlreadyInProgress):
            blocked(k)
        return "outer"

    assert blocked("b") == "outer"


def test_local_cache_replays_without_a_round_trip() -> None:
    faulty = FaultyStore(MemoryStore())  # the local cache judges expiry by the real clock
    idem = Idempotency(faulty, local_cache=16)  # type: ignore[arg-type]

    @idem.idempotent(key="k")
    def fn(k: str) -> str:
        return k.upper()

    assert fn("a") == "A"
    faulty.fail_next("claim", "before")  # would fail if the store were asked
    assert fn("a") == "A"
    assert faulty.plan == {"claim": "before"}


def test_store_errors_raise_store_unavailable_or_fail_open(store: MemoryStore) -> None:
    faulty = FaultyStore(store)
    events: list[Event] = []
    strict = Idempotency(faulty, retries=0)  # type: ignore[arg-type]

    @strict.idempotent(key="k")
    def fn(k: str) -> str:
        return k

    faulty.fail_next("claim", "before")
    with pytest.raises(StoreUnavailable) as info:
        fn("a")
    assert isinstance(info.value.__cause__, ConnectionError)

    lenient = Idempotency(faulty, on_store_error="fail_open", on_event=events.append, retries=0)  # type: ignore[arg-type]

    @lenient.idempotent(key="k")
    def gn(k: str) -> str:
        return k * 2

    faulty.fail_next("claim", "before")
    assert gn("b") == "bb"
    assert [e.kind for e in events] == [EventKind.STORE_ERROR, EventKind.FAIL_OPEN]


def test_a_lost_reply_is_retried_with_the_same_attempt(store: MemoryStore) -> None:
    faulty = FaultyStore(store)
    idem = Idempotency(faulty, retries=1)  # type: ignore[arg-type]
    runs: list[int] = []

    @idem.idempotent(key="k")
    def fn(k: str) -> int:
        runs.append(1)
        return 5

    faulty.fail_next("claim", "after")
    faulty.fail_next("complete", "after")
    assert fn("a") == 5
    assert fn("a") == 5
    assert runs == [1]


def test_events_for_every_decision(idem: Idempotency, clock: ManualClock) -> None:
    events: list[EventKind] = []
    idem.on_event(lambda e: events.append(e.kind))

    @idem.idempotent(key="k")
    def fn(k: str, n: int) -> int:
        return n

    fn("a", 1)
    fn("a", 1)
    with pytest.raises(PayloadMismatch):
        fn("a", 2)
    assert events == [
        EventKind.CLAIMED,
        EventKind.COMPLETED,
        EventKind.REPLAYED,
        EventKind.MISMATCH,
    ]


def test_claim_context_manager(idem: Idempotency) -> None:
    with idem.claim("order-42", payload={"amount": 10}, result_type=Point) as call:
        assert not call.replayed and call.fence is not None
        call.complete(Point(3, 4))
    with idem.claim("order-42", payload={"amount": 10}, result_type=Point) as call:
        assert call.replayed
        assert call.result == Point(3, 4)
    with pytest.raises(PayloadMismatch), idem.claim("order-42", payload={"amount": 11}):
        pass


def test_claim_context_manager_releases_on_error_and_on_forgotten_complete(
    idem: Idempotency,
) -> None:
    with pytest.raises(ValueError), idem.claim("k1"):
        raise ValueError("x")
    with idem.claim("k1") as call:
        assert not call.replayed
    rec = idem.store.get(idem.key_for("k1"))
    assert rec is not None and rec.released
    with idem.claim("k1") as call:
        assert not call.replayed
        call.complete(1)
    rec = idem.store.get(idem.key_for("k1"))
    assert rec is not None and rec.status is Status.COMPLETED


async def test_async_decorator_and_context_manager() -> None:
    idem = Idempotency.from_url("memory://", namespace="a")
    runs: list[str] = []

    @idem.idempotent(key=lambda event: event["id"], on_in_progress="wait", wait_timeout=5)
    async def handle(event: dict[str, str]) -> dict[str, str]:
        runs.append(event["id"])
        await asyncio.sleep(0.05)
        return {"ok": event["id"]}

    out = await asyncio.gather(*(handle({"id": "e1"}) for _ in range(8)))
    assert out == [{"ok": "e1"}] * 8 and runs == ["e1"]

    async with idem.aclaim("x", payload=1, result_type=int) as call:
        assert not call.replayed
        await call.complete(41)
    async with idem.aclaim("x", payload=1, result_type=int) as call:
        assert call.replayed and call.result == 41
    # the sync side of the same object sees the same records
    with idem.claim("x", payload=1, result_type=int) as call:
        assert call.replayed and call.result == 41
    await idem.aclose()


async def test_async_cached_errors_and_lease_lost() -> None:
    clock = ManualClock()
    idem = Idempotency(MemoryStore(clock=clock))

    @idem.idempotent(key="k", cache_errors=(Declined,))
    async def pay(k: str) -> int:
        raise Declined("no")

    for _ in range(2):
        with pytest.raises(Declined):
            await pay("a")

    @idem.idempotent(key="k", lease=5)
    async def stalls(k: str, who: str) -> str:
        if who == "zombie":
            clock.advance(6)
            assert await stalls(k, "successor") == "successor"
        return who

    with pytest.raises(LeaseLost):
        await stalls("b", "zombie")


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEM_URL", "memory://")
    assert isinstance(Idempotency.from_env().store, MemoryStore)
    monkeypatch.delenv("IDEM_URL")
    with pytest.raises(ConfigurationError, match="IDEM_URL"):
        Idempotency.from_env()


def test_unknown_scheme_and_missing_extra() -> None:
    with pytest.raises(ConfigurationError, match="unknown store URL scheme 'nope'"):
        Idempotency.from_url("nope://x")
    from idem_core.registry import import_driver

    with pytest.raises(ConfigurationError, match=r"idem-core\[redis\]"):
        import_driver("surely_not_installed_driver", "redis")


def _child_store_id(idem: Idempotency, q: Any) -> None:
    q.put(id(idem.store))


def test_a_forked_child_opens_its_own_store() -> None:
    idem = Idempotency.from_url("memory://")
    parent = idem.store
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_store_id, args=(idem, q))
    p.start()
    p.join(10)
    assert q.get(timeout=5) != id(parent)
    assert idem.store is parent


def test_claim_many_reports_each_outcome(idem: Idempotency) -> None:
    with idem.claim("b", payload=1) as call:
        call.complete("done-b")
    with idem.claim("c", payload=1) as held:
        calls = idem.claim_many([("a", 1), ("b", 1), ("c", 1), ("b", 2)])
        held.complete("done-c")
    assert [c.outcome.value for c in calls if c.outcome] == [
        "claimed",
        "completed",
        "in_progress",
        "mismatch",
    ]
    assert calls[1].result == "done-b"
    calls[0].complete("done-a")
    with idem.claim("a", payload=1) as again:
        assert again.replayed and again.result == "done-a"


async def test_aclaim_many_and_instrument() -> None:
    seen: list[Any] = []

    def instrument(store: Any) -> Any:
        seen.append(store)
        return store

    idem = Idempotency.from_url("memory://", instrument=instrument)
    calls = await idem.aclaim_many([("x", None), ("y", None)])
    assert [c.outcome.value for c in calls if c.outcome] == ["claimed", "claimed"]
    for c in calls:
        await c.complete(1)
    assert len(seen) == 2  # the sync store (shared records) and its async twin


def test_scopes_separate_keys_and_hooks_can_be_removed(idem: Idempotency) -> None:
    seen: list[EventKind] = []
    hook = idem.on_event(lambda e: seen.append(e.kind))
    with idem.claim("k", payload=1, scope="refunds") as call:
        call.complete("refund")
    with idem.claim("k", payload=2, scope="charges") as call:
        assert not call.replayed  # another scope: no mismatch with the refund
        call.complete("charge")
    assert idem.store.get(idem.key_for("k", "refunds")) is not None
    idem.remove_event_hook(hook)
    with idem.claim("k", payload=1, scope="refunds") as call:
        assert call.replayed and call.result == "refund"
    assert seen.count(EventKind.REPLAYED) == 0


def test_log_records_carry_structured_fields(
    idem: Idempotency, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="idem_core")
    with idem.claim("k", payload=1) as call:
        call.complete(1)
    claimed = [r for r in caplog.records if getattr(r, "idem_event", None) == "claimed"]
    assert claimed
    rec = claimed[0]
    assert rec.idem_namespace == "shop"  # type: ignore[attr-defined]
    assert rec.idem_key == idem.key_for("k")  # type: ignore[attr-defined]
    assert rec.idem_error is None  # type: ignore[attr-defined]


def test_a_result_the_store_refuses_is_recorded_as_not_stored(clock: ManualClock) -> None:
    class Small(MemoryStore):
        def complete(self, key: str, fence: int, result: bytes, ttl: float, **kw: Any) -> Any:
            if len(result) > 1000:
                raise ResultNotSerializable("too large for this store")
            return super().complete(key, fence, result, ttl, **kw)

    idem = Idempotency(Small(clock=clock))

    @idem.idempotent(key="k")
    def fn(k: str, size: int) -> str:
        return "x" * size

    assert fn("a", 2000) == "x" * 2000
    rec = idem.store.get(idem.key_for("a", f"{fn.__module__}.{fn.__qualname__}"))
    assert rec is not None and rec.status is Status.COMPLETED
    with pytest.raises(ResultNotSerializable, match="refused"):
        fn("a", 2000)
