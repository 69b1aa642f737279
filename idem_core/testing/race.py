"""Races on one key: threads, tasks and processes claiming at the same instant."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from typing import Any

from ..record import ClaimOutcome, ClaimRequest
from ..registry import open_store
from ..store import AsyncStore, Store
from .scenarios import request


def thread_race(store: Store, key: str, threads: int = 16) -> list[ClaimOutcome]:
    barrier = threading.Barrier(threads)
    outcomes: list[ClaimOutcome] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        req = request(key, lease=30)
        barrier.wait()
        try:
            res = store.claim(req)
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            outcomes.append(res.outcome)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return outcomes


async def task_race(store: AsyncStore, key: str, tasks: int = 16) -> list[ClaimOutcome]:
    results = await asyncio.gather(*(store.claim(request(key, lease=30)) for _ in range(tasks)))
    return [r.outcome for r in results]


def _claim_at(url: str, req: ClaimRequest, start: float, out: Any) -> None:
    store = open_store(url)
    try:
        time.sleep(max(0.0, start - time.time()))
        out.put(store.claim(req).outcome.value)
    finally:
        store.close()


def process_race(url: str, key: str, processes: int = 4) -> list[ClaimOutcome]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start = time.time() + 2.0  # lets every child import and connect before the race
    procs = [
        ctx.Process(
            target=_claim_at,
            args=(url, request(key, attempt=uuid.uuid4().hex, lease=30), start, queue),
        )
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [ClaimOutcome(queue.get(timeout=5)) for _ in procs]
