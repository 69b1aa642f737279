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
