"""Race scenarios: duplicate storm, lease expiry with a zombie completion, crash takeover,
clock skew and waiters, on idem-core and on the peers, reported as counts.

Stores shared between processes race across processes (spawned, so no inherited sockets);
in-process stores (memory://, or a store object given directly) race across threads, and a
thread's "freeze" is a stall on an event where a process gets SIGSTOP/SIGCONT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from idem_core import AlreadyInProgress, Idempotency, LeaseLost
from idem_core.clock import SkewedClock

from .rigs import LEASE, TTL, powertools_function, powertools_layer
from .targets import Target, with_params

RACE_LEASE = 1.0
RACES = ("storm", "zombie", "crash", "waiters", "skew")
_BODIES: dict[str, Callable[[], str]] = {}


@dataclasses.dataclass
class Spec:
    """What a worker needs to rebuild the system under test (picklable unless ``store``)."""

    system: str  # idem-core | powertools | idemkit
    target: Target
    tag: str
    lease: float = RACE_LEASE
    #: a ready store for in-process races (tests); never sent to another process
    store: Any = None

    @property
    def in_process(self) -> bool:
        return self.store is not None or self.target.in_process


def race_url(target: Target, tag: str) -> str:
    if target.kind == "sql" and target.database != "sqlite":
        return with_params(target.url, table=f"idem_race_{tag}")
    if target.kind == "redis":
        return with_params(target.url, prefix=f"idemrace:{tag}:")
    return target.url


class Runner:
    """One worker's handle on the system: ``call(key, body)`` -> (status, value), where
    status is executed | replayed | in_progress | lease_lost | error:<type>."""

    def __init__(
        self, spec: Spec, *, wait: float = 0.0, clock: Callable[[], int] | None = None
    ) -> None:
        # lost leases are provoked on purpose here: counted, not logged (also in children)
        logging.getLogger("idem_core").setLevel(logging.ERROR)
        self.spec = spec
        self.wait = wait
        self._closers: list[Callable[[], Any]] = []
        if spec.system == "idem-core":
            options: dict[str, Any] = {}
            if clock is not None:
                options["clock"] = clock
            if spec.store is not None:
                self.idem = Idempotency(store=spec.store, namespace=f"race{spec.tag}")
            else:
                self.idem = Idempotency.from_url(
                    race_url(spec.target, spec.tag),
                    store_options=options,
                    namespace=f"race{spec.tag}",
                )
                self._closers.append(self.idem.close)
        elif spec.system == "powertools":
            from .rigs import _boto_client, _redis_client

            if spec.target.kind == "redis":
                client = _redis_client(spec.target, None, aio=False)
            else:
                client = _boto_client(spec.target.server)
            self._closers.append(client.close)
            self.layer = powertools_layer(spec.target, client, spec.tag)
        elif spec.system == "idemkit":
            from idemkit.adapters.ai import idempotent_sync
            from idemkit.core.sync_bridge import run_sync

            from .rigs import idemkit_backend, idemkit_config

            async def build() -> Any:
                return await idemkit_backend(spec.target, spec.tag, None)

            backend, _ = run_sync(build())
            self._closers.append(lambda: run_sync(backend.aclose()))

            # The body runs on idemkit's worker thread: it is found by a call id that is
            # not part of the key.
            def tool(order_id: str, call_id: str) -> str:
                return _BODIES[call_id]()

            self.ik = idempotent_sync(
                backend=backend, config=idemkit_config(spec.lease, wait if wait else 0.0)
            )(tool)
        else:
            raise ValueError(spec.system)

    def call(self, key: str, body: Callable[[], str]) -> tuple[str, str | None]:
        try:
            if self.spec.system == "idem-core":
                return self._ours(key, body)
            if self.spec.system == "powertools":
                return self._powertools(key, body)
            return self._idemkit(key, body)
        except Exception as exc:
            return f"error:{type(exc).__name__}", str(exc)[:200]

    def _ours(self, key: str, body: Callable[[], str]) -> tuple[str, str | None]:
        mode = "wait" if self.wait else "raise"
        try:
            with self.idem.claim(
                key,
                lease=self.spec.lease,
                ttl=TTL,
                result_type=str,
                on_in_progress=mode,
                wait_timeout=self.wait or 10.0,
            ) as call:
                if call.replayed:
                    return "replayed", call.result
                value = body()
                try:
                    call.complete(value)
                except LeaseLost:
                    return "lease_lost", value
                return "executed", value
        except AlreadyInProgress:
            return "in_progress", None

    def _powertools(self, key: str, body: Callable[[], str]) -> tuple[str, str | None]:
        from aws_lambda_powertools.utilities.idempotency.exceptions import (
            IdempotencyAlreadyInProgressError,
        )

        ran = []

        def run(_: str) -> str:
            ran.append(1)
            return body()

        fn = powertools_function(self.layer, self.spec.lease, run)
        try:
            out = fn(order={"order_id": f"{self.spec.tag}:{key}", "amount": 1})
        except IdempotencyAlreadyInProgressError:
            return "in_progress", None
        return ("executed" if ran else "replayed"), out["value"]

    def _idemkit(self, key: str, body: Callable[[], str]) -> tuple[str, str | None]:
        from idemkit.core.exceptions import IdempotencyConflict

        call_id = uuid.uuid4().hex
        ran: list[int] = []

        def run() -> str:
            ran.append(1)
            return body()

        _BODIES[call_id] = run
        try:
            out = self.ik(order_id=f"{self.spec.tag}:{key}", call_id=call_id)
        except IdempotencyConflict as exc:
            if ran:
                return "lease_lost", str(exc)[:80]
            return "in_progress", None
        finally:
            _BODIES.pop(call_id, None)
        return ("executed" if ran else "replayed"), out

    def close(self) -> None:
        for close in self._closers:
            with contextlib.suppress(Exception):
                close()


# -- workers in child processes ---------------------------------------------------------


def _storm_worker(
    spec: Spec, keys: list[str], threads: int, start: Any, out: Any, index: int
) -> None:
    runner = Runner(spec)
    runs: list[str] = []
    statuses: list[str] = []
    lock = threading.Lock()

    def deliver(offset: int) -> None:
        order = keys[offset % len(keys) :] + keys[: offset % len(keys)]
        for key in order:

            def body(key: str = key) -> str:
                with lock:
                    runs.append(key)
                time.sleep(0.005)
                return f"{os.getpid()}"

            status, _ = runner.call(key, body)
            with lock:
                statuses.append(status)

    workers = [
        threading.Thread(target=deliver, args=(index * threads + t,)) for t in range(threads)
    ]
    start.wait(120)
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    runner.close()
    out.put((runs, statuses))


def _hold_worker(spec: Spec, key: str, value: str, claimed: Any, go: Any, out: Any) -> None:
    runner = Runner(spec)

    def body() -> str:
        claimed.set()
        if value == "__crash__":
            time.sleep(3600)
        go.wait(120)
        return value

    out.put(runner.call(key, body))
    runner.close()


# -- scenarios --------------------------------------------------------------------------


def _ctx() -> Any:
    return mp.get_context("spawn")


def storm(spec: Spec, keys: int = 30, procs: int = 4, threads: int = 4) -> dict[str, Any]:
    """K keys, each delivered procs x threads times at once: executions per key must be 1."""
    names = [f"storm-{uuid.uuid4().hex[:8]}-{i}" for i in range(keys)]
    runs: list[str] = []
    statuses: list[str] = []
    if spec.in_process:
        import queue as q

        out: Any = q.Queue()
        start: Any = threading.Event()
        ts = [
            threading.Thread(target=_storm_worker, args=(spec, names, threads, start, out, i))
            for i in range(procs)
        ]
        for t in ts:
            t.start()
        start.set()
        for t in ts:
            t.join(300)
        for _ in ts:
            r, s = out.get(timeout=5)
            runs += r
            statuses += s
    else:
        ctx = _ctx()
        out = ctx.Queue()
        start = ctx.Event()
        ps = [
            ctx.Process(target=_storm_worker, args=(spec, names, threads, start, out, i))
            for i in range(procs)
        ]
        for p in ps:
            p.start()
        time.sleep(0.2)
        start.set()
        for _ in ps:
            r, s = out.get(timeout=300)
            runs += r
            statuses += s
        for p in ps:
            p.join(30)
    per_key = dict.fromkeys(names, 0)
    for k in runs:
        per_key[k] += 1
    tally: dict[str, int] = {}
    for s in statuses:
        tally[s] = tally.get(s, 0) + 1
    return {
        "keys": keys,
        "deliveries": keys * procs * threads,
        "workers": f"{procs} {'threads' if spec.in_process else 'processes'} x {threads} threads",
        "executions": len(runs),
        "keys_not_exactly_once": sum(1 for n in per_key.values() if n != 1),
        "max_executions_per_key": max(per_key.values()),
        "outcomes": tally,
        "ok": all(n == 1 for n in per_key.values()),
    }


class _Holder:
    """Worker A: claims ``key`` and runs a body that stalls until released (a thread), or a
    child process that can be frozen (SIGSTOP) or killed (SIGKILL)."""

    def __init__(self, spec: Spec, key: str, value: str) -> None:
        self.spec = spec
        self.key = key
        if spec.in_process:
            import queue as q

            self.claimed: Any = threading.Event()
            self.go: Any = threading.Event()
            self.out: Any = q.Queue()
            self.proc: Any = threading.Thread(
                target=_hold_worker,
                args=(spec, key, value, self.claimed, self.go, self.out),
                daemon=True,
            )
        else:
            ctx = _ctx()
            self.claimed = ctx.Event()
            self.go = ctx.Event()
            self.out = ctx.Queue()
            self.proc = ctx.Process(
                target=_hold_worker, args=(spec, key, value, self.claimed, self.go, self.out)
            )
        self.proc.start()
        if not self.claimed.wait(30):
            raise RuntimeError("worker A never started its execution")
        self.claimed_at = time.monotonic()

    def signal(self, sig: signal.Signals) -> None:
        if not self.spec.in_process:
            os.kill(self.proc.pid, sig)

    def result(self, timeout: float = 60) -> tuple[str, str | None]:
        self.go.set()
        try:
            value: tuple[str, str | None] = self.out.get(timeout=timeout)
        except Exception:
            value = ("error:timeout", None)
        self.proc.join(10)
        return value


def _retry_until_run(
    runner: Runner, key: str, value: str, deadline: float
) -> tuple[str, str | None, float]:
    while True:
        status, out = runner.call(key, lambda: value)
        if status != "in_progress" or time.monotonic() > deadline:
            return status, out, time.monotonic()
        time.sleep(0.02)


def zombie(spec: Spec) -> dict[str, Any]:
    """A claims and freezes past its lease; B takes over and completes; A resumes and tries
    to complete. Counts double executions and whether A's late completion was accepted."""
    key = f"zombie-{uuid.uuid4().hex[:8]}"
    runner = Runner(spec)
    try:
        a = _Holder(spec, key, "A")
        a.signal(signal.SIGSTOP)
        b_status, b_value, b_at = _retry_until_run(
            runner, key, "B", time.monotonic() + spec.lease + 15
        )
        a.signal(signal.SIGCONT)
        a_status, _ = a.result()
        _final_status, final = runner.call(key, lambda: "reader")
    finally:
        runner.close()
    b_ran = b_status in ("executed", "lease_lost")
    return {
        "a": a_status,
        "b": b_status,
        "b_value": b_value,
        "takeover_after_s": round(b_at - a.claimed_at, 3),
        "final": final,
        "executions": 1 + int(b_ran),
        # the store took A's late completion over B's result
        "zombie_accepted": int(final == "A"),
        # A's caller was told it succeeded although its result is not the stored one
        "zombie_silent": int(a_status == "executed" and final != "A"),
        "consistent": final == b_value if b_ran else None,
        "ok": b_ran and a_status != "executed" and final == "B",
    }


def crash(spec: Spec) -> dict[str, Any]:
    """A claims and is SIGKILLed mid-run; how long until a retry can take over."""
    key = f"crash-{uuid.uuid4().hex[:8]}"
    runner = Runner(spec)
    try:
        a = _Holder(spec, key, "__crash__")
        killed = time.monotonic()
        if spec.in_process:
            killed = a.claimed_at  # an abandoned thread is the crash
        else:
            a.signal(signal.SIGKILL)
            a.proc.join(10)
        status, _, at = _retry_until_run(runner, key, "B", time.monotonic() + spec.lease + 15)
        if spec.in_process:
            a.go.set()
    finally:
        runner.close()
    return {
        "lease_s": spec.lease,
        "takeover_s": round(at - killed, 3) if status == "executed" else None,
        "retry": status,
        "ok": status == "executed",
    }


def waiters(spec: Spec, n: int = 8, hold: float = 0.3) -> dict[str, Any]:
    """n duplicates wait (on_in_progress="wait") while the first runs for ``hold`` s: how
    long after it completes each one returns, and whether any ran again."""
    key = f"wait-{uuid.uuid4().hex[:8]}"
    first = Runner(spec)
    waiting = Runner(spec, wait=10.0)
    claimed = threading.Event()
    done_at: list[float] = []
    lags: list[float] = []
    statuses: list[str] = []

    def body() -> str:
        claimed.set()
        time.sleep(hold)
        done_at.append(time.monotonic())
        return "A"

    def dup() -> None:
        status, _ = waiting.call(key, lambda: "dup")
        lags.append(time.monotonic())
        statuses.append(status)

    try:
        a = threading.Thread(target=lambda: first.call(key, body))
        a.start()
        claimed.wait(30)
        ds = [threading.Thread(target=dup) for _ in range(n)]
        for d in ds:
            d.start()
        a.join(60)
        for d in ds:
            d.join(60)
    finally:
        first.close()
        waiting.close()
    base = done_at[0] if done_at else 0.0
    waits = sorted((t - base) * 1000 for t in lags)
    tally: dict[str, int] = {}
    for s in statuses:
        tally[s] = tally.get(s, 0) + 1
    return {
        "waiters": n,
        "outcomes": tally,
        "lag_ms_p50": round(waits[len(waits) // 2], 1) if waits else None,
        "lag_ms_max": round(waits[-1], 1) if waits else None,
        "executions": 1 + statuses.count("executed"),
        "ok": statuses.count("replayed") == n,
    }


def skew(spec: Spec, skews: tuple[float, ...] = (0.5, 5.0, -5.0, 60.0, -60.0)) -> dict[str, Any]:
    """For client-clock stores: B's clock is off by s seconds and claims twice while A's
    lease is live (lease 2 s, B tries at 0.3 s and 1.5 s). A duplicate is a takeover of a
    live lease."""
    out: dict[str, Any] = {}
    lease = 2.0
    held = dataclasses.replace(spec, lease=lease)
    for s in skews:
        key = f"skew-{uuid.uuid4().hex[:8]}"
        a = _Holder(dataclasses.replace(held, store=held.store), key, "A")
        b = Runner(held, clock=SkewedClock(s))
        statuses: list[str] = []
        try:
            for at in (0.3, 1.5):
                time.sleep(max(0.0, a.claimed_at + at - time.monotonic()))
                statuses.append(b.call(key, lambda: "B")[0])
            a_status, _ = a.result()
        finally:
            b.close()
        out[f"{s:+g}s"] = {
            "b": statuses,
            "a": a_status,
            "duplicate_under_live_lease": any(st in ("executed", "lease_lost") for st in statuses),
        }
    return out


def _ensure_table(spec: Spec) -> None:
    """A DynamoDB table may be missing when only races run (the latency rigs create it)."""
    if spec.store is not None or spec.target.kind != "dynamodb":
        return
    from idem_core import open_store

    store = open_store(race_url(spec.target, spec.tag))
    try:
        store.setup()  # type: ignore[attr-defined]
    finally:
        store.close()


def run_races(
    spec: Spec, which: tuple[str, ...] = RACES, report: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.store is None and spec.target.kind == "memory":
        from idem_core import open_store

        # every worker of an in-process race shares one store
        spec = dataclasses.replace(spec, store=open_store(spec.target.url))
    if spec.system == "idem-core":
        try:
            _ensure_table(spec)
        except Exception as exc:  # the server is gone: every race says so, the run goes on
            return {name: {"error": f"{type(exc).__name__}: {exc}"[:300]} for name in which}
    for name in which:
        if name == "skew":
            if spec.system != "idem-core":
                out[name] = {"skipped": "the peers take no injectable clock"}
                continue
            if not spec.target.client_clock:
                out[name] = {"skipped": "leases are judged by the server's clock"}
                continue
            if spec.in_process:
                out[name] = {"skipped": "one process shares one clock"}
                continue
        if name == "waiters" and spec.system == "powertools":
            out[name] = {"skipped": "Powertools has no wait mode (raises in progress)"}
            continue
        report(f"{spec.system} on {spec.target.name}: {name}")
        t0 = time.monotonic()
        try:
            fn: Callable[[Spec], dict[str, Any]] = {
                "storm": storm,
                "zombie": zombie,
                "crash": crash,
                "waiters": waiters,
                "skew": skew,
            }[name]
            out[name] = fn(spec)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        out[name]["seconds"] = round(time.monotonic() - t0, 2)
    _drop_race_table(spec)
    return out


def _drop_race_table(spec: Spec) -> None:
    """The race table of a shared SQL server (SQLite lives in a temporary folder)."""
    target = spec.target
    if spec.system != "idem-core" or target.kind != "sql" or target.database == "sqlite":
        return
    try:
        from sqlalchemy import create_engine

        engine = create_engine(target.url.split("?", 1)[0])
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS idem_race_{spec.tag}")
        finally:
            engine.dispose()
    except Exception:
        pass


__all__ = ["LEASE", "RACES", "Runner", "Spec", "run_races"]
