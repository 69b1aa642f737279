"""Lambda cold start on DynamoDB (``--scenario coldstart``; Powertools too with ``--peers``).

What a Lambda pays on its first invocation: a fresh Python process imports the library, opens
the store (a DynamoDB client: credentials, endpoint, the service model) and makes one first
call. Each run is a new process started with the bench's interpreter; the child times its own
phases (import, open, first call) and the parent the whole process, start to exit. Systems run
interleaved, :data:`RUNS` times each, and the report gives the medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from . import rigs, targets
from .targets import Target

RUNS = 7

_PRELUDE = """
import json, sys, time
t0 = time.perf_counter()
"""

_OURS = """
from idem_core import Idempotency
t1 = time.perf_counter()
idem = Idempotency.from_url(URL)
def charge(order_id, amount):
    return {"order": order_id, "amount": amount}
fn = idem.idempotent(key="order_id")(charge)
t2 = time.perf_counter()
fn(KEY, 1)
t3 = time.perf_counter()
"""

_POWERTOOLS = """
import boto3
from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
from aws_lambda_powertools.utilities.idempotency.persistence.dynamodb import (
    DynamoDBPersistenceLayer,
)
t1 = time.perf_counter()
layer = DynamoDBPersistenceLayer(
    table_name=TABLE,
    boto3_client=boto3.client("dynamodb", endpoint_url=ENDPOINT, region_name=REGION),
)
config = IdempotencyConfig(event_key_jmespath="order_id", expires_after_seconds=900)
@idempotent_function(data_keyword_argument="order", persistence_store=layer, config=config)
def charge(order):
    return {"order": order["order_id"], "amount": 1}
t2 = time.perf_counter()
charge(order={"order_id": KEY, "amount": 1})
t3 = time.perf_counter()
"""

_REPORT = """
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "open_ms": (t2 - t1) * 1e3,
                  "first_call_ms": (t3 - t2) * 1e3, "in_process_ms": (t3 - t0) * 1e3}))
"""

POWERTOOLS_TABLE = "idem_bench_powertools"
FIELDS = ("import_ms", "open_ms", "first_call_ms", "in_process_ms", "process_ms")


def supports(target: Target) -> bool:
    return target.kind == "dynamodb"


def powertools_available() -> bool:
    try:
        import aws_lambda_powertools  # noqa: F401
    except ImportError:
        return False
    return True


def _program(system: str, target: Target, key: str) -> str:
    body = _OURS if system == "idem-core" else _POWERTOOLS
    values = {
        "URL": target.url,
        "KEY": key,
        "TABLE": POWERTOOLS_TABLE,
        "ENDPOINT": target.server,
        "REGION": targets.REGION,
    }
    consts = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    return _PRELUDE + consts + body + _REPORT


def one(system: str, target: Target, key: str) -> dict[str, float]:
    """One fresh process: its phases (ms, its own clock) and its wall time (ms, ours)."""
    env = dict(os.environ)
    for name, value in targets.FAKE_AWS.items():
        env.setdefault(name, value)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _program(system, target, key)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    wall = (time.perf_counter() - started) * 1e3
    if done.returncode != 0:
        raise RuntimeError(f"{system} cold start failed: {done.stderr.strip()[-300:]}")
    phases: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    phases["process_ms"] = wall
    return phases


def _byte_compile() -> None:
    """Both libraries start from bytecode, as ``pip install`` leaves a wheel (it compiles
    every module; a Lambda layer ships those ``.pyc`` files). Powertools and boto3 in
    site-packages already are; idem-core, installed editable from this checkout, would
    otherwise be compiled from source in every fresh process (tens of ms; the test machine
    sets ``PYTHONDONTWRITEBYTECODE``, so nothing is ever cached)."""
    import compileall

    import idem_dynamodb

    import idem_core

    for package in (idem_core, idem_dynamodb):
        compileall.compile_dir(os.path.dirname(package.__file__ or ""), quiet=1)


def _prepare(target: Target, systems: list[str]) -> None:
    """Tables exist before the first process: a cold start does not create its table."""
    from idem_core import Idempotency

    _byte_compile()

    with Idempotency.from_url(target.url) as idem:
        getattr(idem.store, "setup", lambda: None)()
    if "powertools" in systems:
        client = rigs._boto_client(target.server)
        try:
            rigs.ensure_table(client, POWERTOOLS_TABLE, "id")
        finally:
            client.close()


def run(target: Target, peers: bool, runs: int = RUNS) -> dict[str, Any]:
    systems = ["idem-core"]
    if peers and powertools_available():
        systems.append("powertools")
    out: dict[str, Any] = {"target": target.name, "runs": runs, "systems": {}}
    try:
        _prepare(target, systems)
        samples: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
        tag = rigs.run_tag()
        # a bare interpreter's start and exit, to tell the libraries' part from Python's
        python = []
        for i in range(runs):
            for system in systems:  # interleaved, so drifts in load hit both
                samples[system].append(one(system, target, f"cold-{tag}-{system}-{i}"))
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            python.append((time.perf_counter() - t0) * 1e3)
        out["python_ms"] = round(statistics.median(python), 1)
        for system, runs_of in samples.items():
            out["systems"][system] = {
                field: round(statistics.median(r[field] for r in runs_of), 1) for field in FIELDS
            }
        if "powertools" in out["systems"]:
            ours, theirs = out["systems"]["idem-core"], out["systems"]["powertools"]
            out["to_powertools"] = {
                field: round(ours[field] / theirs[field], 2)
                for field in ("in_process_ms", "process_ms")
                if theirs[field] > 0
            }
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:400]
    return out
