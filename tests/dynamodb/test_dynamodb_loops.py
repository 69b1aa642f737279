"""Async stores and event loops, in a fresh interpreter each (warnings on, stderr checked):
a store used inside one ``asyncio.run()`` and abandoned unclosed prints nothing when its loop
closes, at GC or at exit, and a store (the same or a new one) works in the next loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from ddb_servers import ROOT, Server

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, sys, uuid
    from idem_core import Idempotency
    from idem_core.record import ClaimRequest
    from idem_dynamodb.backend import BACKEND

    url, mode = sys.argv[1], sys.argv[2]
    kept = []

    async def use(store=None):
        s = store or BACKEND.open_async(url)
        key = f"loops-{uuid.uuid4().hex}"
        res = await s.claim(ClaimRequest(key, "f" * 32, uuid.uuid4().hex, 30, 600))
        await s.complete(key, res.fence, b"done", 600)
        assert (await s.get(key)).result == b"done"
        if mode == "close":
            await s.close()
        return s

    if mode == "same":  # one store, three loops in turn
        store = asyncio.run(use())
        asyncio.run(use(store))
        asyncio.run(use(store))
    elif mode == "idempotency":  # the public API, from the URL, in two loops
        idem = Idempotency.from_url(url)
        runs = []

        @idem.idempotent(key="order")
        async def charge(order: str) -> str:
            runs.append(order)
            return f"charged {order}"

        first = asyncio.run(charge("o-" + uuid.uuid4().hex))
        order = "o-" + uuid.uuid4().hex
        assert asyncio.run(charge(order)) == asyncio.run(charge(order)) == f"charged {order}"
        assert len(runs) == 2
    else:  # "abandon": a new store per loop, never closed; or "close": closed in its loop
        kept.append(asyncio.run(use()))
        kept.append(asyncio.run(use()))
        kept.pop(0)
        gc.collect()
    print("ok")
    """
)


@pytest.mark.parametrize("mode", ["abandon", "close", "same", "idempotency"])
def test_two_event_loops_print_nothing(dynamodb_local: Server, mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", SCRIPT, dynamodb_local.url(), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == "", proc.stderr  # no Unclosed client session, ResourceWarning...


async def test_a_store_refuses_a_second_live_loop(server: Server) -> None:
    """Bound to this (running) loop, the store refuses use from another live loop."""
    import asyncio
    import threading

    from idem_dynamodb.backend import BACKEND

    from idem_core.errors import ConfigurationError

    store = BACKEND.open_async(server.url())
    try:
        assert await store.get("loops-none") is None
        errors: list[BaseException] = []

        def other() -> None:
            try:
                asyncio.run(store.get("loops-none"))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], ConfigurationError), errors
        assert await store.get("loops-none") is None  # still fine in its own loop
    finally:
        await store.close()
