"""Steps on memory://: the API's edges (the rules themselves are conformance scenarios)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from idem_core import (
    ConfigurationError,
    Idempotency,
    ResultNotSerializable,
    current_acall,
    current_call,
)
from idem_core.clock import ManualClock
from idem_core.memory import MemoryStore


def test_key_for_is_stable_and_opaque() -> None:
    idem = Idempotency(url="memory://")
    with idem.claim("order-1") as a:
        key = a.key_for("charge")
        a.complete(1)
    with idem.claim("order-1") as b:  # replayed: key_for needs no claim
        assert b.replayed and b.key_for("charge") == key
    with idem.claim("order-2") as c:
        assert c.key_for("charge") != key
        c.complete(2)
    assert len(key) == 64 and int(key, 16) >= 0
    assert a.key_for("refund") != key


def test_step_needs_a_held_claim() -> None:
    idem = Idempotency(url="memory://")
    with idem.claim("k") as call:
        call.complete("v")
    with idem.claim("k") as replay:
        assert replay.replayed
        with pytest.raises(RuntimeError, match="finished"):
            replay.step("s", lambda: 1)


@pytest.mark.parametrize("name", ["", 3, "x" * 201])
def test_step_name_is_checked(name: Any) -> None:
    idem = Idempotency(url="memory://")
    ran = []
    with pytest.raises(ConfigurationError), idem.claim("k") as call:
        call.step(name, lambda: ran.append(1))
    assert ran == []


def test_unstorable_step_result_is_refused_after_running() -> None:
    idem = Idempotency(url="memory://")
    with pytest.raises(ResultNotSerializable), idem.claim("k") as call:
        call.step("s", lambda: object())
    with idem.claim("k") as again:
        assert again.step("s", lambda: "stored now") == "stored now"
        again.complete(None)


def test_a_store_without_steps_says_so() -> None:
    class NoSteps:
        max_key_length = 1 << 16
        server_clock = False

        def __init__(self) -> None:
            self._s = MemoryStore()

        def __getattr__(self, name: str) -> Any:
            if name in ("record_step", "load_steps"):
                raise AttributeError(name)
            return getattr(self._s, name)

    idem = Idempotency(NoSteps())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="does not support steps"), idem.claim("k") as c:
        c.step("s", lambda: 1)


def test_fail_open_runs_steps_unrecorded() -> None:
    class Down(MemoryStore):
        def claim(self, request: Any) -> Any:
            from idem_core import StoreUnavailable

            raise StoreUnavailable("down")

    idem = Idempotency(Down(), on_store_error="fail_open", retries=0)
    with idem.claim("k") as call:
        assert call.unprotected
        assert call.step("s", lambda: 5) == 5
        call.complete(5)


def test_current_call_outside_and_inside() -> None:
    with pytest.raises(RuntimeError):
        current_call()
    clock = ManualClock()
    idem = Idempotency(MemoryStore(clock=clock))
    ran: list[int] = []

    @idem.idempotent(key=lambda n: str(n))
    def work(n: int) -> int:
        return current_call().step("double", lambda: ran.append(n) or n * 2)

    assert work(3) == 6 and work(3) == 6 and ran == [3]
    with pytest.raises(RuntimeError):
        current_call()  # reset after the call


def test_current_acall_in_an_async_function() -> None:
    idem = Idempotency(url="memory://")
    ran: list[str] = []

    async def fetch() -> str:
        ran.append("fetch")
        return "body"

    @idem.idempotent(key=lambda n: str(n))
    async def work(n: int) -> str:
        call = current_acall()
        body = await call.astep("fetch", fetch)  # a coroutine function
        size = await call.astep("size", lambda: len(body), result_type=int)  # a plain one
        return f"{body}:{size}"

    async def main() -> None:
        assert await work(1) == "body:4"
        assert await work(1) == "body:4"
        with pytest.raises(RuntimeError):
            current_call()  # the sync accessor in an async call

    asyncio.run(main())
    assert ran == ["fetch"]
