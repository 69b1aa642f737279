"""A worker SIGKILLed after step 2 of 4; the retry resumes at step 3 (SQLite, PostgreSQL,
MariaDB)."""

from __future__ import annotations

from pathlib import Path

from steps_kill import kill_after_step_two_then_resume


def test_killed_worker_resumes_at_step_three(db_url: str, tmp_path: Path) -> None:
    kill_after_step_two_then_resume(db_url, tmp_path)
