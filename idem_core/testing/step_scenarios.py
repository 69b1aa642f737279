"""Conformance scenarios for steps (:mod:`idem_core.steps`), registered into the suite.

The first ones check the two store methods directly; the last ones run whole calls through
:class:`~idem_core.api.Idempotency` (``claim``/``step`` on a sync store, ``aclaim``/``astep``
on an async one), interleaving a stalled worker and its successor in the middle of a sequence.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from ..api import Idempotency
from ..errors import LeaseLost, ResultNotSerializable
from ..record import ClaimOutcome
from .scenarios import LAPSE, LEASE, TTL, Advance, AsyncView, Scenario, request

#: registered into StoreSuite/AsyncStoreSuite next to the scenarios of ``scenarios.py``
STEP_SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    STEP_SCENARIOS[fn.__name__] = fn
    return fn


async def _refused(coro: Any) -> None:
    try:
        await coro
    except LeaseLost:
        return
    raise AssertionError("a step was recorded without holding the record")


@scenario
async def step_is_recorded_for_the_holder(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    until = claimed.record.expires_at
    await s.record_step(key, claimed.fence, "one", b"\x011", until)
    await s.record_step(key, claimed.fence, "two", b"\x01" + b"x" * 2000, until)
    await s.record_step(key, claimed.fence, "two", b"\x01" + b"x" * 2000, until)  # retried
    steps = await s.load_steps(key)
    assert steps == {"one": (until, b"\x011"), "two": (until, b"\x01" + b"x" * 2000)}, steps
    # The record itself is untouched: still held, completable.
    done = await s.complete(key, claimed.fence, b"ok", TTL)
    assert done.fence == claimed.fence and done.result == b"ok"


@scenario
async def step_is_refused_without_the_fence(s: Any, advance: Advance, key: str) -> None:
    await _refused(s.record_step(key, 123, "one", b"\x01", 2**62))  # no record at all
    claimed = await s.claim(request(key))
    until = claimed.record.expires_at
    await _refused(s.record_step(key, claimed.fence - 1, "one", b"\x01", until))
    await _refused(s.record_step(key, claimed.fence + 1, "one", b"\x01", until))
    assert await s.load_steps(key) == {}
    await s.complete(key, claimed.fence, b"ok", TTL)
    await _refused(s.record_step(key, claimed.fence, "late", b"\x01", until))  # completed
    assert await s.load_steps(key) == {}


@scenario
async def zombie_step_is_refused_after_takeover(s: Any, advance: Advance, key: str) -> None:
    first = await s.claim(request(key))
    await s.record_step(key, first.fence, "one", b"\x01a", first.record.expires_at)
    advance(LAPSE)
    second = await s.claim(request(key))
    assert second.outcome is ClaimOutcome.TOOK_OVER and second.fence > first.fence
    found = await s.load_steps(key)
    assert set(found) == {"one"}
    assert found["one"][0] > second.record.created_at  # the same generation
    await _refused(s.record_step(key, first.fence, "two", b"\x01zombie", 2**62))
    await s.record_step(key, second.fence, "two", b"\x01b", second.record.expires_at)
    found = await s.load_steps(key)
    assert {n: d for n, (_, d) in found.items()} == {"one": b"\x01a", "two": b"\x01b"}


@scenario
async def steps_survive_a_release(s: Any, advance: Advance, key: str) -> None:
    first = await s.claim(request(key))
    await s.record_step(key, first.fence, "one", b"\x01a", first.record.expires_at)
    await s.release(key, first.fence)
    await _refused(s.record_step(key, first.fence, "two", b"\x01", first.record.expires_at))
    again = await s.claim(request(key))
    assert again.outcome.acquired
    found = await s.load_steps(key)
    assert found["one"][1] == b"\x01a" and found["one"][0] > again.record.created_at


@scenario
async def steps_die_with_the_record(s: Any, advance: Advance, key: str) -> None:
    first = await s.claim(request(key))
    await s.record_step(key, first.fence, "one", b"\x01a", first.record.expires_at)
    await s.delete(key)
    fresh = await s.claim(request(key))
    assert fresh.outcome is ClaimOutcome.CLAIMED
    assert await s.load_steps(key) == {}
    # Expiry: whatever a store still keeps of an expired record's steps is older than the
    # next record's birth, so the core never counts it.
    await s.record_step(key, fresh.fence, "one", b"\x01b", fresh.record.expires_at)
    await s.release(key, fresh.fence)
    short = f"{key}-short"
    gone = await s.claim(request(short, lease=LEASE, ttl=LEASE))
    await s.record_step(short, gone.fence, "one", b"\x01c", gone.record.expires_at)
    advance(LAPSE + 0.2)
    reborn = await s.claim(request(short))
    assert reborn.outcome is ClaimOutcome.CLAIMED
    left = await s.load_steps(short)
    assert all(until <= reborn.record.created_at for until, _ in left.values()), left


# -- whole calls ----------------------------------------------------------------------------


class Order(msgspec.Struct, frozen=True):
    id: str
    cents: int


class _Worker:
    """One worker's claim, driven the same way on a sync or an async store."""

    def __init__(self, s: Any, key: str, ns: str | None = None) -> None:
        self.sync = isinstance(s, AsyncView)
        self.ns = ns or "steps" + uuid.uuid4().hex[:6]
        if self.sync:
            self.idem = Idempotency(s._store, namespace=self.ns, lease=LEASE, retries=0)
            self.call: Any = self.idem.claim(key, payload={"k": 1})
        else:
            self.idem = Idempotency(astore=s, namespace=self.ns, lease=LEASE, retries=0)
            self.call = self.idem.aclaim(key, payload={"k": 1})

    def twin(self, s: Any, key: str) -> _Worker:
        """Another worker on the same key."""
        return _Worker(s, key, self.ns)

    async def enter(self) -> Any:
        if self.sync:
            return self.call.__enter__()
        return await self.call.__aenter__()

    async def step(self, name: str, fn: Any, result_type: Any = Any) -> Any:
        if self.sync:
            return self.call.step(name, fn, result_type=result_type)
        return await self.call.astep(name, fn, result_type=result_type)

    async def complete(self, value: Any) -> None:
        if self.sync:
            self.call.complete(value)
        else:
            await self.call.complete(value)

    async def exit(self, exc: BaseException | None = None) -> None:
        if self.sync:
            self.call.__exit__(type(exc) if exc else None, exc, None)
        else:
            await self.call.__aexit__(type(exc) if exc else None, exc, None)


def _counting(ran: list[str], name: str, value: Any) -> Any:
    def fn() -> Any:
        ran.append(name)
        return value

    return fn


@scenario
async def call_steps_run_once_and_replay_typed(s: Any, advance: Advance, key: str) -> None:
    ran: list[str] = []
    w = _Worker(s, key)
    await w.enter()
    order = await w.step("order", _counting(ran, "order", Order("o1", 1250)), Order)
    assert order == Order("o1", 1250)
    assert await w.step("n", _counting(ran, "n", 7), int) == 7
    again = await w.step("order", _counting(ran, "order", Order("other", 0)), Order)
    assert again == Order("o1", 1250) and type(again) is Order  # stored, typed, not re-run
    try:
        await w.step("bad", _counting(ran, "bad", "not an int"), int)
    except ResultNotSerializable:
        pass
    else:
        raise AssertionError("a step result of the wrong type was recorded")
    assert ran == ["order", "n", "bad"]
    key_a = w.call.key_for("charge")
    assert key_a == w.call.key_for("charge") != w.call.key_for("refund")
    await w.complete("done")
    # A duplicate replays the call's result and runs nothing.
    dup = w.twin(s, key)
    await dup.enter()
    assert dup.call.replayed and dup.call.result == "done"
    assert dup.call.key_for("charge") == key_a


@scenario
async def call_resumes_after_a_zombie_mid_sequence(s: Any, advance: Advance, key: str) -> None:
    ran: list[str] = []
    zombie = _Worker(s, key)
    await zombie.enter()
    assert await zombie.step("stock", _counting(ran, "stock", 1), int) == 1
    assert await zombie.step("charge", _counting(ran, "charge", {"id": "ch_1"})) == {"id": "ch_1"}
    advance(LAPSE)  # the zombie stalls past its lease; a successor takes over
    heir = zombie.twin(s, key)
    await heir.enter()
    assert heir.call.outcome is ClaimOutcome.TOOK_OVER
    assert heir.call.key_for("charge") == zombie.call.key_for("charge")
    assert await heir.step("stock", _counting(ran, "stock", 99), int) == 1
    assert await heir.step("charge", _counting(ran, "charge", None)) == {"id": "ch_1"}
    assert await heir.step("write", _counting(ran, "write", "row")) == "row"
    # The zombie wakes up and tries its third step: refused, its value never recorded.
    try:
        await zombie.step("write", _counting(ran, "write", "zombie row"))
    except LeaseLost as exc:
        await zombie.exit(exc)
    else:
        raise AssertionError("a zombie's step was recorded after a takeover")
    assert await heir.step("email", _counting(ran, "email", True), bool) is True
    await heir.complete("order done")
    await heir.exit()
    assert ran == ["stock", "charge", "write", "write", "email"], ran


@scenario
async def call_resumes_after_a_failure(s: Any, advance: Advance, key: str) -> None:
    ran: list[str] = []
    first = _Worker(s, key)
    await first.enter()
    await first.step("stock", _counting(ran, "stock", 1))

    def declined() -> None:
        ran.append("charge")
        raise RuntimeError("card declined")

    try:
        await first.step("charge", declined)
    except RuntimeError as exc:
        await first.exit(exc)  # releases the key; the recorded step stays
    retry = first.twin(s, key)
    await retry.enter()
    assert retry.call.outcome is ClaimOutcome.CLAIMED
    assert await retry.step("stock", _counting(ran, "stock", 2)) == 1
    assert await retry.step("charge", _counting(ran, "charge", "ok")) == "ok"
    await retry.complete("paid")
    assert ran == ["stock", "charge", "charge"], ran
