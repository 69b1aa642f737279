"""Latency and throughput cells: one scenario, one rig, one concurrency, HDR-timed.

Scenarios: ``first`` (claim + run + complete on a new key), ``replay`` (a completed key),
``conflict`` (a key another caller holds in progress), ``claim_many`` (a batch of 100 new
keys), ``steps`` (a first call whose function runs ``rigs.STEPS`` steps: the cost of a step is
its difference to ``first``) and ``floor`` (the server's one-round-trip primitive on the same
client).
Sync cells run on threads, async cells on tasks of one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hdrh.histogram import HdrHistogram

from . import rigs
from .rigs import AsyncRig, SyncRig

SCENARIOS = ("first", "replay", "conflict", "claim_many", "steps", "floor")
BATCH = 100
REPLAY_POOL = 100
COUNT_OPS = 10
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CDF_POINTS = (0.0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99, 99.5, 99.9, 99.99, 100.0)


@dataclasses.dataclass
class Settings:
    scenarios: tuple[str, ...] = SCENARIOS
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    #: seconds of the concurrency-1 cell (the latency figures) and of the others
    latency_seconds: float = 1.0
    cell_seconds: float = 0.5
    max_ops: int = 1_000_000
    warmup: int = 20
    #: run the sync first-call cells again with the threads on one CPU (see ``one_cpu``)
    one_cpu: bool = True


def new_hist() -> HdrHistogram:
    # nanoseconds, up to 100 s, 3 significant digits
    return HdrHistogram(1, 100_000_000_000, 3)


def summarize(
    hist: HdrHistogram, ops: int, seconds: float, keep_cdf: bool, cpu_ns: int | None = None
) -> dict[str, Any]:
    us = 1000.0
    out: dict[str, Any] = {
        "ops": ops,
        "seconds": round(seconds, 4),
        "throughput": round(ops / seconds, 1) if seconds > 0 else 0.0,
        # the bench process's CPU per call: the client's cost (servers run in processes of
        # their own), which a Lambda is billed for
        "cpu_us": round(cpu_ns / ops / us, 1) if cpu_ns is not None and ops else None,
        "mean_us": round(hist.get_mean_value() / us, 2) if ops else None,
        "max_us": round(hist.get_max_value() / us, 2) if ops else None,
    }
    for p in PERCENTILES:
        out[f"p{p:g}_us"] = round(hist.get_value_at_percentile(p) / us, 2) if ops else None
    if keep_cdf and ops:
        out["cdf"] = [[p, round(hist.get_value_at_percentile(p) / us, 2)] for p in CDF_POINTS]
    return out


def one_cpu() -> set[int] | None:
    """One CPU of those this process may run on, or None where there is only one (or no
    way to choose). Threads of one CPython process take turns holding the GIL; spread over
    several CPUs, each turn can wake a thread on another CPU, which on a small VM costs more
    than a whole call (see docs/benchmarks.md); on one CPU they hand over locally."""
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:
        return None
    cpus = sorted(getter(0))
    return {cpus[0]} if len(cpus) > 1 else None


def sync_cell(
    op: Callable[[int], Any],
    concurrency: int,
    seconds: float,
    max_ops: int,
    keep_cdf: bool,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    counter = itertools.count()
    hists: list[HdrHistogram] = []
    errors: list[BaseException] = []
    start = threading.Event()
    clock = time.perf_counter_ns
    deadline_box = [0]

    def worker() -> None:
        hist = new_hist()
        record = hist.record_value
        if cpus is not None:
            os.sched_setaffinity(0, cpus)  # this thread only (Linux: 0 is the caller)
        start.wait()
        deadline = deadline_box[0]
        try:
            while True:
                i = next(counter)
                if i >= max_ops:
                    break
                t0 = clock()
                if t0 >= deadline:
                    break
                op(i)
                record(max(1, clock() - t0))
        except BaseException as exc:
            errors.append(exc)
        hists.append(hist)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    cpu0 = time.process_time_ns()
    t0 = clock()
    deadline_box[0] = t0 + int(seconds * 1e9)
    start.set()
    for t in threads:
        t.join()
    elapsed = (clock() - t0) / 1e9
    cpu = time.process_time_ns() - cpu0
    if errors:
        raise errors[0]
    total = new_hist()
    for h in hists:
        total.add(h)
    return summarize(total, total.get_total_count(), elapsed, keep_cdf, cpu)


async def async_cell(
    op: Callable[[int], Awaitable[Any]],
    concurrency: int,
    seconds: float,
    max_ops: int,
    keep_cdf: bool,
) -> dict[str, Any]:
    counter = itertools.count()
    hist = new_hist()
    record = hist.record_value
    clock = time.perf_counter_ns
    cpu0 = time.process_time_ns()
    t0 = clock()
    deadline = t0 + int(seconds * 1e9)

    async def worker() -> None:
        while True:
            i = next(counter)
            if i >= max_ops:
                return
            s = clock()
            if s >= deadline:
                return
            await op(i)
            record(max(1, clock() - s))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = (clock() - t0) / 1e9
    cpu = time.process_time_ns() - cpu0
    return summarize(hist, hist.get_total_count(), elapsed, keep_cdf, cpu)


class Progress:
    """What the cells report to (rich progress in the CLI, nothing in tests)."""

    def cell(self, label: str) -> None:
        pass


# -- sync sections ---------------------------------------------------------------------


def _sync_ops(rig: SyncRig, tag: str) -> dict[str, Callable[[int], Any]]:
    ops: dict[str, Callable[[int], Any]] = {}
    call = rig.call
    ops["first"] = lambda i: call(f"{tag}f{i}")
    pool = [f"{tag}r{i}" for i in range(REPLAY_POOL)]
    ops["replay"] = lambda i: call(pool[i % REPLAY_POOL])
    held = f"{tag}held"

    def conflict(i: int) -> None:
        try:
            call(held)
        except rig.in_progress:
            return
        raise RuntimeError("the conflict probe ran instead of finding the key in progress")

    ops["conflict"] = conflict
    if rig.claim_many is not None:
        cm = rig.claim_many
        ops["claim_many"] = lambda i: cm([f"{tag}m{i}-{j}" for j in range(BATCH)])
    if rig.stepped is not None:
        stepped = rig.stepped
        ops["steps"] = lambda i: stepped(f"{tag}s{i}")
    if rig.floor is not None:
        floor = rig.floor
        ops["floor"] = lambda i: floor()
    return ops


def _hold_sync(rig: SyncRig, key: str) -> Callable[[], None]:
    rigs.ENTERED[key] = threading.Event()
    rigs.HOLD[key] = threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            rig.call(key)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    if not rigs.ENTERED[key].wait(30):
        raise RuntimeError(f"the holder never entered: {errors[:1]}")

    def release() -> None:
        rigs.HOLD[key].set()
        thread.join(30)
        rigs.HOLD.pop(key, None)
        rigs.ENTERED.pop(key, None)

    return release


def sync_section(
    make: Callable[[str, bool], SyncRig],
    tag: str,
    settings: Settings,
    progress: Progress,
    label: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """{scenario: {concurrency: cell}} and round trips per call, for one sync rig."""
    rig = make(tag, False)
    results: dict[str, dict[str, Any]] = {}
    release: Callable[[], None] | None = None
    try:
        ops = _sync_ops(rig, tag)
        for i in range(REPLAY_POOL):
            rig.call(f"{tag}r{i}")
        if "conflict" in settings.scenarios:
            release = _hold_sync(rig, f"{tag}held")
        for scenario in settings.scenarios:
            op = ops.get(scenario)
            if op is None:
                continue
            for j in range(min(settings.warmup, 5 if scenario == "claim_many" else 10**9)):
                op(10_000_000 + j)
            results[scenario] = _sync_cells(op, settings, progress, f"{label} {scenario}")
        cpus = one_cpu() if settings.one_cpu else None
        if "first" in results and cpus is not None:
            # The same first calls with every thread on one CPU, on keys of their own.
            pinned: dict[str, Any] = {"cpu": min(cpus)}
            pinned.update(
                _sync_cells(ops["first"], settings, progress, f"{label} first, one CPU", cpus)
            )
            results["first_one_cpu"] = pinned
    finally:
        if release is not None:
            release()
        rig.close()
    return results, count_sync(make, tag + "n", settings)


def _sync_cells(
    op: Callable[[int], Any],
    settings: Settings,
    progress: Progress,
    label: str,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    """{concurrency: cell} of one op; pinned cells (``cpus``) use keys of their own."""
    cells: dict[str, Any] = {}
    for c in settings.concurrency:
        progress.cell(f"{label} c={c}")
        seconds = settings.latency_seconds if c == 1 else settings.cell_seconds
        try:
            cells[str(c)] = sync_cell(
                _offset(op, c if cpus is None else 100 + c),
                c,
                seconds,
                settings.max_ops,
                c == 1 and cpus is None,
                cpus,
            )
        except Exception as exc:
            cells[str(c)] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return cells


def _offset(op: Callable[[int], Any], c: int) -> Callable[[int], Any]:
    # every cell uses its own keys
    base = c * 1_000_000
    return lambda i: op(base + i)


def count_sync(
    make: Callable[[str, bool], SyncRig], tag: str, settings: Settings
) -> dict[str, Any]:
    """Round trips (driver level) and store operations per call, on a counting rig."""
    try:
        rig = make(tag, True)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    out: dict[str, Any] = {}
    release: Callable[[], None] | None = None
    try:
        ops = _sync_ops(rig, tag)
        for i in range(REPLAY_POOL):
            if i >= COUNT_OPS:
                break
            rig.call(f"{tag}r{i}")
        if "conflict" in settings.scenarios:
            release = _hold_sync(rig, f"{tag}held")
        rig.call(f"{tag}warm")
        for scenario in settings.scenarios:
            op = ops.get(scenario)
            if op is None or scenario == "floor":  # one round trip by construction
                continue
            before_rt = rig.round_trips.n if rig.round_trips else 0
            before_ops = rig.store_ops.n if rig.store_ops else 0
            for i in range(COUNT_OPS):
                op(i)
            out[scenario] = {
                "round_trips": (rig.round_trips.n - before_rt) / COUNT_OPS
                if rig.round_trips
                else None,
                "store_ops": (rig.store_ops.n - before_ops) / COUNT_OPS if rig.store_ops else None,
            }
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if release is not None:
            release()
        rig.close()
    return out


# -- async sections --------------------------------------------------------------------


def _async_ops(rig: AsyncRig, tag: str) -> dict[str, Callable[[int], Awaitable[Any]]]:
    ops: dict[str, Callable[[int], Awaitable[Any]]] = {}
    call = rig.call
    ops["first"] = lambda i: call(f"{tag}f{i}")
    pool = [f"{tag}r{i}" for i in range(REPLAY_POOL)]
    ops["replay"] = lambda i: call(pool[i % REPLAY_POOL])
    held = f"{tag}held"

    async def conflict(i: int) -> None:
        try:
            await call(held)
        except rig.in_progress:
            return
        raise RuntimeError("the conflict probe ran instead of finding the key in progress")

    ops["conflict"] = conflict
    if rig.claim_many is not None:
        cm = rig.claim_many
        ops["claim_many"] = lambda i: cm([f"{tag}m{i}-{j}" for j in range(BATCH)])
    if rig.stepped is not None:
        astepped = rig.stepped
        ops["steps"] = lambda i: astepped(f"{tag}s{i}")
    if rig.floor is not None:
        floor = rig.floor
        ops["floor"] = lambda i: floor()
    return ops


async def _hold_async(rig: AsyncRig, key: str) -> Callable[[], Awaitable[None]]:
    rigs.AENTERED[key] = asyncio.Event()
    rigs.AHOLD[key] = asyncio.Event()

    async def holder() -> None:
        await rig.call(key)

    task = asyncio.ensure_future(holder())
    try:
        await asyncio.wait_for(rigs.AENTERED[key].wait(), 30)
    except TimeoutError:
        raise RuntimeError(f"the holder never entered: {task}") from None

    async def release() -> None:
        rigs.AHOLD[key].set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        rigs.AHOLD.pop(key, None)
        rigs.AENTERED.pop(key, None)

    return release


async def async_section(
    make: Callable[[str, bool], Awaitable[AsyncRig]],
    tag: str,
    settings: Settings,
    progress: Progress,
    label: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    rig = await make(tag, False)
    results: dict[str, dict[str, Any]] = {}
    release: Callable[[], Awaitable[None]] | None = None
    try:
        ops = _async_ops(rig, tag)
        for i in range(REPLAY_POOL):
            await rig.call(f"{tag}r{i}")
        if "conflict" in settings.scenarios:
            release = await _hold_async(rig, f"{tag}held")
        for scenario in settings.scenarios:
            op = ops.get(scenario)
            if op is None:
                continue
            results[scenario] = {}
            for j in range(min(settings.warmup, 5 if scenario == "claim_many" else 10**9)):
                await op(10_000_000 + j)
            for c in settings.concurrency:
                progress.cell(f"{label} {scenario} c={c}")
                seconds = settings.latency_seconds if c == 1 else settings.cell_seconds
                base = c * 1_000_000

                def shifted(
                    i: int, op: Callable[[int], Awaitable[Any]] = op, base: int = base
                ) -> Awaitable[Any]:
                    return op(base + i)

                try:
                    results[scenario][str(c)] = await async_cell(
                        shifted, c, seconds, settings.max_ops, c == 1
                    )
                except Exception as exc:
                    results[scenario][str(c)] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        if release is not None:
            await release()
        await rig.close()
    return results, await count_async(make, tag + "n", settings)


async def count_async(
    make: Callable[[str, bool], Awaitable[AsyncRig]], tag: str, settings: Settings
) -> dict[str, Any]:
    try:
        rig = await make(tag, True)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    out: dict[str, Any] = {}
    release: Callable[[], Awaitable[None]] | None = None
    try:
        ops = _async_ops(rig, tag)
        for i in range(COUNT_OPS):
            await rig.call(f"{tag}r{i}")
        if "conflict" in settings.scenarios:
            release = await _hold_async(rig, f"{tag}held")
        await rig.call(f"{tag}warm")
        for scenario in settings.scenarios:
            op = ops.get(scenario)
            if op is None or scenario == "floor":  # one round trip by construction
                continue
            before_rt = rig.round_trips.n if rig.round_trips else 0
            before_ops = rig.store_ops.n if rig.store_ops else 0
            for i in range(COUNT_OPS):
                await op(i)
            out[scenario] = {
                "round_trips": (rig.round_trips.n - before_rt) / COUNT_OPS
                if rig.round_trips
                else None,
                "store_ops": (rig.store_ops.n - before_ops) / COUNT_OPS if rig.store_ops else None,
            }
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if release is not None:
            await release()
        await rig.close()
    return out
