"""Standalone Redis behind a loopback fault proxy: a path that blackholes, drops or resets
connections, or cuts a reply halfway. Each call gives up with StoreUnavailable within its
budget, the decorated function never runs twice, and no completed record is lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fault_proxy import FaultProxy
from redis_servers import RedisServer, with_params

from idem_core import AlreadyInProgress, ClaimRequest, Idempotency, Status
from idem_core.errors import StoreUnavailable
from idem_core.registry import open_async_store, open_store

TIMEOUT = 0.5
RETRIES = 1
# A call's budget is (retries + 1) x timeout; the slack is for a shared 2-CPU machine.
BOUND = (RETRIES + 1) * TIMEOUT + 0.5
FAULTS = ["blackhole", "drop", "reset"]


class Setup:
    def __init__(self, server: RedisServer, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.prefix = f"fault-{uuid.uuid4().hex}:"
        self.url = with_params(
            f"redis://127.0.0.1:{proxy.port}/0",
            prefix=self.prefix,
            timeout=TIMEOUT,
            retries=RETRIES,
        )
        # straight to the server, around the proxy: what is really stored
        self.direct = open_store(with_params(server.url, prefix=self.prefix))
        self.admin = redis.Redis(port=server.port)

    def records(self) -> dict[str, tuple[Status, int, bytes | None]]:
        found = {}
        for raw in self.admin.scan_iter(match=f"{self.prefix}*"):
            key = raw.decode()[len(self.prefix) :]
            rec = self.direct.get(key)
            if rec is not None:
                found[key] = (rec.status, rec.fence, rec.result)
        return found

    def completed(self) -> dict[str, tuple[Status, int, bytes | None]]:
        return {k: v for k, v in self.records().items() if v[0] is Status.COMPLETED}

    def close(self) -> None:
        self.direct.close()
        self.admin.close()


@pytest.fixture
def setup(own_server: RedisServer) -> Iterator[Setup]:
    with FaultProxy("127.0.0.1", own_server.port) as proxy:
        s = Setup(own_server, proxy)
        yield s
        s.close()


def inject(proxy: FaultProxy, fault: str) -> None:
    getattr(proxy, fault)()


def req(key: str) -> ClaimRequest:
    return ClaimRequest(key=key, fingerprint="f" * 32, attempt=uuid.uuid4().hex, lease=30, ttl=60)


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_store_calls_fail_within_the_budget(setup: Setup, fault: str) -> None:
    """Every store call through a failed path, sync and async: StoreUnavailable, in time."""
    store = open_store(setup.url)
    astore = open_async_store(setup.url)
    loop = asyncio.new_event_loop()
    try:
        store.get("warm")
        loop.run_until_complete(astore.get("warm"))
        inject(setup.proxy, fault)
        calls: list[tuple[str, Any]] = [
            ("sync claim", lambda: store.claim(req("k"))),
            ("sync claim_many", lambda: store.claim_many([req("a"), req("b")])),
            ("sync complete", lambda: store.complete("k", 1, b"r", 60)),
            ("async claim", lambda: loop.run_until_complete(astore.claim(req("k")))),
            (
                "async claim_many",
                lambda: loop.run_until_complete(astore.claim_many([req("a"), req("b")])),
            ),
            ("async get", lambda: loop.run_until_complete(astore.get("k"))),
        ]
        # a waiter subscribes (one budget) then reads (another)
        calls += [
            ("sync wait", lambda: store.wait_for_change("k", 1, 30)),
            ("async wait", lambda: loop.run_until_complete(astore.wait_for_change("k", 1, 30))),
        ]
        for name, call in calls:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                call()
            elapsed = time.monotonic() - start
            assert info.value.__cause__ is not None, name
            budgets = 2 if name.endswith("wait") else 1
            assert elapsed < budgets * (RETRIES + 1) * TIMEOUT + 0.5, (name, elapsed)
        setup.proxy.heal()
        # the stores find their way back on their own
        deadline = time.monotonic() + 10
        while True:
            try:
                store.get("k")
                loop.run_until_complete(astore.get("k"))
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        setup.proxy.heal()
        store.close()
        loop.run_until_complete(astore.close())
        loop.close()


def _idem(store: Any, aio: bool) -> Idempotency:
    # retries=0: the first StoreUnavailable reaches the caller, who retries (below)
    if aio:
        return Idempotency(astore=store, retries=0, lease=1.0)
    return Idempotency(store=store, retries=0, lease=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_decorated_calls_run_once_and_keep_what_completed(setup: Setup, fault: str) -> None:
    ran: Counter[str] = Counter()
    store = open_store(setup.url)
    idem = _idem(store, aio=False)
    failing = {"now": False}

    @idem.idempotent(key="key", on_in_progress="wait", wait_timeout=10, scope="op")
    def op(key: str) -> str:
        ran[key] += 1
        if failing["now"]:
            inject(setup.proxy, fault)  # the path fails while the function runs
        return f"result-{key}"

    @idem.idempotent(key="key", on_in_progress="raise", scope="op")
    def op_now(key: str) -> str:  # the same operation, for a caller who will not wait
        ran[key] += 1
        return f"result-{key}"

    try:
        for i in range(5):
            assert op(f"done{i}") == f"result-done{i}"
        before = setup.completed()
        assert len(before) == 5

        # 1. the path is down before the call: the claim fails, the function never runs
        inject(setup.proxy, fault)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            op("before")
        assert time.monotonic() - start < BOUND
        assert ran["before"] == 0
        setup.proxy.heal()
        # the caller retries: it runs once (after an orphaned claim's lease, if one got
        # through), and replays after that
        assert _until_ok(lambda: op("before")) == "result-before"
        assert op("before") == "result-before"
        assert ran["before"] == 1

        # 2. the path fails while the function runs: completing it fails
        failing["now"] = True
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            op("during")
        assert time.monotonic() - start < BOUND
        failing["now"] = False
        assert ran["during"] == 1
        setup.proxy.heal()
        during = [v for k, v in setup.records().items() if k.endswith(":during")]
        assert during
        if fault == "blackhole":
            # the complete was held on the path and went through once it healed
            _wait_completed(setup, ":during")
            assert op_now("during") == "result-during"
        else:
            # the complete was lost with its connection: the record stays held by the run
            # that happened, and a retry is refused before it runs (the lease's contract:
            # once it lapses, a retry takes over)
            assert during[0][0] is Status.IN_PROGRESS
            with pytest.raises(AlreadyInProgress):
                op_now("during")
        assert ran["during"] == 1

        # nothing that had completed was lost or changed
        after = setup.completed()
        for key, value in before.items():
            assert after[key] == value
    finally:
        setup.proxy.heal()
        store.close()


def _wait_completed(setup: Setup, suffix: str) -> None:
    deadline = time.monotonic() + 5
    while not any(k.endswith(suffix) for k in setup.completed()):
        assert time.monotonic() < deadline, setup.records()
        time.sleep(0.05)


def _until_ok(call: Any, tries: int = 50) -> Any:
    for _ in range(tries):
        try:
            return call()
        except (StoreUnavailable, AlreadyInProgress):
            time.sleep(0.1)
    return call()


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
async def test_async_decorated_calls_run_once_and_keep_what_completed(
    setup: Setup, fault: str
) -> None:
    ran: Counter[str] = Counter()
    store = open_async_store(setup.url)
    idem = _idem(store, aio=True)

    @idem.idempotent(key="key", on_in_progress="wait", wait_timeout=10, scope="op")
    async def op(key: str) -> str:
        ran[key] += 1
        return f"result-{key}"

    try:
        for i in range(5):
            assert await op(f"done{i}") == f"result-done{i}"
        before = setup.completed()
        assert len(before) == 5
        inject(setup.proxy, fault)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await op("before")
        assert time.monotonic() - start < BOUND
        assert ran["before"] == 0
        setup.proxy.heal()
        for _ in range(50):
            try:
                assert await op("before") == "result-before"
                break
            except (StoreUnavailable, AlreadyInProgress):
                await asyncio.sleep(0.1)
        assert await op("before") == "result-before"
        assert ran["before"] == 1
        after = setup.completed()
        for key, value in before.items():
            assert after[key] == value
    finally:
        setup.proxy.heal()
        await store.close()


@pytest.mark.slow
@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
def test_reply_cut_mid_way_is_retried_and_recognised(setup: Setup, aio: bool) -> None:
    """The claim's reply is cut by an RST: the store resends the same claim (same attempt) on
    a new connection, the server recognises it, and the function runs once."""
    ran: Counter[str] = Counter()
    if aio:
        astore = open_async_store(setup.url)
        idem = Idempotency(astore=astore, retries=0)

        @idem.idempotent(key="key")
        async def aop(key: str) -> str:
            ran[key] += 1
            return f"result-{key}"

        async def scenario() -> list[str]:
            await aop("warm")
            setup.proxy.reset_mid_reply()
            got = [await aop("cut"), await aop("cut")]
            await astore.close()
            return got

        results = asyncio.run(scenario())
    else:
        store = open_store(setup.url)
        idem = Idempotency(store=store, retries=0)

        @idem.idempotent(key="key")
        def op(key: str) -> str:
            ran[key] += 1
            return f"result-{key}"

        op("warm")
        setup.proxy.reset_mid_reply()
        results = [op("cut"), op("cut")]
        store.close()
    assert results == ["result-cut", "result-cut"]
    assert ran["cut"] == 1
    assert setup.completed()  # the record is there, completed
