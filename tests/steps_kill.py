"""The kill test shared by the stores' suites: a worker process is SIGKILLed after step 2 of
4; the retry (another process) takes the key over and resumes at step 3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

WORKER = str(Path(__file__).with_name("steps_worker.py"))


def _start(url: str, ns: str, order: str, log: Path, hang: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, WORKER, url, ns, order, str(log), "1" if hang else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _lines(log: Path) -> list[tuple[int, str]]:
    out = []
    for line in log.read_text().splitlines():
        pid, step = line.split()
        out.append((int(pid), step))
    return out


def kill_after_step_two_then_resume(url: str, tmp_path: Path) -> None:
    ns = f"kill{uuid.uuid4().hex[:8]}"
    order = uuid.uuid4().hex
    log = tmp_path / "effects.log"
    log.touch()
    first = _start(url, ns, order, log, hang=True)
    try:
        assert first.stdout is not None
        deadline = time.monotonic() + 60
        for line in first.stdout:
            if line.strip() == "after step2" or time.monotonic() > deadline:
                break
        else:
            raise AssertionError(f"the worker died early: {first.stderr and first.stderr.read()}")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    killed = first.pid
    assert _lines(log) == [(killed, "step1"), (killed, "step2")]

    # The retry: a new process; the key is still held until the lease (1 s) lapses, so it
    # waits, then takes the key over.
    retry = _start(url, ns, order, log, hang=False)
    out, err = retry.communicate(timeout=120)
    assert retry.returncode == 0, err
    assert "outcome took_over" in out, out
    heir = retry.pid
    assert _lines(log) == [
        (killed, "step1"),
        (killed, "step2"),
        (heir, "step3"),
        (heir, "step4"),
    ], "steps 1-2 must not run again; the retry resumes at step 3"
    expected = f"step1 by {killed}|step2 by {killed}|step3 by {heir}|step4 by {heir}"
    assert f"result {expected}" in out, out

    # A duplicate delivered after completion replays the result and runs nothing.
    dup = _start(url, ns, order, log, hang=False)
    out, err = dup.communicate(timeout=60)
    assert dup.returncode == 0, err
    assert f"result {expected}" in out and "outcome" not in out, out
    assert len(_lines(log)) == 4
