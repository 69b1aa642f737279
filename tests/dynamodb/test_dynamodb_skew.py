"""A worker whose clock runs 5 s or 60 s ahead keeps trying to take over a lease that its
holder renews: the key never runs twice. Once the holder stops renewing (it died), the
watcher takes over about one lease later. On DynamoDB Local, sync and async claimers."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable

import pytest
from ddb_servers import Server
from idem_dynamodb.backend import BACKEND

from idem_core.clock import SkewedClock
from idem_core.errors import LeaseLost
from idem_core.record import ClaimRequest

LEASE = 1.0
RENEW_EVERY = 0.3
HOLD = 3.5  # seconds the holder renews: several leases
TTL = 600.0


def _request(key: str) -> ClaimRequest:
    return ClaimRequest(key, "f" * 32, uuid.uuid4().hex, LEASE, TTL)


class _Holder:
    """Claims ``key``, "executes" it, and renews its lease until told to stop."""

    def __init__(self, server: Server, key: str, executions: list[str]) -> None:
        self.store = server.open()
        self.key = key
        self.fence = self.store.claim(_request(key)).fence
        executions.append("holder")
        self.stop = threading.Event()
        self.renewed_at = time.monotonic()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._renew, daemon=True)
        self.thread.start()

    def _renew(self) -> None:
        while not self.stop.wait(RENEW_EVERY):
            try:
                self.store.renew(self.key, self.fence, LEASE)
                self.renewed_at = time.monotonic()
            except BaseException as exc:  # a lost lease is a failure of this test
                self.errors.append(exc)
                return

    def die(self) -> float:
        """Stop renewing, as a crashed worker does; returns when the last renewal landed."""
        self.stop.set()
        self.thread.join(5)
        return self.renewed_at


def _race(server: Server, ahead: float, claim: Callable[[ClaimRequest], bool]) -> None:
    """``claim`` tries once for the skewed worker and says whether it acquired the key."""
    key = f"skew-{uuid.uuid4().hex}"
    executions: list[str] = []
    holder = _Holder(server, key, executions)
    try:
        deadline = time.monotonic() + HOLD
        tries = 0
        # Through several leases, and at least five tries however slow a loaded machine makes
        # each (the holder keeps renewing meanwhile).
        while time.monotonic() < deadline or tries < 5:
            if claim(_request(key)):
                executions.append(f"ahead {ahead:+g}s")
            tries += 1
            time.sleep(0.05)
        assert executions == ["holder"], executions  # never two executions
        assert not holder.errors, holder.errors
        assert tries >= 5  # it kept trying through several leases
        # The holder dies: the watcher takes over about one lease after the last renewal.
        last = holder.die()
        while not claim(_request(key)):
            assert time.monotonic() - last < LEASE + 2.0, "no takeover of a dead lease"
            time.sleep(0.05)
        took_after = time.monotonic() - last
        assert LEASE * 0.9 <= took_after < LEASE + 2.0, took_after
        with pytest.raises(LeaseLost):
            holder.store.complete(key, holder.fence, b"zombie", TTL)
    finally:
        holder.die()
        holder.store.close()


@pytest.mark.parametrize("ahead", [5.0, 60.0])
def test_clock_ahead_never_takes_over_a_renewed_lease(dynamodb_local: Server, ahead: float) -> None:
    with dynamodb_local.open(clock=SkewedClock(ahead)) as skewed:
        _race(dynamodb_local, ahead, lambda r: skewed.claim(r).outcome.acquired)


@pytest.mark.parametrize("ahead", [5.0, 60.0])
def test_clock_ahead_never_takes_over_a_renewed_lease_async(
    dynamodb_local: Server, ahead: float
) -> None:
    loop = asyncio.new_event_loop()
    skewed = BACKEND.open_async(dynamodb_local.url(), clock=SkewedClock(ahead))

    def claim(request: ClaimRequest) -> bool:
        return loop.run_until_complete(skewed.claim(request)).outcome.acquired

    try:
        _race(dynamodb_local, ahead, claim)
    finally:
        loop.run_until_complete(skewed.close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
