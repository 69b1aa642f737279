"""A worker SIGKILLed after step 2 of 4; the retry resumes at step 3 (moto and DynamoDB Local).

``skew_allowance=0``: the successor takes the lapsed lease over by the wall clock, at once."""

from __future__ import annotations

from pathlib import Path

from ddb_servers import Server
from steps_kill import kill_after_step_two_then_resume


def test_killed_worker_resumes_at_step_three(server: Server, tmp_path: Path) -> None:
    kill_after_step_two_then_resume(server.url(skew_allowance=0), tmp_path)
