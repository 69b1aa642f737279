"""A worker SIGKILLed after step 2 of 4; the retry resumes at step 3 (Redis)."""

from __future__ import annotations

from pathlib import Path

from steps_kill import kill_after_step_two_then_resume


def test_killed_worker_resumes_at_step_three(redis_url: str, tmp_path: Path) -> None:
    kill_after_step_two_then_resume(redis_url, tmp_path)


def test_killed_worker_resumes_at_step_three_on_a_cluster(cluster_url: str, tmp_path: Path) -> None:
    kill_after_step_two_then_resume(cluster_url, tmp_path)
