"""Async stores and event loops: a store used in one ``asyncio.run()`` and left unclosed when
that loop ends says nothing, now or at exit; the next loop gets a working store; a store shared
with a loop that is still open is refused clearly, never hung."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import uuid
import warnings
from pathlib import Path

import pytest
from idem_redis.clients import abandon

from idem_core import ClaimOutcome, ClaimRequest
from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.registry import open_async_store

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter with every warning shown: anything on stderr is a failure.
SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, sys, uuid
    from idem_core import ClaimOutcome, ClaimRequest
    from idem_core.registry import open_async_store

    url = sys.argv[1]

    def req(key):
        return ClaimRequest(key=key, fingerprint="f" * 32, attempt=uuid.uuid4().hex,
                            lease=30, ttl=60)

    async def first_call_and_replay(store):
        key = uuid.uuid4().hex
        res = await store.claim(req(key))
        assert res.outcome is ClaimOutcome.CLAIMED
        await store.complete(key, res.fence, b"done", 60)
        again = await store.claim(req(key))
        assert again.outcome is ClaimOutcome.COMPLETED and again.record.fence == res.fence
        return again.record.result

    # one store, two successive loops, never closed: the second loop gets a new client
    shared = open_async_store(url)
    assert asyncio.run(first_call_and_replay(shared)) == b"done"
    assert asyncio.run(first_call_and_replay(shared)) == b"done"
    # a store per loop, each abandoned unclosed when its loop ends
    for _ in range(3):
        assert asyncio.run(first_call_and_replay(open_async_store(url))) == b"done"
        gc.collect()
    # closed in its own loop
    async def used_and_closed():
        store = open_async_store(url)
        result = await first_call_and_replay(store)
        await store.close()
        return result
    assert asyncio.run(used_and_closed()) == b"done"
    gc.collect()
    print("ok")
    # ``shared`` is still referenced: it is let go of at interpreter exit
    """
)


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_abandoned_stores_are_silent_and_new_loops_work(
    where: str, redis_url: str, cluster_url: str
) -> None:
    url = redis_url if where == "standalone" else cluster_url
    env = {**os.environ, "PYTHONDEVMODE": "", "PYTHONWARNINGS": "always"}
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT, url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert done.stderr == "", done.stderr


def req(key: str) -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint="f" * 32, attempt=uuid.uuid4().hex, lease=30, ttl=60)


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_a_store_shared_with_a_loop_still_open_is_refused_not_hung(
    where: str, redis_url: str, cluster_url: str
) -> None:
    store = open_async_store(redis_url if where == "standalone" else cluster_url)
    first = asyncio.new_event_loop()
    thread = threading.Thread(target=first.run_forever)
    thread.start()
    try:
        key = uuid.uuid4().hex
        claimed = asyncio.run_coroutine_threadsafe(store.claim(req(key)), first).result(10)
        assert claimed.outcome is ClaimOutcome.CLAIMED

        async def from_a_second_loop() -> None:
            await asyncio.wait_for(store.get(key), 10)

        with pytest.raises(ConfigurationError, match="event loop"):
            asyncio.run(from_a_second_loop())
        # the first loop's store still works
        got = asyncio.run_coroutine_threadsafe(store.get(key), first).result(10)
        assert got is not None and got.fence == claimed.fence
        asyncio.run_coroutine_threadsafe(store.close(), first).result(10)
    finally:
        first.call_soon_threadsafe(first.stop)
        thread.join(10)
        first.close()


def test_a_given_client_on_a_closed_loop_is_store_unavailable(redis_url: str) -> None:
    """A client you pass in is yours to bind to a loop; used after its loop closed, the
    driver's RuntimeError comes out as StoreUnavailable (it used to escape raw)."""
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(redis_url.split("?")[0])
    store = open_async_store(f"redis://ignored?prefix=given-{uuid.uuid4().hex}:", client=client)
    assert asyncio.run(store.claim(req("a"))).outcome is ClaimOutcome.CLAIMED
    with pytest.raises(StoreUnavailable, match="event loop") as info:
        asyncio.run(store.claim(req("b")))
    assert isinstance(info.value.__cause__, RuntimeError)
    abandon(client)  # its connections belong to the closed loop: let them go
    # redis-py lost track of the connection that failed (asyncio could not close its
    # transport): that one warns when collected, here rather than in some later test
    del store, client, info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
