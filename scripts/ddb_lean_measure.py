"""Client CPU and latency of a first call and a replay on DynamoDB, and a Lambda-like cold
start: idem-core on the lean path, idem-core on boto3 only (``lean=0``) and Powertools,
interleaved on the same server. Not a test (timings); see docs/backends/dynamodb.md.

    .venv/bin/python scripts/ddb_lean_measure.py --endpoint http://127.0.0.1:PORT \
        [--calls 300] [--rounds 5] [--cold 10]

Client CPU is ``time.process_time()`` around each call in this process (the server is
another process); p50 of wall time likewise. Cold start: a fresh ``python -c`` process that
imports the library, opens the store and makes one first call (wall time of the process,
and its CPU from ``resource.getrusage(RUSAGE_CHILDREN)``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

REGION = "us-east-1"
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
ENV["AWS_DEFAULT_REGION"] = REGION


def charge(order_id: str, amount: int) -> dict[str, Any]:
    return {"order": order_id, "amount": amount, "status": "paid"}


def ours(endpoint: str, lean: bool) -> tuple[Callable[[str], Any], Callable[[], None]]:
    from idem_core import Idempotency

    url = f"dynamodb://idem_lean_bench?region={REGION}&endpoint_url={endpoint}"
    idem = Idempotency.from_url(url + ("" if lean else "&lean=0"), ttl=600, lease=30)
    idem.store.setup()  # type: ignore[attr-defined]
    fn = idem.idempotent(key="order_id")(charge)
    return (lambda key: fn(key, 1)), idem.close


def powertools(endpoint: str) -> tuple[Callable[[str], Any], Callable[[], None]]:
    import boto3
    from aws_lambda_powertools.utilities.idempotency import (
        DynamoDBPersistenceLayer,
        IdempotencyConfig,
        idempotent_function,
    )

    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=endpoint)
    table = "idem_lean_bench_pt"
    try:
        client.describe_table(TableName=table)
    except client.exceptions.ResourceNotFoundException:
        client.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
    layer = DynamoDBPersistenceLayer(table_name=table, boto3_client=client)
    config = IdempotencyConfig(event_key_jmespath="order_id", expires_after_seconds=600)

    @idempotent_function(data_keyword_argument="order", persistence_store=layer, config=config)
    def pt(order: dict[str, Any]) -> dict[str, Any]:
        return charge(order["order_id"], 1)

    return (lambda key: pt(order={"order_id": key, "amount": 1})), client.close


async def ours_async(endpoint: str, lean: bool) -> tuple[Callable[[str], Awaitable[Any]], Any]:
    from idem_core import Idempotency

    url = f"dynamodb://idem_lean_bench?region={REGION}&endpoint_url={endpoint}"
    idem = Idempotency.from_url(url + ("" if lean else "&lean=0"), ttl=600, lease=30)

    async def acharge(order_id: str, amount: int) -> dict[str, Any]:
        return charge(order_id, amount)

    fn = idem.idempotent(key="order_id")(acharge)
    return (lambda key: fn(key, 1)), idem.aclose


def measure(call: Callable[[str], Any], n: int) -> dict[str, float]:
    first_wall, first_cpu, replay_wall, replay_cpu = [], [], [], []
    tag = uuid.uuid4().hex[:8]
    for i in range(n):
        key = f"{tag}-{i}"
        for walls, cpus in ((first_wall, first_cpu), (replay_wall, replay_cpu)):
            c0, t0 = time.process_time(), time.perf_counter()
            call(key)
            t1, c1 = time.perf_counter(), time.process_time()
            walls.append(t1 - t0)
            cpus.append(c1 - c0)
    return _summary(first_wall, first_cpu, replay_wall, replay_cpu)


async def ameasure(call: Callable[[str], Awaitable[Any]], n: int) -> dict[str, float]:
    first_wall, first_cpu, replay_wall, replay_cpu = [], [], [], []
    tag = uuid.uuid4().hex[:8]
    for i in range(n):
        key = f"{tag}-{i}"
        for walls, cpus in ((first_wall, first_cpu), (replay_wall, replay_cpu)):
            c0, t0 = time.process_time(), time.perf_counter()
            await call(key)
            t1, c1 = time.perf_counter(), time.process_time()
            walls.append(t1 - t0)
            cpus.append(c1 - c0)
    return _summary(first_wall, first_cpu, replay_wall, replay_cpu)


def _summary(
    fw: list[float], fc: list[float], rw: list[float], rc: list[float]
) -> dict[str, float]:
    ms = 1000.0
    return {
        "first_p50_ms": statistics.median(fw) * ms,
        "first_cpu_ms": statistics.mean(fc) * ms,
        "replay_p50_ms": statistics.median(rw) * ms,
        "replay_cpu_ms": statistics.mean(rc) * ms,
    }


COLD = {
    "idem-core lean": """
import uuid
from idem_core import Idempotency
idem = Idempotency.from_url("dynamodb://idem_lean_bench?region=us-east-1&endpoint_url={ep}")
@idem.idempotent(key="order_id")
def charge(order_id, amount):
    return {{"order": order_id}}
charge(uuid.uuid4().hex, 1)
""",
    "idem-core lean=0": """
import uuid
from idem_core import Idempotency
idem = Idempotency.from_url("dynamodb://idem_lean_bench?region=us-east-1&endpoint_url={ep}&lean=0")
@idem.idempotent(key="order_id")
def charge(order_id, amount):
    return {{"order": order_id}}
charge(uuid.uuid4().hex, 1)
""",
    "powertools": """
import uuid
import boto3
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer, IdempotencyConfig, idempotent_function)
client = boto3.client("dynamodb", region_name="us-east-1", endpoint_url="{ep}")
layer = DynamoDBPersistenceLayer(table_name="idem_lean_bench_pt", boto3_client=client)
config = IdempotencyConfig(event_key_jmespath="order_id", expires_after_seconds=600)
@idempotent_function(data_keyword_argument="order", persistence_store=layer, config=config)
def charge(order):
    return {{"order": order["order_id"]}}
charge(order={{"order_id": uuid.uuid4().hex}})
""",
}


def cold(endpoint: str, rounds: int) -> dict[str, dict[str, float]]:
    # Byte-code caches as an installed package has them (pip compiles site-packages; with
    # PYTHONDONTWRITEBYTECODE a source checkout would be compiled anew in every process).
    env = {k: v for k, v in {**os.environ, **ENV}.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for code in COLD.values():  # writes the caches
        subprocess.run([sys.executable, "-W", "ignore", "-c", code.format(ep=endpoint)], env=env)
    walls: dict[str, list[float]] = {k: [] for k in COLD}
    cpus: dict[str, list[float]] = {k: [] for k in COLD}
    for _ in range(rounds):
        for name, code in COLD.items():  # interleaved
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            argv = [sys.executable, "-W", "ignore", "-c", code.format(ep=endpoint)]
            subprocess.run(argv, env=env, check=True)
            walls[name].append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {
        k: {
            "wall_p50_ms": statistics.median(walls[k]) * 1000,
            "cpu_p50_ms": statistics.median(cpus[k]) * 1000,
        }
        for k in COLD
    }


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cold", type=int, default=10)
    p.add_argument("--no-async", action="store_true")
    args = p.parse_args()
    os.environ.update(ENV)
    ep = args.endpoint
    systems = {
        "idem-core lean": ours(ep, True),
        "idem-core lean=0": ours(ep, False),
        "powertools": powertools(ep),
    }
    for call, _ in systems.values():  # warm up: clients, connections, code paths
        measure(call, 20)
    results: dict[str, list[dict[str, float]]] = {k: [] for k in systems}
    for _ in range(args.rounds):
        for name, (call, _) in systems.items():
            results[name].append(measure(call, args.calls // args.rounds))
    print(f"sync, {args.calls} first calls + replays each, interleaved in {args.rounds} rounds")
    _print(results)
    for _, close in systems.values():
        close()
    if not args.no_async:

        async def run_async() -> dict[str, list[dict[str, float]]]:
            rigs = {
                "idem-core lean (async)": await ours_async(ep, True),
                "idem-core lean=0 (async)": await ours_async(ep, False),
            }
            for call, _ in rigs.values():
                await ameasure(call, 20)
            out: dict[str, list[dict[str, float]]] = {k: [] for k in rigs}
            for _ in range(args.rounds):
                for name, (call, _) in rigs.items():
                    out[name].append(await ameasure(call, args.calls // args.rounds))
            for _, close in rigs.values():
                await close()
            return out

        print("async (Powertools has no async DynamoDB layer)")
        _print(asyncio.run(run_async()))
    if args.cold:
        print(
            f"cold start: fresh process, import + open + first call; {args.cold} interleaved runs"
        )
        for name, r in cold(ep, args.cold).items():
            wall, cpu = r["wall_p50_ms"], r["cpu_p50_ms"]
            print(f"  {name:28s} wall p50 {wall:7.1f} ms   CPU p50 {cpu:7.1f} ms")


def _print(results: dict[str, list[dict[str, float]]]) -> None:
    cols = f"{'first p50':>10s} {'first CPU':>10s} {'replay p50':>11s} {'replay CPU':>11s}"
    print(f"  {'system':28s} {cols}  (ms; median of rounds)")
    for name, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(
            f"  {name:28s} {med['first_p50_ms']:10.2f} {med['first_cpu_ms']:10.2f} "
            f"{med['replay_p50_ms']:11.2f} {med['replay_cpu_ms']:11.2f}"
        )


if __name__ == "__main__":
    main()
