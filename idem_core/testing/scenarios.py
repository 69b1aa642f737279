"""The conformance scenarios, written once as coroutines over an asyncio-shaped store.

A sync store runs them through :class:`AsyncView`; an async store runs them as it is.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import LeaseLost, StoreUnavailable
from ..record import RELEASED, ClaimOutcome, ClaimRequest, Status

Advance = Callable[[float], None]
Scenario = Callable[[Any, Advance, str], Coroutine[Any, Any, None]]

LEASE = 0.4  # seconds: short, so server-clock stores can afford to sleep past it
LAPSE = 0.6  # an advance that outlives LEASE
TTL = 60.0
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def request(
    key: str,
    fingerprint: str = "f" * 32,
    attempt: str | None = None,
    lease: float = LEASE,
    ttl: float = TTL,
) -> ClaimRequest:
    return ClaimRequest(
        key=key,
        fingerprint=fingerprint,
        attempt=attempt or uuid.uuid4().hex,
        lease=lease,
        ttl=ttl,
    )


OTHER = "e" * 32


class AsyncView:
    """A sync store seen through coroutines, so one scenario serves both twins."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return attr(*args, **kwargs)

        return call


@scenario
async def claim_creates_in_progress_record(s: Any, advance: Advance, key: str) -> None:
    res = await s.claim(request(key))
    assert res.outcome is ClaimOutcome.CLAIMED
    rec = res.record
    assert rec.key == key and rec.status is Status.IN_PROGRESS
    assert rec.fingerprint == "f" * 32 and rec.result is None
    assert 0 < rec.fence < 2**63
    assert rec.lease_expires_at > rec.created_at
    assert rec.expires_at >= rec.lease_expires_at
    got = await s.get(key)
    assert got is not None and got.fence == rec.fence and got.status is Status.IN_PROGRESS


@scenario
async def duplicate_sees_in_progress(s: Any, advance: Advance, key: str) -> None:
    first = await s.claim(request(key))
    dup = await s.claim(request(key))
    assert dup.outcome is ClaimOutcome.IN_PROGRESS
    assert dup.record.fence == first.record.fence


@scenario
async def retried_claim_returns_same_fence(s: Any, advance: Advance, key: str) -> None:
    req = request(key)
    first = await s.claim(req)
    again = await s.claim(req)
    assert again.outcome is ClaimOutcome.CLAIMED
    assert again.record.fence == first.record.fence


@scenario
async def complete_then_replay(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    payload = bytes(range(256)) * 3
    done = await s.complete(key, claimed.fence, payload, TTL)
    assert done.status is Status.COMPLETED and done.result == payload
    assert done.fence == claimed.fence
    replay = await s.claim(request(key))
    assert replay.outcome is ClaimOutcome.COMPLETED
    assert replay.record.result == payload and replay.record.fence == claimed.fence
    got = await s.get(key)
    assert got is not None and got.status is Status.COMPLETED and got.result == payload


@scenario
async def empty_result_round_trips(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    await s.complete(key, claimed.fence, b"", TTL)
    replay = await s.claim(request(key))
    assert replay.outcome is ClaimOutcome.COMPLETED and replay.record.result == b""


@scenario
async def mismatch_on_live_records(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    assert (await s.claim(request(key, OTHER))).outcome is ClaimOutcome.MISMATCH
    await s.complete(key, claimed.fence, b"r", TTL)
    res = await s.claim(request(key, OTHER))
    assert res.outcome is ClaimOutcome.MISMATCH and res.record.result == b"r"


@scenario
async def takeover_after_lease_lapses(s: Any, advance: Advance, key: str) -> None:
    first = await s.claim(request(key))
    advance(LAPSE)
    second = await s.claim(request(key))
    assert second.outcome is ClaimOutcome.TOOK_OVER
    assert second.record.fence > first.record.fence


@scenario
async def zombie_cannot_complete_release_or_renew(s: Any, advance: Advance, key: str) -> None:
    zombie = await s.claim(request(key))
    advance(LAPSE)
    successor = await s.claim(request(key, lease=30))
    assert successor.outcome is ClaimOutcome.TOOK_OVER
    for op in (
        s.complete(key, zombie.fence, b"zombie", TTL),
        s.release(key, zombie.fence),
        s.renew(key, zombie.fence, 30),
    ):
        try:
            await op
        except LeaseLost as exc:
            assert exc.fence == zombie.fence
        else:
            raise AssertionError("a stale fence was accepted")
    rec = await s.get(key)
    assert rec is not None and rec.fence == successor.fence and rec.status is Status.IN_PROGRESS
    done = await s.complete(key, successor.fence, b"successor", TTL)
    assert done.result == b"successor"
    try:
        await s.complete(key, zombie.fence, b"zombie", TTL)
    except LeaseLost:
        pass
    else:
        raise AssertionError("a zombie overwrote a completed record")
    final = await s.get(key)
    assert final is not None and final.result == b"successor"


@scenario
async def release_lets_the_next_claim_in(s: Any, advance: Advance, key: str) -> None:
    first = await s.claim(request(key, lease=30))
    await s.release(key, first.fence)
    rec = await s.get(key)
    assert rec is not None and rec.lease_expires_at == RELEASED
    await s.release(key, first.fence)  # a retried release succeeds
    nxt = await s.claim(request(key, OTHER))
    assert nxt.outcome is ClaimOutcome.CLAIMED
    assert nxt.record.fence > first.fence and nxt.record.fingerprint == OTHER
    try:
        await s.complete(key, first.fence, b"late", TTL)
    except LeaseLost:
        pass
    else:
        raise AssertionError("a released holder completed")


@scenario
async def complete_is_retry_safe_and_final(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    await s.complete(key, claimed.fence, b"one", TTL)
    again = await s.complete(key, claimed.fence, b"one", TTL)
    assert again.status is Status.COMPLETED and again.result == b"one"
    for op in (s.release(key, claimed.fence), s.renew(key, claimed.fence, 30)):
        try:
            await op
        except LeaseLost:
            pass
        else:
            raise AssertionError("a completed record was released or renewed")
    rec = await s.get(key)
    assert rec is not None and rec.status is Status.COMPLETED


@scenario
async def complete_after_release_is_refused(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    await s.release(key, claimed.fence)
    try:
        await s.complete(key, claimed.fence, b"x", TTL)
    except LeaseLost:
        pass
    else:
        raise AssertionError("completed after release")


@scenario
async def renew_keeps_the_lease(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    renewed = await s.renew(key, claimed.fence, 30)
    assert renewed.fence == claimed.fence
    assert renewed.lease_expires_at > claimed.record.lease_expires_at
    advance(LAPSE)
    dup = await s.claim(request(key))
    assert dup.outcome is ClaimOutcome.IN_PROGRESS
    await s.complete(key, claimed.fence, b"ok", TTL)


@scenario
async def lapsed_but_untaken_lease_may_complete(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    advance(LAPSE)
    done = await s.complete(key, claimed.fence, b"late but first", TTL)
    assert done.status is Status.COMPLETED


@scenario
async def completed_record_expires(s: Any, advance: Advance, key: str) -> None:
    claimed = await s.claim(request(key))
    await s.complete(key, claimed.fence, b"old", 0.5)
    advance(1.2)
    assert await s.get(key) is None
    fresh = await s.claim(request(key, OTHER))
    assert fresh.outcome is ClaimOutcome.CLAIMED
    assert fresh.record.fence > claimed.fence


@scenario
async def fence_grows_across_deletion(s: Any, advance: Advance, key: str) -> None:
    first = await s.claim(request(key))
    await s.delete(key)
    assert await s.get(key) is None
    advance(0.01)
    second = await s.claim(request(key))
    assert second.outcome is ClaimOutcome.CLAIMED
    assert second.record.fence > first.record.fence


@scenario
async def fence_grows_across_deletion_at_once(s: Any, advance: Advance, key: str) -> None:
    # No pause: a clock that ticks coarser than a delete and a claim take (SQLite's
    # julianday('now') ticks in milliseconds) must not hand a stale holder its fence again.
    fences: list[int] = []
    for i in range(40):
        if i % 2:
            got = (await s.claim_many([request(key)]))[0]
        else:
            got = await s.claim(request(key))
        assert got.outcome is ClaimOutcome.CLAIMED
        fences.append(got.record.fence)
        await s.delete(key)
    assert all(a < b for a, b in itertools.pairwise(fences)), fences


@scenario
async def delete_and_get_missing(s: Any, advance: Advance, key: str) -> None:
    assert await s.get(key) is None
    await s.delete(key)  # deleting nothing is fine
    await s.claim(request(key))
    await s.delete(key)
    assert await s.get(key) is None


@scenario
async def release_of_missing_record_succeeds(s: Any, advance: Advance, key: str) -> None:
    await s.release(key, 12345)
    for op in (s.complete(key, 12345, b"x", TTL), s.renew(key, 12345, 1)):
        try:
            await op
        except LeaseLost:
            pass
        else:
            raise AssertionError("a missing record was completed or renewed")
    assert await s.get(key) is None


@scenario
async def claim_many_mixed_outcomes(s: Any, advance: Advance, key: str) -> None:
    keys = [f"{key}-{i}" for i in range(5)]
    done = await s.claim(request(keys[1]))
    await s.complete(keys[1], done.fence, b"done", TTL)
    await s.claim(request(keys[2]))
    await s.claim(request(keys[3]))
    reqs = [request(keys[0]), request(keys[1]), request(keys[2]), request(keys[3], OTHER)]
    reqs.append(request(keys[4]))
    out = await s.claim_many(reqs)
    assert [r.outcome for r in out] == [
        ClaimOutcome.CLAIMED,
        ClaimOutcome.COMPLETED,
        ClaimOutcome.IN_PROGRESS,
        ClaimOutcome.MISMATCH,
        ClaimOutcome.CLAIMED,
    ]
    assert out[1].record.result == b"done"
    assert [r.record.key for r in out] == keys
    assert await s.claim_many([]) == []


@scenario
async def long_key_up_to_the_limit(s: Any, advance: Advance, key: str) -> None:
    long_key = (key + ":" + "k" * 1000)[: min(s.max_key_length, 250)]
    res = await s.claim(request(long_key))
    assert res.outcome is ClaimOutcome.CLAIMED
    assert (await s.get(long_key)) is not None
    await s.complete(long_key, res.fence, b"x", TTL)
    await s.delete(long_key)


@scenario
async def unicode_key(s: Any, advance: Advance, key: str) -> None:
    k = key + ":ключ-鍵-🔑"
    res = await s.claim(request(k))
    await s.complete(k, res.fence, b"x", TTL)
    got = await s.get(k)
    assert got is not None and got.key == k


async def _two_records(s: Any, a: str, b: str) -> None:
    """``a`` and ``b`` are two keys: each claims and keeps its own result."""
    first = await s.claim(request(a))
    assert first.outcome is ClaimOutcome.CLAIMED
    await s.complete(a, first.fence, b"a", TTL)
    second = await s.claim(request(b, fingerprint=OTHER))
    assert second.outcome is ClaimOutcome.CLAIMED, f"{b!r} met the record of {a!r}"
    await s.complete(b, second.fence, b"b", TTL)
    got_a, got_b = await s.get(a), await s.get(b)
    assert got_a is not None and got_a.key == a and got_a.result == b"a"
    assert got_b is not None and got_b.key == b and got_b.result == b"b"


@scenario
async def keys_differ_by_trailing_space(s: Any, advance: Advance, key: str) -> None:
    await _two_records(s, f"{key}:order-7", f"{key}:order-7 ")


@scenario
async def keys_differ_by_case(s: Any, advance: Advance, key: str) -> None:
    await _two_records(s, f"{key}:Order", f"{key}:order")


@scenario
async def keys_differ_by_unicode_normalisation(s: Any, advance: Advance, key: str) -> None:
    # NFC "\u00e9" and NFD "e\u0301" look alike but are different strings, so two keys.
    await _two_records(s, f"{key}:\u00e9", f"{key}:e\u0301")


@scenario
async def scopes_and_key_parts_never_meet(s: Any, advance: Advance, key: str) -> None:
    """Through ``Idempotency``: a scope, a key with ``:`` or ``\\`` and multi-part keys are
    encoded (escaped) into distinct stored keys, and the store keeps them apart."""
    from ..api import Idempotency

    idem = Idempotency(astore=s, namespace=key, lease=LEASE, ttl=TTL)
    cases: list[tuple[Any, str]] = [
        ("refund:7", ""),
        ("7", "refund"),
        (("refund", "7"), ""),
        (("acme:eu", "7"), "charge"),
        (("acme", "eu:7"), "charge"),
        (("acme\\", ":7"), "charge"),
        ("a\\:b", ""),
    ]
    for i, (raw, scope) in enumerate(cases):
        async with idem.aclaim(raw, scope=scope) as call:
            assert not call.replayed, f"{raw!r} (scope {scope!r}) met an earlier key"
            await call.complete(i)
    for i, (raw, scope) in enumerate(cases):
        async with idem.aclaim(raw, scope=scope) as call:
            assert call.replayed and call.result == i, (raw, scope)


async def _faults(s: Any, faults: Any, key: str) -> None:
    """``s`` is a faulty store seen as coroutines, ``faults`` the same store's fault switch;
    each fault is followed by the retry a caller makes."""
    # Failed before reaching the store: nothing changed.
    faults.fail_next("claim", "before")
    req = request(key)
    try:
        await s.claim(req)
    except StoreUnavailable:
        pass
    else:
        raise AssertionError("fault not raised")
    assert await s.get(key) is None
    # Applied, reply lost: the retry with the same attempt gets the same fence.
    faults.fail_next("claim", "after")
    with contextlib.suppress(StoreUnavailable):
        await s.claim(req)
    first = await s.claim(req)
    assert first.outcome is ClaimOutcome.CLAIMED
    rec = await s.get(key)
    assert rec is not None and rec.fence == first.fence
    # A lost reply to complete: the retry succeeds and the result is kept.
    faults.fail_next("complete", "after")
    with contextlib.suppress(StoreUnavailable):
        await s.complete(key, first.fence, b"kept", TTL)
    done = await s.complete(key, first.fence, b"kept", TTL)
    assert done.result == b"kept"
    # A lost reply to release on another key: the retry succeeds.
    other = key + "-r"
    claimed = await s.claim(request(other))
    faults.fail_next("release", "after")
    with contextlib.suppress(StoreUnavailable):
        await s.release(other, claimed.fence)
    await s.release(other, claimed.fence)
    # A failure before complete left the record in progress, still ours to finish.
    third = key + "-c"
    c = await s.claim(request(third))
    faults.fail_next("complete", "before")
    with contextlib.suppress(StoreUnavailable):
        await s.complete(third, c.fence, b"x", TTL)
    r = await s.get(third)
    assert r is not None and r.status is Status.IN_PROGRESS
    await s.complete(third, c.fence, b"x", TTL)
