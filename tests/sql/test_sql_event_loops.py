"""Issue 11: an async store used inside one ``asyncio.run()`` and abandoned unclosed when
its loop closes (what ``Idempotency`` does with a closed loop's store) prints nothing, at
collection or at exit, and does not disturb a new store in a new loop; on PostgreSQL
(psycopg, asyncpg), MariaDB (aiomysql) and SQLite (aiosqlite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("loop_worker.py")
SCHEMES = {
    "sqlite": ["sqlite+aiosqlite"],
    "postgresql": ["postgresql+psycopg", "postgresql+asyncpg"],
    "mysql": ["mysql+aiomysql"],
}


@pytest.mark.parametrize("mode", ["exit", "collect"])
def test_an_abandoned_store_is_silent_and_a_new_loop_works(db: str, db_url: str, mode: str) -> None:
    for scheme in SCHEMES[db]:
        url = scheme + "://" + db_url.split("://", 1)[1]
        # Every warning shown, ResourceWarning included: nothing may be printed.
        done = subprocess.run(
            [sys.executable, "-W", "always", str(WORKER), url, mode],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONWARNINGS": "always"},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["loop", "1", "ok", "loop", "2", "ok", "done"], done.stdout
        assert done.stderr == "", f"{scheme} ({mode}) printed:\n{done.stderr}"
