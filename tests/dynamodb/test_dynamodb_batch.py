"""claim_many in a fixed number of requests (issue 14): conditional Puts in TransactWriteItems,
settled from the cancellation reasons. On moto's server and DynamoDB Local, sync and async:
requests per batch, results identical to one claim after another for every kind of record,
servers that leave the old items out of the reasons, and processes racing over the same keys.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import ddb_race
import pytest
from ddb_servers import Counter, Server, counting, store_calls
from idem_dynamodb.backend import BACKEND

from idem_core.clock import ManualClock
from idem_core.errors import ConfigurationError
from idem_core.record import ClaimOutcome, ClaimRequest, ClaimResult, Record
from idem_core.testing.scenarios import AsyncView

TTL = 600.0
FP = "f" * 32


def req(key: str, lease: float = 600.0, fingerprint: str = FP, attempt: str = "") -> ClaimRequest:
    return ClaimRequest(key, fingerprint, attempt or uuid.uuid4().hex, lease, TTL)


class Twin:
    """One store (sync through AsyncView, or async) and a counter of its calls, on the lean
    path and through boto3 alike."""

    def __init__(self, store: Any, counter: Counter, sync: bool) -> None:
        self.store = store
        self.s = AsyncView(store) if sync else store
        self.counter = counter

    @property
    def limit(self) -> int:
        return int(self.store.plans.transaction_items)


Open = Callable[..., Awaitable[Twin]]


@pytest.fixture
def table(server: Server) -> Iterator[str]:
    """A table of the test's own: moto copies every table a transaction touches, whole, before
    applying it (about 1 ms per item), so the session's shared table would time out."""
    name = f"idem_batch_{uuid.uuid4().hex[:12]}"
    with server.open(name) as store:
        store.setup()
        yield name
        store.client.delete_table(TableName=name)


@pytest.fixture(params=["sync", "async"])
async def open_twin(
    request: pytest.FixtureRequest, server: Server, table: str
) -> AsyncIterator[Open]:
    opened: list[Any] = []

    async def open_(**options: Any) -> Twin:
        options.setdefault("read_timeout", 30)
        if request.param == "sync":
            store = server.open(table, **options)
            opened.append(store)
            return Twin(store, store_calls(store), True)
        astore = BACKEND.open_async(server.url(table), **options)
        opened.append(astore)
        clients = [await astore._get_client()]
        if astore._lean:
            clients.append(await astore._get_wire())
        return Twin(astore, counting(*clients), False)

    yield open_
    for store in opened:
        result = store.close()
        if isinstance(result, Awaitable):
            await result


def keys_(n: int) -> list[str]:
    prefix = uuid.uuid4().hex
    return [f"b-{prefix}-{i}" for i in range(n)]


# -- requests per batch


@pytest.mark.parametrize("n", [1, 10, 100, 250])
async def test_requests_per_batch_do_not_grow_with_it(open_twin: Open, n: int) -> None:
    t = await open_twin()
    # A first batch of more keys than DynamoDB Local's transactions take: the store learns the
    # server's limit (100 on moto and DynamoDB, 10 on DynamoDB Local before 2022).
    await t.s.claim_many([req(k) for k in keys_(101)])
    assert t.limit in (10, 100)
    t.counter.take()
    per_round = max(1, math.ceil(n / t.limit))

    keys = keys_(n)
    first = await t.s.claim_many([req(k) for k in keys])
    assert {r.outcome for r in first} == {ClaimOutcome.CLAIMED}
    calls = t.counter.take()
    if n == 1:
        assert calls == ["PutItem"]  # one key: one conditional write, not a transaction
        return
    assert calls == ["TransactWriteItems"] * per_round

    for res in first[::2]:
        await t.s.complete(res.record.key, res.fence, b"r-" + res.record.key.encode(), TTL)
    t.counter.take()
    # Replays and claims in progress: every condition fails, the reasons carry the items.
    again = await t.s.claim_many([req(k) for k in keys])
    assert [r.outcome for r in again] == [
        ClaimOutcome.COMPLETED if i % 2 == 0 else ClaimOutcome.IN_PROGRESS for i in range(n)
    ]
    assert again[0].record.result == b"r-" + keys[0].encode()
    assert t.counter.take() == ["TransactWriteItems"] * per_round

    # Half new, half stored: one cancelled round, then one that writes.
    fresh = keys_(n // 2)
    mixed = [k for pair in zip(fresh, keys, strict=False) for k in pair]
    out = await t.s.claim_many([req(k) for k in mixed])
    assert [r.outcome for r in out][:4] == [
        ClaimOutcome.CLAIMED,
        ClaimOutcome.COMPLETED,
        ClaimOutcome.CLAIMED,
        ClaimOutcome.IN_PROGRESS,
    ]
    calls = t.counter.take()
    assert calls == ["TransactWriteItems"] * (
        math.ceil(len(mixed) / t.limit) + math.ceil(len(fresh) / t.limit)
    )


# -- the same results as one claim after another

# name -> (how to prepare the key, the request's fingerprint / attempt)
KINDS = [
    "new",
    "completed",
    "completed_empty",
    "completed_other_payload",
    "in_progress",
    "in_progress_same_attempt",
    "released",
    "completed_expired",
    "in_progress_expired",
    "lease_lapsed_past_allowance",
    "lease_lapsed_watched",
    "new_twice",
    "completed_twice",
    "in_progress_twice",
    "same_attempt_twice",
]


async def prepare(s: Any, key: str, kind: str, clock: ManualClock) -> list[ClaimRequest]:
    """Bring ``key`` into the state ``kind`` names; the requests the batch makes for it."""
    holder = f"holder-{key}"
    if kind.startswith("completed"):
        ttl = 1.0 if kind == "completed_expired" else TTL
        res = await s.claim(ClaimRequest(key, FP, holder, 30.0, ttl))
        await s.complete(key, res.fence, b"" if kind == "completed_empty" else b"done", ttl)
    elif kind.startswith("in_progress") or kind == "same_attempt_twice":
        lease, ttl = (1.0, 1.0) if kind == "in_progress_expired" else (30.0, TTL)
        await s.claim(ClaimRequest(key, FP, holder, lease, ttl))
    elif kind == "released":
        res = await s.claim(ClaimRequest(key, FP, holder, 30.0, TTL))
        await s.release(key, res.fence)
    elif kind.startswith("lease_lapsed"):
        await s.claim(ClaimRequest(key, FP, holder, 2.0, TTL))
    if kind == "completed_other_payload":
        return [req(key, fingerprint="e" * 32)]
    if kind in ("in_progress_same_attempt", "same_attempt_twice"):
        return [req(key, attempt=holder)] * (2 if kind.endswith("twice") else 1)
    if kind.endswith("twice"):
        return [req(key), req(key)]
    return [req(key)]


def shape(res: ClaimResult, request: ClaimRequest) -> tuple[Any, ...]:
    """What must agree between the two ways, fences and keys aside."""
    r: Record = res.record
    mine = r.attempt == request.attempt
    return (res.outcome, r.status, r.fingerprint, mine, r.result, r.lease_expires_at, r.expires_at)


async def test_results_are_those_of_one_claim_after_another(open_twin: Open) -> None:
    clock = ManualClock(time.time())
    # skew_allowance=10: the wall-clock takeover of a lease that ended 10 s ago is in the mix.
    t = await open_twin(clock=clock, monotonic=clock, skew_allowance=10)
    await t.s.claim_many([req(k) for k in keys_(11)])  # the server's transaction limit, learnt
    # The records are written by another store (another process), which t never watched.
    h = await open_twin(clock=clock, monotonic=clock, skew_allowance=10)
    batch_keys, one_keys = keys_(len(KINDS)), keys_(len(KINDS))
    batch_reqs: list[ClaimRequest] = []
    one_reqs: list[ClaimRequest] = []
    for kind, bk, ok in zip(KINDS, batch_keys, one_keys, strict=True):
        batch_reqs += await prepare(h.s, bk, kind, clock)
        one_reqs += await prepare(h.s, ok, kind, clock)
    clock.advance(2.5)  # expiries pass, short leases lapse (within the allowance)
    watched = {KINDS.index("lease_lapsed_watched")}
    # Both ways see the lapsed leases first: watching starts.
    first_b = await t.s.claim_many([batch_reqs[i] for i in sorted(watched)])
    first_o = [await t.s.claim(one_reqs[i]) for i in sorted(watched)]
    assert (
        [r.outcome for r in first_b] == [r.outcome for r in first_o] == [ClaimOutcome.IN_PROGRESS]
    )
    clock.advance(10)  # lapsed past the allowance; the watched lease unchanged for its duration
    t.counter.take()
    batched = await t.s.claim_many(batch_reqs)
    calls = t.counter.take()
    # Two rounds: all, cancelled; then the new keys with the takeable ones (expired, released,
    # lapsed) on what they hold. The duplicate of a key someone else holds asks on its own.
    unique, second = len(set(batch_keys)), 7
    rounds = math.ceil(unique / t.limit) + math.ceil(second / t.limit)
    alone = ["PutItem"] if t.store.plans.returns_old else ["PutItem", "GetItem"]
    assert calls == ["TransactWriteItems"] * rounds + alone, calls
    one_by_one = [await t.s.claim(r) for r in one_reqs]
    assert [shape(r, q) for r, q in zip(batched, batch_reqs, strict=True)] == [
        shape(r, q) for r, q in zip(one_by_one, one_reqs, strict=True)
    ]
    got = dict(zip([q.key for q in batch_reqs], [r.outcome for r in batched], strict=False))
    want = {
        "new": ClaimOutcome.CLAIMED,
        "completed": ClaimOutcome.COMPLETED,
        "completed_empty": ClaimOutcome.COMPLETED,
        "completed_other_payload": ClaimOutcome.MISMATCH,
        "in_progress": ClaimOutcome.IN_PROGRESS,
        "in_progress_same_attempt": ClaimOutcome.CLAIMED,
        "released": ClaimOutcome.CLAIMED,
        "completed_expired": ClaimOutcome.CLAIMED,
        "in_progress_expired": ClaimOutcome.CLAIMED,
        "lease_lapsed_past_allowance": ClaimOutcome.TOOK_OVER,
        "lease_lapsed_watched": ClaimOutcome.TOOK_OVER,
    }
    for kind, key in zip(KINDS, batch_keys, strict=True):
        if kind in want:
            assert got[key] is want[kind], kind
    # Duplicates: the second request meets what the first left.
    dup = [(q, r) for q, r in zip(batch_reqs, batched, strict=True) if q.key.endswith("-11")]
    assert [r.outcome for _, r in dup] == [ClaimOutcome.CLAIMED, ClaimOutcome.IN_PROGRESS]
    assert batched[-1].fence == batched[-2].fence  # same attempt twice: one claim
    # What each way left in the table agrees too.
    for bk, ok in zip(batch_keys, one_keys, strict=True):
        b, o = await t.s.get(bk), await t.s.get(ok)
        assert (b is None) == (o is None)
        if b is not None and o is not None:
            assert (b.status, b.fingerprint, b.result, b.expires_at) == (
                o.status,
                o.fingerprint,
                o.result,
                o.expires_at,
            )


# -- servers that leave the old item out of the reasons


def strip_items(parsed: dict[str, Any] | None = None, **_: Any) -> None:
    """Leave out the items of the cancellation reasons, as a server without
    ReturnValuesOnConditionCheckFailure support in transactions does."""
    for reason in (parsed or {}).get("CancellationReasons") or []:
        reason.pop("Item", None)


async def test_reasons_without_items_cost_one_batch_read(open_twin: Open) -> None:
    t = await open_twin()
    await t.s.claim_many([req(k) for k in keys_(101)])  # the server's limit, learnt
    client = t.store.client if hasattr(t.store, "client") else await t.store._get_client()
    client.meta.events.register("after-call.dynamodb.TransactWriteItems", strip_items)
    n = min(t.limit, 10)
    stored = keys_(n // 2)
    done = await t.s.claim_many([req(k) for k in stored])
    await t.s.complete(stored[0], done[0].fence, b"kept", TTL)
    fresh = keys_(n - len(stored))
    t.counter.take()
    out = await t.s.claim_many([req(k) for k in stored + fresh])
    assert out[0].outcome is ClaimOutcome.COMPLETED and out[0].record.result == b"kept"
    assert {r.outcome for r in out[1 : len(stored)]} == {ClaimOutcome.IN_PROGRESS}
    assert {r.outcome for r in out[len(stored) :]} == {ClaimOutcome.CLAIMED}
    assert t.counter.take() == ["TransactWriteItems", "BatchGetItem", "TransactWriteItems"]


# -- races

PROCESSES = 4
KEYS = 120


@pytest.mark.slow
def test_processes_batch_claiming_overlapping_keys_claim_each_once(
    server: Server, table: str
) -> None:
    """Four processes claim overlapping batches (one of them key by key) in shuffled orders:
    every key is acquired and executed exactly once."""
    prefix = uuid.uuid4().hex
    keys = [f"brace-{prefix}-{i}" for i in range(KEYS)]
    url = server.url(table, read_timeout=30)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    batches = [0, 30, 25, 7]  # batch sizes; 0: one claim after another
    procs = [
        ctx.Process(target=ddb_race.batch_worker, args=(url, keys, size, seed, barrier, out))
        for seed, size in enumerate(batches)
    ]
    for p in procs:
        p.start()
    reports = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [(who, err) for who, _, _, err in reports if err]
    assert not errors, errors
    executions = collections.Counter(k for _, executed, _, _ in reports for k in executed)
    assert sorted(executions) == sorted(keys)
    assert set(executions.values()) == {1}, executions.most_common(3)
    outcomes: collections.Counter[str] = collections.Counter()
    for _, _, counts, _ in reports:
        outcomes.update(counts)
    assert outcomes["claimed"] == KEYS and outcomes["took_over"] == 0, outcomes
    with server.open(table) as store:
        for key in random.Random(1).sample(keys, 12):
            rec = store.get(key)
            assert rec is not None and rec.result is not None


# -- the threshold -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [("1", "batch_from must be at least 2 or off"), ("many", "batch_from must be an integer")],
)
def test_batch_from_refused(value: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        BACKEND.open(f"dynamodb://t_1?region=us-east-1&batch_from={value}")


async def test_batch_from_sets_where_transactions_start(open_twin: Open) -> None:
    off = await open_twin(batch_from="off")
    assert off.store.settings.batch_from is None
    await off.s.claim_many([req(k) for k in keys_(3)])
    assert off.counter.take() == ["PutItem"] * 3  # key by key, side by side
    five = await open_twin(batch_from=5)
    await five.s.claim_many([req(k) for k in keys_(4)])
    assert five.counter.take() == ["PutItem"] * 4
    await five.s.claim_many([req(k) for k in keys_(5)])
    assert five.counter.take() == ["TransactWriteItems"]
