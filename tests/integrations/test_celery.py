"""Celery tasks made idempotent per key, with steps, on a real worker: RabbitMQ at
127.0.0.1:5672 as the broker, Redis at 127.0.0.1:6379 as the result backend and store.

Duplicates are delivered (the same message twice, the same key in other messages); a worker
is SIGKILLed after step 2 of 4 (the whole worker with the solo pool: ``acks_late`` gives the
message back; only the pool's child with prefork: ``reject_on_worker_lost`` requeues it). Each
step's side effect happens once, and the retry resumes at step 3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import port_open, server_missing

pytest.importorskip("celery")

HERE = Path(__file__).resolve().parent


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    if not port_open("127.0.0.1", 5672):
        server_missing("RabbitMQ", "nothing listens on 127.0.0.1:5672")
    if not port_open("127.0.0.1", 6379):
        server_missing("Redis", "nothing listens on 127.0.0.1:6379")
    queue = f"idem-celery-{uuid.uuid4().hex[:10]}"
    values = {
        "IDEM_CELERY_QUEUE": queue,
        "IDEM_CELERY_LOG": str(tmp_path / "effects.log"),
        "IDEM_CELERY_HANG": str(tmp_path / "hang"),
        "IDEM_CELERY_STORE": f"redis://127.0.0.1:6379/0?prefix={queue}:",
    }
    (tmp_path / "effects.log").touch()
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    sys.path.insert(0, str(HERE))
    sys.modules.pop("celery_app", None)
    try:
        yield values
    finally:
        sys.modules.pop("celery_app", None)
        sys.path.remove(str(HERE))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Worker:
    """A ``celery worker`` process in a session of its own (so its pool goes with it)."""

    def __init__(self, env: dict[str, str], pool: str, log: Path) -> None:
        self.out = log
        argv = [sys.executable, "-m", "celery", "-A", "celery_app", "worker"]
        argv += ["-Q", env["IDEM_CELERY_QUEUE"], f"--pool={pool}", "--concurrency=2"]
        argv += ["--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "info"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=HERE,
                env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def effects(env: dict[str, str], order: str) -> list[tuple[int, str]]:
    out = []
    for line in Path(env["IDEM_CELERY_LOG"]).read_text().splitlines():
        pid, order_id, step = line.split()
        if order_id == order:
            out.append((int(pid), step))
    return out


def wait_for(what: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_duplicates_run_each_step_once(env: dict[str, str], tmp_path: Path) -> None:
    from celery_app import place_order

    order = uuid.uuid4().hex[:8]
    worker = Worker(env, "prefork", tmp_path / "worker.log")
    try:
        task_id = uuid.uuid4().hex
        sent = [
            place_order.apply_async((order,), task_id=task_id),
            place_order.apply_async((order,), task_id=task_id),  # the same message again
            place_order.apply_async((order,)),  # the same key in other messages
            place_order.apply_async(kwargs={"order_id": order}),
        ]
        results = [r.get(timeout=90) for r in sent]
    finally:
        worker.stop()
    steps = effects(env, order)
    assert [s for _, s in steps] == ["step1", "step2", "step3", "step4"], steps
    assert len({pid for pid, _ in steps}) == 1
    assert all(r == results[0] for r in results), results


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_killed_worker_resumes_at_step_three(
    env: dict[str, str], tmp_path: Path, pool: str
) -> None:
    from celery_app import place_order

    order = uuid.uuid4().hex[:8]
    Path(env["IDEM_CELERY_HANG"]).touch()
    first = Worker(env, pool, tmp_path / "worker1.log")
    second: Worker | None = None
    try:
        result = place_order.delay(order)
        wait_for(lambda: [s for _, s in effects(env, order)][-1:] == ["hanging"], 90)
        (killed,) = {pid for pid, _ in effects(env, order)}
        Path(env["IDEM_CELERY_HANG"]).unlink()
        if pool == "solo":
            first.kill()  # the whole worker: the unacknowledged message goes back
            second = Worker(env, pool, tmp_path / "worker2.log")
        else:
            os.kill(killed, signal.SIGKILL)  # the pool's child: the worker requeues it
        value = result.get(timeout=120)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    steps = effects(env, order)
    assert [s for _, s in steps] == ["step1", "step2", "hanging", "step3", "step4"], steps
    heirs = {pid for pid, s in steps if s in ("step3", "step4")}
    assert len(heirs) == 1 and killed not in heirs
    (heir,) = heirs
    assert value == [
        f"step1 by {killed}",
        f"step2 by {killed}",
        f"step3 by {heir}",
        f"step4 by {heir}",
    ]
