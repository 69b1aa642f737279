"""Not a test: run by ``test_sql_event_loops.py`` in a fresh interpreter.

    python loop_worker.py URL MODE

Opens an async store from URL inside ``asyncio.run()``, uses it (setup, claim, complete,
get), and abandons it unclosed when the loop closes; then does the same in a second
``asyncio.run()``. MODE ``exit``: both stores live until interpreter exit; ``collect``: the
first is dropped and collected while the second loop runs, the second after it closes.
Prints one line per step on stdout; stderr must stay empty.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import uuid
from typing import Any

from idem_core.record import ClaimOutcome, ClaimRequest
from idem_core.registry import open_async_store

kept: list[Any] = []


async def use(url: str, n: int) -> None:
    if sys.argv[2] == "collect" and n == 2:
        kept.clear()  # the first loop's store, abandoned, collected while this loop runs
        gc.collect()
    store = open_async_store(url)
    await store.setup()
    key = f"loop-{uuid.uuid4().hex}"
    req = ClaimRequest(key=key, fingerprint="f", attempt=uuid.uuid4().hex, lease=30, ttl=60)
    res = await store.claim(req)
    assert res.outcome is ClaimOutcome.CLAIMED
    await store.complete(key, res.fence, b"ok", 60)
    again = await store.claim(req)
    assert again.outcome is ClaimOutcome.COMPLETED and again.record.result == b"ok"
    kept.append(store)  # never closed
    print(f"loop {n} ok", flush=True)


def main() -> None:
    url = sys.argv[1]
    asyncio.run(use(url, 1))
    asyncio.run(use(url, 2))
    if sys.argv[2] == "collect":
        kept.clear()
        gc.collect()
    print("done", flush=True)


if __name__ == "__main__":
    main()
