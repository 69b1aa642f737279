"""What a fresh process pays before its first call (a Lambda cold start): a sync process on
memory:// never imports asyncio, and idem-core's own store schemes are found without
reading every installed distribution's entry points."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import importlib.metadata, sys
def scan(*args, **kwargs):
    raise AssertionError("every installed distribution's entry points were read")
importlib.metadata.entry_points = scan
from idem_core import Idempotency
idem = Idempotency.from_url("memory://")
fn = idem.idempotent(key="k")(lambda k: {"k": k})
assert fn("a") == fn("a") == {"k": "a"}
print(sorted(m for m in ("asyncio", "concurrent.futures") if m in sys.modules))
"""


def test_a_sync_first_call_imports_no_asyncio_and_scans_no_distributions() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_installed_idem_core_finds_its_stores_without_importlib_metadata() -> None:
    program = (
        "import sys\nfrom idem_core import Idempotency\n"
        "Idempotency.from_url('memory://').store\n"
        "print('importlib.metadata' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
