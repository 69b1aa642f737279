"""DynamoDB Local behind a loopback fault proxy: blackholed, dropped, or a reply cut by a reset,
at first use, between claim and complete, and on a replay; sync and async stores under the
core's decorator. The store raises StoreUnavailable within ``Settings.unavailable_within``
(the documented bound), the function never runs twice, and a completed record is never lost.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ddb_servers import Server
from fault_proxy import FaultProxy
from idem_dynamodb.backend import BACKEND

from idem_core import Idempotency
from idem_core.errors import AlreadyInProgress, StoreUnavailable

# Small timeouts keep the test short: 2 attempts of (0.5 s connect + 2 s read), 1 s backoff.
OPTIONS = {"connect_timeout": 0.5, "read_timeout": 2.0, "max_attempts": 2}
FAULTS = ("blackhole", "drop", "reset_mid_reply")
PHASES = ("first_use", "before_complete", "replay")
# Scheduling slack on a shared 2-core machine; the bound itself is the store's.
SLACK = 1.0


@pytest.fixture
def proxy(dynamodb_local: Server) -> Iterator[FaultProxy]:
    port = int(dynamodb_local.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as p:
        yield p


def _url(dynamodb_local: Server, proxy: FaultProxy) -> str:
    url = dynamodb_local.url(**OPTIONS)
    return url.replace(dynamodb_local.endpoint, f"http://127.0.0.1:{proxy.port}")


class _Scenario:
    """One fault in one phase: ``outcome()`` runs the decorated function's call and says
    what the caller got; ``runs`` counts executions of its body."""

    def __init__(self, proxy: FaultProxy, fault: str, phase: str) -> None:
        self.proxy = proxy
        self.fault = fault
        self.phase = phase
        self.runs = 0
        self.key = f"fault-{uuid.uuid4().hex}"

    def inject(self) -> None:
        getattr(self.proxy, self.fault)()

    def body(self) -> str:
        self.runs += 1
        if self.phase == "before_complete":
            self.inject()
        return f"value-{self.key}"

    def check(self, call: Callable[[], Any], bound: float) -> None:
        """``bound`` covers requests; building the client (local work, no request: up to a
        second or two when botocore first loads its models) is done before any fault."""
        if self.phase == "replay":
            assert call() == f"value-{self.key}" and self.runs == 1
        if self.phase in ("first_use", "replay"):
            self.inject()
        t0 = time.monotonic()
        try:
            got: Any = call()
        except StoreUnavailable as exc:
            got = exc
            assert exc.__cause__ is not None
        elapsed = time.monotonic() - t0
        assert elapsed < bound + SLACK, (elapsed, bound)
        if self.fault != "reset_mid_reply":
            # A blackholed or dropped path fails the call...
            assert isinstance(got, StoreUnavailable), got
        # ...a reply cut once is retried by botocore, and the retry finds what was applied.
        assert self.runs <= 1
        self.proxy.heal()
        try:
            after = call()
        except AlreadyInProgress:
            # The completion never arrived, or a held claim arrived after the heal (the
            # blackhole releases what a still-open connection sent): the key is held until
            # its lease ends, refused meanwhile, and nothing ran twice.
            assert self.phase != "replay" and isinstance(got, StoreUnavailable)
            after = None
        if not isinstance(got, StoreUnavailable) or self.phase == "replay":
            assert after == f"value-{self.key}"  # a completed record is never lost
        assert self.runs == (0 if self.phase == "first_use" and after is None else 1)
        if self.phase == "first_use" and after is None:
            assert self.fault == "blackhole"  # only a held request can arrive late


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fault", FAULTS)
def test_sync_store_faults(
    dynamodb_local: Server, proxy: FaultProxy, fault: str, phase: str
) -> None:
    store = BACKEND.open(_url(dynamodb_local, proxy))
    idem = Idempotency(store=store, retries=0, lease=30)
    scenario = _Scenario(proxy, fault, phase)

    @idem.idempotent(key=lambda: scenario.key)
    def work() -> str:
        return scenario.body()

    _ = store.client  # built before the fault: no request is made
    try:
        scenario.check(work, store.settings.unavailable_within)
    finally:
        proxy.heal()
        store.close()


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fault", FAULTS)
def test_async_store_faults(
    dynamodb_local: Server, proxy: FaultProxy, fault: str, phase: str
) -> None:
    loop = asyncio.new_event_loop()
    store = BACKEND.open_async(_url(dynamodb_local, proxy))
    idem = Idempotency(astore=store, retries=0, lease=30)
    scenario = _Scenario(proxy, fault, phase)

    @idem.idempotent(key=lambda: scenario.key)
    async def work() -> str:
        return scenario.body()

    loop.run_until_complete(store._get_client())  # built before the fault: no request
    try:
        scenario.check(lambda: loop.run_until_complete(work()), store.settings.unavailable_within)
    finally:
        proxy.heal()
        loop.run_until_complete(store.close())
        loop.close()


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_nothing_listening_is_unavailable_in_bounded_time(twin: str) -> None:
    url = (
        "dynamodb://idem_test?region=us-east-1&endpoint_url=http://127.0.0.1:9"
        "&connect_timeout=0.5&read_timeout=1&max_attempts=3"
    )
    req_key = f"down-{uuid.uuid4().hex}"
    if twin == "sync":
        with BACKEND.open(url) as store:
            _ = store.client
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                store.get(req_key)
            elapsed = time.monotonic() - t0
        bound = store.settings.unavailable_within
    else:

        async def go() -> tuple[float, pytest.ExceptionInfo[StoreUnavailable]]:
            astore = BACKEND.open_async(url)
            try:
                await astore._get_client()
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable) as ainfo:
                    await astore.get(req_key)
                return time.monotonic() - t0, ainfo
            finally:
                await astore.close()

        elapsed, info = asyncio.run(go())
        bound = BACKEND.open_async(url).settings.unavailable_within
    assert elapsed < bound + SLACK, (elapsed, bound)
    assert info.value.__cause__ is not None
