"""A Lambda cold start on DynamoDB: a fresh sync process (byte-code as installed) that imports
idem-core, opens a ``dynamodb://`` store and makes a first call on the lean path imports
neither asyncio and the async store, nor botocore, nor http.client (and the email parser it
brings): each costs a sync cold start tens of milliseconds for nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from ddb_servers import FAKE_ENV, Server

PROGRAM = """
import sys
from idem_core import Idempotency
idem = Idempotency.from_url(sys.argv[1])
fn = idem.idempotent(key=lambda k: k)(lambda k: {"k": k})
assert fn(sys.argv[2]) == fn(sys.argv[2]) == {"k": sys.argv[2]}
loaded = ("asyncio", "idem_dynamodb.aio", "idem_dynamodb.wire.aio_http", "aiobotocore",
          "botocore", "http.client")
print(sorted(m for m in loaded if m in sys.modules))
"""


def test_a_sync_first_call_imports_no_asyncio_botocore_or_http_client(server: Server) -> None:
    key = f"cold-{uuid.uuid4().hex}"
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, server.url(), key],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **FAKE_ENV},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
