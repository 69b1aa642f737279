"""``idem``: check, set up and purge stores, operate on records (:mod:`.cli_ops`), and run
the benchmarks."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import cli_ops
from .errors import IdempotencyError
from .record import ClaimRequest
from .registry import open_store
from .store import Store


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def check(url: str, out: Any = sys.stdout) -> int:
    """Claim, complete, read back and delete one record; print timings, clock skew and the
    store's diagnostics. Returns 0 when all is well, 1 when a problem is listed (the store
    works but is set up so that records can be lost or calls run twice)."""
    store = open_store(url)
    try:
        problems = _round_trip(store, url, out)
        diagnostics = getattr(store, "diagnostics", None)
        facts: dict[str, object] = dict(diagnostics()) if diagnostics is not None else {}
        listed = facts.pop("problems", None)
        if isinstance(listed, list | tuple):
            problems.extend(str(p) for p in listed)
        for name, value in facts.items():
            print(f"  {name}: {value}", file=out)
        if facts.get("backend") == "redis":
            problems.extend(_redis_persistence(store, out))
    finally:
        store.close()
    for problem in problems:
        print(f"PROBLEM: {problem}", file=out)
    if problems:
        print(f"{len(problems)} problem(s) found", file=out)
        return 1
    print("OK", file=out)
    return 0


def _round_trip(store: Store, url: str, out: Any) -> list[str]:
    key = f"idem-check:{uuid.uuid4().hex}"
    req = ClaimRequest(key, "0" * 32, uuid.uuid4().hex, 30.0, 60.0)
    timings: list[tuple[str, float]] = []

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        value = fn(*args)
        timings.append((name, time.perf_counter() - t0))
        return value

    res = timed("claim", store.claim, req)
    timed("complete", store.complete, key, res.fence, b"\x01\xa2ok", 60.0)
    rec = timed("get", store.get, key)
    timed("delete", store.delete, key)
    print(f"store: {url}  ({type(store).__module__}.{type(store).__qualname__})", file=out)
    for name, took in timings:
        print(f"  {name:<9} {_ms(took)}", file=out)
    print(f"  total     {_ms(sum(t for _, t in timings))}", file=out)
    if store.server_clock:
        t0 = time.time()
        server = store.now() / 1e6
        t1 = time.time()
        skew = server - (t0 + t1) / 2
        print(f"  clock skew (server - local): {skew * 1000:+.3f} ms", file=out)
    else:
        print("  clock: leases are judged by this client's clock", file=out)
    if rec is None or rec.result != b"\x01\xa2ok":
        return [f"the record read back does not match what was written: {rec!r}"]
    return []


def _redis_persistence(store: Any, out: Any) -> list[str]:
    """A Redis that keeps nothing on disk loses every record on a restart: each retry after
    it runs again. Read with ``CONFIG GET`` on every primary (managed services may refuse
    it: then it is reported as unknown)."""
    from redis.exceptions import RedisError

    client = getattr(store, "client", None)
    if client is None:
        return []
    nodes: dict[str, dict[str, str]] = {}
    try:
        for name in ("save", "appendonly"):
            if getattr(store, "cluster", False):
                from redis.cluster import RedisCluster

                reply = client.config_get(name, target_nodes=RedisCluster.PRIMARIES)
            else:
                reply = client.config_get(name)
            # Several nodes answer {node: {name: value}}; one answers {name: value}.
            per_node = reply if all(isinstance(v, dict) for v in reply.values()) else {"": reply}
            for node, conf in per_node.items():
                nodes.setdefault(str(node), {}).update({str(k): str(v) for k, v in conf.items()})
    except RedisError as exc:
        print(f"  on disk: unknown (CONFIG GET refused: {_one_line(exc)})", file=out)
        return []
    problems = []
    for node, conf in sorted(nodes.items()):
        save, aof = conf.get("save", ""), conf.get("appendonly", "")
        where = f" on {node}" if node else ""
        print(f"  on disk{where}: save={save!r} appendonly={aof!r}", file=out)
        if not save.strip() and aof.lower() != "yes":
            problems.append(
                f"Redis keeps nothing on disk{where} (save is empty and appendonly is no): a "
                "restart loses every record, and every retry after it runs again; enable AOF "
                "(appendonly yes) or RDB snapshots (save)"
            )
    return problems


def setup(url: str, out: Any = sys.stdout) -> int:
    store = open_store(url)
    try:
        fn = getattr(store, "setup", None)
        print(fn() if fn is not None else f"{url}: nothing to set up", file=out)
        return 0
    finally:
        store.close()


def purge(url: str, batch: int, out: Any = sys.stdout) -> int:
    store: Store = open_store(url)
    try:
        fn = getattr(store, "purge_expired", None)
        if fn is None:
            print(f"{url}: this store expires records itself; nothing to purge", file=out)
            return 0
        print(f"purged {fn(batch=batch)} expired records", file=out)
        return 0
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from idem_bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="idem", description="idem-core command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="claim, complete, read back and delete one record")
    p.add_argument("url")
    p = sub.add_parser("setup", help="create the table, indexes and TTL settings")
    p.add_argument("url")
    p = sub.add_parser("purge", help="delete expired records in bounded batches")
    p.add_argument("url")
    p.add_argument("--batch", type=int, default=1000)
    sub.add_parser("bench", help="run the benchmarks (idem bench --help)")
    cli_ops.add_parsers(sub)
    args = parser.parse_args(argv)
    try:
        if args.command in cli_ops.COMMANDS:
            return cli_ops.run(args)
        if args.command == "check":
            return check(args.url)
        if args.command == "setup":
            return setup(args.url)
        return purge(args.url, args.batch)
    except cli_ops.RecordNotFound as exc:
        print(f"idem: {args.command} {_masked(args.url)}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # One line, no traceback: a bad URL, an unreachable server, a wrong option or a
        # missing extra is the user's to fix, and the message says what it is.
        print(f"idem: {args.command} {_masked(args.url)}: {_one_line(exc)}", file=sys.stderr)
        return 2


def _masked(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return url


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    if not isinstance(exc, IdempotencyError):
        return f"{type(exc).__module__}.{type(exc).__qualname__}: {text}"
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    raise SystemExit(main())
