"""A Hypothesis state machine that drives a store against the reference rules."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from .. import machine
from ..errors import LeaseLost
from ..record import ClaimRequest, Record, Status

FPS = ("a" * 32, "b" * 32)
LEASE = 120.0  # nothing lapses during a run, so the model needs no clock of the store's
TTL = 600.0


def store_machine(store: Any) -> type[RuleBasedStateMachine]:
    """A state machine class bound to a sync store (run it with ``.TestCase``)."""

    class StoreModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.prefix = f"model-{uuid.uuid4().hex}"
            self.model: dict[str, Record] = {}
            self.fences: dict[str, list[int]] = {}
            self.attempts: dict[str, ClaimRequest] = {}

        def key(self, i: int) -> str:
            return f"{self.prefix}-{i}"

        @initialize()
        def start(self) -> None:
            for i in range(3):
                store.delete(self.key(i))

        @rule(i=st.integers(0, 2), fp=st.sampled_from(FPS), reuse=st.booleans())
        def claim(self, i: int, fp: str, reuse: bool) -> None:
            key = self.key(i)
            prior = self.attempts.get(key)
            if reuse and prior is not None and prior.fingerprint == fp:
                req = prior
            else:
                req = ClaimRequest(key, fp, uuid.uuid4().hex, LEASE, TTL)
            expected = machine.decide_claim(self.model.get(key), req, store.now())
            got = store.claim(req)
            assert got.outcome is expected.result.outcome, (got.outcome, expected.result.outcome)
            if expected.write is not None:
                previous = self.fences.setdefault(key, [])
                assert not previous or got.record.fence > previous[-1]
                previous.append(got.record.fence)
                self.model[key] = got.record
                self.attempts[key] = req
            else:
                assert got.record.fence == self.model[key].fence

        @rule(i=st.integers(0, 2), stale=st.booleans(), data=st.binary(max_size=64))
        def complete(self, i: int, stale: bool, data: bytes) -> None:
            key = self.key(i)
            fence = self._fence(key, stale)
            current = self.model.get(key)
            try:
                expected: Record | None = machine.decide_complete(
                    current, key, fence, data, TTL, store.now()
                )
            except LeaseLost:
                expected = None
            try:
                got = store.complete(key, fence, data, TTL)
            except LeaseLost:
                assert expected is None
                return
            assert expected is not None
            assert got.status is Status.COMPLETED and got.fence == fence
            assert got.result == expected.result
            self.model[key] = got

        @rule(i=st.integers(0, 2), stale=st.booleans())
        def release(self, i: int, stale: bool) -> None:
            key = self.key(i)
            fence = self._fence(key, stale)
            current = self.model.get(key)
            now = store.now()
            ok = machine.holds(current, fence, now)
            ok_retry = False
            if not ok:
                try:
                    machine.after_failed_release(current, key, fence, now)
                    ok_retry = True
                except LeaseLost:
                    ok_retry = False
            try:
                store.release(key, fence)
            except LeaseLost:
                assert not ok and not ok_retry
                return
            assert ok or ok_retry
            if ok and current is not None:
                self.model[key] = machine.released(current, now)

        @rule(i=st.integers(0, 2), stale=st.booleans())
        def renew(self, i: int, stale: bool) -> None:
            key = self.key(i)
            fence = self._fence(key, stale)
            ok = machine.holds(self.model.get(key), fence, store.now())
            try:
                got = store.renew(key, fence, LEASE)
            except LeaseLost:
                assert not ok
                return
            assert ok
            self.model[key] = got

        @rule(i=st.integers(0, 2))
        def delete(self, i: int) -> None:
            store.delete(self.key(i))
            self.model.pop(self.key(i), None)
            self.attempts.pop(self.key(i), None)

        @invariant()
        def matches_store(self) -> None:
            for key, rec in self.model.items():
                got = store.get(key)
                assert got is not None, key
                assert (got.status, got.fence, got.fingerprint, got.result) == (
                    rec.status,
                    rec.fence,
                    rec.fingerprint,
                    rec.result,
                )
                assert got.released == rec.released

        def _fence(self, key: str, stale: bool) -> int:
            rec = self.model.get(key)
            if rec is None:
                return 1
            return rec.fence - 1 if stale else rec.fence

        def teardown(self) -> None:
            for i in range(3):
                store.delete(self.key(i))

    StoreModel.TestCase.settings = settings(
        max_examples=15, stateful_step_count=20, deadline=None, database=None
    )
    return StoreModel
