"""Cost as the keyspace grows (opt-in: ``--scenario keyspace``, ``--keyspace N``).

On a fresh table (SQL) or key prefix (Redis): first-call and replay p50 with a handful of
records, then again with N live records (completed, 200-byte results) copied in by
:mod:`.fill`; then, on the SQL stores, N expired records more and ``idem purge`` (the CLI's
own function, batch 1000) deleting them while live first calls run in this process: the
purge's rate and those calls' p50/p99.

Redis runs on a server the bench starts for it when the target is the loopback server others
share (N records would crowd it), else on the given server, whose copies are deleted after.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from idem_core import Idempotency

from . import fill, latency, targets
from .rigs import LEASE, TTL, charge, run_tag
from .targets import Target

DEFAULT_RECORDS = 1_000_000
RESULT = b"r" * 200
PURGE_BATCH = 1000


def supports(target: Target) -> bool:
    return (target.kind == "redis" and not target.cluster) or (
        target.kind == "sql" and target.database in ("sqlite", "postgresql", "mysql")
    )


def run(
    target: Target,
    records: int = DEFAULT_RECORDS,
    seconds: float = 1.0,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    if not supports(target):
        return {"target": target.name, "skipped": "SQL and standalone Redis only"}
    with _server(target) as (server, note, private):
        out: dict[str, Any] = {"target": target.name, "records": records, "server": note}
        if server.kind == "redis" and server.shared:
            out["skipped"] = (
                "no redis-server on PATH to start a private one: the shared server is not "
                "filled (give a server of yours with --url)"
            )
            return out
        try:
            _measure(server, private, records, seconds, say, out)
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"[:400]
        return out


@contextlib.contextmanager
def _server(target: Target) -> Iterator[tuple[Target, str, bool]]:
    """(where to run, what it is, whether the bench started it)."""
    if target.kind == "redis" and target.shared:
        private = targets.PrivateRedis.start()
        if private is not None:
            try:
                yield targets.target_for_url(private.url, target.name), private.describe(), True
            finally:
                private.stop()
            return
    yield target, "the target's own server", False


def _measure(
    target: Target,
    private: bool,
    records: int,
    seconds: float,
    say: Callable[[str], None],
    out: dict[str, Any],
) -> None:
    tag = run_tag()
    table = f"idem_ks_{tag}"
    prefix = f"idemks:{tag}:"
    if target.kind == "sql":
        out["table"] = table
        url = targets.with_params(target.url, table=table)
        idem = Idempotency.from_url(url, namespace=f"ks{tag}", ttl=TTL, lease=LEASE)
    else:
        out["prefix"] = prefix
        url = target.url
        idem = Idempotency.from_url(
            url, namespace=f"ks{tag}", ttl=TTL, lease=LEASE, store_options={"prefix": prefix}
        )
    store = idem.store
    live, dead = f"TPL{tag}live", f"TPL{tag}dead"
    engine = fill.sql_engine(target) if target.kind == "sql" else None
    redis = None
    try:
        fill.make_template(store, live, RESULT, TTL)
        if engine is not None:
            fill.make_template(store, dead, RESULT, 0.001)  # expired a millisecond later
            layout = fill.key_columns(engine, table, live)
        fn = idem.idempotent(key="order_id", scope="ks")(charge)
        pool = [f"{tag}r{i}" for i in range(latency.REPLAY_POOL)]
        for key in pool:
            fn(key, 1)
        out["empty"] = _cells(fn, pool, f"{tag}e", seconds)
        say(f"filling {records:,} live records")
        copies = f"ks{tag}L"
        if engine is not None:
            took = fill.fill_sql(engine, table, live, copies, records, layout)
            out["rows_after_fill"] = fill.count_rows(engine, table)
        else:
            redis = _redis(target)
            took = fill.fill_redis(redis, prefix, live, copies, records)
            out["keys_after_fill"] = int(redis.dbsize())
        fill.check_sample(store, copies, records)
        out["fill"] = {"seconds": round(took, 6), "records_per_s": round(records / took)}
        say(f"{records:,} live records: timing")
        out["full"] = _cells(fn, pool, f"{tag}g", seconds)
        if engine is None:
            out["purge"] = {"skipped": "Redis expires keys itself (idem purge has nothing to do)"}
            return
        say(f"filling {records:,} expired records")
        took = fill.fill_sql(engine, table, dead, f"ks{tag}D", records, layout)
        out["fill_expired"] = {"seconds": round(took, 6), "records_per_s": round(records / took)}
        say(f"idem purge of {records:,} expired records, live calls meanwhile")
        out["purge"] = _purge(url, fn, f"{tag}p")
        out["rows_after_purge"] = fill.count_rows(engine, table)
    finally:
        with contextlib.suppress(Exception):
            idem.close()
        if engine is not None:
            from .rigs import _drop

            with contextlib.suppress(Exception):
                _drop(engine, table)
                if engine.dialect.name == "sqlite":  # give the file its space back
                    with engine.connect() as conn:
                        conn.exec_driver_sql("VACUUM")
            engine.dispose()
        if redis is not None:
            if not private:
                fill.delete_redis(redis, f"{prefix}*")
            redis.close()


def _redis(target: Target) -> Any:
    import redis

    return redis.Redis.from_url(target.server or "redis://127.0.0.1:6379/0")


def _cells(fn: Callable[..., Any], pool: list[str], tag: str, seconds: float) -> dict[str, Any]:
    n = len(pool)
    first = latency.sync_cell(lambda i: fn(f"{tag}{i}", 1), 1, seconds, 1_000_000, False)
    replay = latency.sync_cell(lambda i: fn(pool[i % n], 1), 1, seconds, 1_000_000, False)
    return {"first": first, "replay": replay}


def _purge(url: str, fn: Callable[..., Any], tag: str) -> dict[str, Any]:
    """``idem purge URL`` in a thread; first calls on new keys here until it returns."""
    from idem_core import cli

    printed = io.StringIO()
    box: dict[str, Any] = {}

    def purge() -> None:
        t0 = time.perf_counter()
        try:
            box["rc"] = cli.purge(url, PURGE_BATCH, printed)
        except BaseException as exc:
            box["error"] = f"{type(exc).__name__}: {exc}"[:300]
        box["seconds"] = time.perf_counter() - t0

    hist = latency.new_hist()
    clock = time.perf_counter_ns
    thread = threading.Thread(target=purge, daemon=True)
    t0 = clock()
    thread.start()
    i = 0
    while True:  # at least one call, however fast the purge
        s = clock()
        fn(f"{tag}{i}", 1)
        hist.record_value(max(1, clock() - s))
        i += 1
        if not thread.is_alive():
            break
    thread.join()
    calls = latency.summarize(hist, hist.get_total_count(), (clock() - t0) / 1e9, False)
    if "error" in box:
        return {"error": box["error"], "claims": calls}
    found = re.search(r"purged (\d+)", printed.getvalue())
    purged = int(found.group(1)) if found else 0
    return {
        "records": purged,
        "seconds": round(box["seconds"], 6),
        "records_per_s": round(purged / box["seconds"]) if box["seconds"] > 0 else None,
        "batch": PURGE_BATCH,
        "claims": calls,
    }
