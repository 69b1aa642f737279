"""The worker of the process race: claim every key, execute what it acquired, complete it."""

from __future__ import annotations

import os
from typing import Any

from idem_core.record import ClaimRequest, Status
from idem_core.registry import open_store

LEASE = 60.0
TTL = 600.0


def worker(url: str, keys: list[str], barrier: Any, out: Any) -> None:
    store = open_store(url)
    me = f"worker-{os.getpid()}"
    executed: list[str] = []
    outcomes: dict[str, int] = {}
    try:
        store.get(keys[0])  # connected before the race starts
        barrier.wait(60)
        for key in keys:
            res = store.claim(ClaimRequest(key, "f" * 32, f"{me}-{key}", LEASE, TTL))
            outcomes[res.outcome.value] = outcomes.get(res.outcome.value, 0) + 1
            if res.outcome.acquired:
                executed.append(key)  # the side effect that must happen once per key
                store.complete(key, res.fence, me.encode(), TTL)
            else:
                assert res.record.status in (Status.IN_PROGRESS, Status.COMPLETED)
        out.put((me, executed, outcomes, None))
    except BaseException as exc:
        out.put((me, executed, outcomes, repr(exc)))
    finally:
        store.close()


def batch_worker(url: str, keys: list[str], size: int, seed: int, barrier: Any, out: Any) -> None:
    """Claim ``keys`` in a shuffled order, in batches of ``size`` (0: one by one), executing
    and completing what was acquired."""
    import random

    store = open_store(url)
    me = f"batcher-{os.getpid()}"
    executed: list[str] = []
    outcomes: dict[str, int] = {}
    order = list(keys)
    random.Random(seed).shuffle(order)
    try:
        store.get(keys[0])  # connected before the race starts
        barrier.wait(60)
        step = size or 1
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            reqs = [ClaimRequest(k, "f" * 32, f"{me}-{k}", LEASE, TTL) for k in chunk]
            results = store.claim_many(reqs) if size else [store.claim(reqs[0])]
            for key, res in zip(chunk, results, strict=True):
                outcomes[res.outcome.value] = outcomes.get(res.outcome.value, 0) + 1
                if res.outcome.acquired:
                    executed.append(key)
                    store.complete(key, res.fence, me.encode(), TTL)
                else:
                    assert res.record.status in (Status.IN_PROGRESS, Status.COMPLETED)
        out.put((me, executed, outcomes, None))
    except BaseException as exc:
        out.put((me, executed, outcomes, repr(exc)))
    finally:
        store.close()
