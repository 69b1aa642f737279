"""Stored errors (issue 10): replaying one imports and looks up nothing (only the types listed
in ``cache_errors`` are rebuilt, by name), a malformed one is ``CorruptRecord``, and the
caller's own exception always wins over a failure to settle the claim (F3)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from idem_core import (
    CorruptRecord,
    Event,
    EventKind,
    Idempotency,
    ManualClock,
    StoreUnavailable,
)
from idem_core.errors import ReplayedError
from idem_core.memory import MemoryStore
from idem_core.testing import FaultyStore
from idem_core.testing.faults import AsyncFaultyStore


class Declined(Exception):
    pass


class CardDeclined(Declined):
    pass


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def events() -> list[Event]:
    return []


def _stored_error(idem: Idempotency, store: MemoryStore, body: Any, **settings: Any) -> Any:
    """A decorated function whose record for key "a" holds ``body`` as a stored error."""
    runs: list[int] = []

    @idem.idempotent(key="k", scope="pay", **settings)
    def pay(k: str) -> str:
        runs.append(1)
        return "ok"

    pay("a")
    (key,) = store._records
    store._records[key] = msgspec.structs.replace(
        store._records[key], result=b"\x02" + msgspec.msgpack.encode(body)
    )
    return pay


# -- 6. stored errors import nothing --------------------------------------------------------


@pytest.fixture
def lazy_module() -> Iterator[list[str]]:
    """An imported module whose ``__getattr__`` would run code (as ``concurrent.futures``
    imports ``.process`` on first access to ``ProcessPoolExecutor``)."""
    looked_up: list[str] = []
    module = types.ModuleType("idem_lazy_probe")

    def __getattr__(name: str) -> Any:
        looked_up.append(name)
        return Declined

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[module.__name__] = module
    yield looked_up
    del sys.modules[module.__name__]


@pytest.mark.parametrize("cache_errors", [(), (Declined,)])
def test_replaying_a_stored_error_looks_nothing_up_in_modules(
    store: MemoryStore, lazy_module: list[str], cache_errors: tuple[type[Exception], ...]
) -> None:
    idem = Idempotency(store)
    pay = _stored_error(
        idem,
        store,
        {"module": "idem_lazy_probe", "qualname": "Anything", "args": ["x"]},
        cache_errors=cache_errors,
    )
    with pytest.raises(ReplayedError, match=r"idem_lazy_probe\.Anything"):
        pay("a")
    assert lazy_module == []  # today: getattr ran the module's __getattr__


def test_replaying_a_stored_error_imports_nothing() -> None:
    code = textwrap.dedent(
        """
        import concurrent.futures  # loaded, as in most processes (asyncio imports it)
        import sys
        import msgspec
        from idem_core import Idempotency
        from idem_core.errors import ReplayedError
        from idem_core.memory import MemoryStore

        store = MemoryStore()
        idem = Idempotency(store)

        @idem.idempotent(key="k", cache_errors=(ValueError,))
        def pay(k: str) -> str:
            return "ok"

        pay("a")
        (key,) = store._records
        body = {"module": "concurrent.futures", "qualname": "ProcessPoolExecutor", "args": []}
        store._records[key] = msgspec.structs.replace(
            store._records[key], result=b"\\x02" + msgspec.msgpack.encode(body)
        )
        assert "concurrent.futures" in sys.modules
        assert "concurrent.futures.process" not in sys.modules
        before = set(sys.modules)
        try:
            pay("a")
        except ReplayedError:
            pass
        new = set(sys.modules) - before
        assert not new, f"replaying a stored error imported {sorted(new)}"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_subclass_replays_as_the_listed_type(store: MemoryStore) -> None:
    idem = Idempotency(store)
    runs: list[int] = []

    @idem.idempotent(key="k", cache_errors=(Declined,))
    def pay(k: str) -> str:
        runs.append(1)
        raise CardDeclined("insufficient funds", 402)

    with pytest.raises(CardDeclined):
        pay("a")
    with pytest.raises(Declined) as info:
        pay("a")
    assert type(info.value) is Declined  # only listed types are rebuilt, never the subclass
    assert info.value.args == ("insufficient funds", 402)
    assert runs == [1]


def test_an_unlisted_type_is_never_rebuilt_even_if_it_subclasses_a_listed_one(
    store: MemoryStore,
) -> None:
    idem = Idempotency(store)
    pay = _stored_error(
        idem,
        store,
        {"module": __name__, "qualname": "CardDeclined", "args": ["x"]},
        cache_errors=(Declined,),
    )
    with pytest.raises(ReplayedError, match="CardDeclined"):
        pay("a")


def test_a_listed_name_from_another_module_is_not_the_listed_type(store: MemoryStore) -> None:
    idem = Idempotency(store)
    pay = _stored_error(
        idem,
        store,
        {"module": "elsewhere", "qualname": "Declined", "args": ["x"]},
        cache_errors=(Declined,),
    )
    with pytest.raises(ReplayedError):
        pay("a")


@pytest.mark.parametrize(
    "body",
    [
        {"module": __name__, "qualname": "Declined", "args": 5},
        {"module": __name__, "qualname": "Declined", "args": "ab"},
        {"module": __name__, "qualname": "Declined"},
        {"module": __name__, "args": []},
        {"qualname": "Declined", "args": []},
        {"module": 1, "qualname": "Declined", "args": []},
        {"module": __name__, "qualname": ["Declined"], "args": []},
        {"module": __name__, "qualname": "Declined", "args": [], "bases": "x"},
        ["Declined", "x"],
        "Declined",
    ],
)
def test_a_malformed_stored_error_is_corrupt_record(store: MemoryStore, body: Any) -> None:
    idem = Idempotency(store)
    pay = _stored_error(idem, store, body, cache_errors=(Declined,))
    before = dict(store._records)
    with pytest.raises(CorruptRecord, match="malformed"):
        pay("a")
    assert store._records == before  # left untouched


# -- 7. the caller's own exception wins over a failure to settle (F3) ------------------------


class DownOnRelease(MemoryStore):
    """A store that goes down (or fails with a raw driver error) as the claim is released."""

    def __init__(self, error: Exception, **kw: Any) -> None:
        super().__init__(**kw)
        self.error = error

    def release(self, key: str, fence: int) -> None:
        raise self.error


def _assert_settle_failure_reported(exc: BaseException, events: list[Event], key: str) -> None:
    notes = getattr(exc, "__notes__", [])
    assert any(key in note and "settling the claim" in note for note in notes), notes
    assert [e for e in events if e.kind is EventKind.STORE_ERROR and e.key == key]


@pytest.mark.parametrize(
    "failure", [StoreUnavailable("store down"), ConnectionResetError("raw driver error")]
)
def test_decorator_raises_the_functions_error_when_release_fails(
    clock: ManualClock, events: list[Event], failure: Exception
) -> None:
    idem = Idempotency(DownOnRelease(failure, clock=clock), on_event=events.append, retries=0)

    @idem.idempotent(key="k", scope="pay")
    def pay(k: str) -> str:
        raise Declined("card declined")

    with pytest.raises(Declined) as info:  # today: StoreUnavailable / the raw driver error
        pay("a")
    _assert_settle_failure_reported(info.value, events, idem.key_for("a", "pay"))


@pytest.mark.parametrize("when", ["before", "after"])
def test_decorator_raises_the_functions_error_when_release_fails_faulty_store(
    store: MemoryStore, events: list[Event], when: Any
) -> None:
    faulty = FaultyStore(store)
    idem = Idempotency(faulty, on_event=events.append, retries=0)

    @idem.idempotent(key="k", scope="pay")
    def pay(k: str) -> str:
        faulty.fail_next("release", when)
        raise Declined("card declined")

    with pytest.raises(Declined) as info:
        pay("a")
    _assert_settle_failure_reported(info.value, events, idem.key_for("a", "pay"))


@pytest.mark.parametrize("when", ["before", "after"])
async def test_async_decorator_raises_the_functions_error_when_release_fails(
    store: MemoryStore, events: list[Event], when: Any
) -> None:
    faulty = AsyncFaultyStore(store.async_twin())
    idem = Idempotency(astore=faulty, on_event=events.append, retries=0)

    @idem.idempotent(key="k", scope="pay")
    async def pay(k: str) -> str:
        faulty.fail_next("release", when)
        raise Declined("card declined")

    with pytest.raises(Declined) as info:
        await pay("a")
    _assert_settle_failure_reported(info.value, events, idem.key_for("a", "pay"))


def test_decorator_raises_the_functions_error_when_storing_it_fails(
    store: MemoryStore, events: list[Event]
) -> None:
    faulty = FaultyStore(store)
    idem = Idempotency(faulty, on_event=events.append, retries=0)

    @idem.idempotent(key="k", scope="pay", cache_errors=(Declined,))
    def pay(k: str) -> str:
        faulty.fail_next("complete", "before")
        raise Declined("card declined")

    with pytest.raises(Declined) as info:
        pay("a")
    _assert_settle_failure_reported(info.value, events, idem.key_for("a", "pay"))


def test_claim_block_raises_its_error_when_release_fails(
    store: MemoryStore, events: list[Event]
) -> None:
    faulty = FaultyStore(store)
    idem = Idempotency(faulty, on_event=events.append, retries=0)
    with pytest.raises(Declined) as info, idem.claim("o-1", payload=1):
        faulty.fail_next("release", "before")
        raise Declined("card declined")
    _assert_settle_failure_reported(info.value, events, idem.key_for("o-1"))


async def test_async_claim_block_raises_its_error_when_release_fails(
    store: MemoryStore, events: list[Event]
) -> None:
    faulty = AsyncFaultyStore(store.async_twin())
    idem = Idempotency(astore=faulty, on_event=events.append, retries=0)
    with pytest.raises(Declined) as info:
        async with idem.aclaim("o-1", payload=1):
            faulty.fail_next("release", "before")
            raise Declined("card declined")
    _assert_settle_failure_reported(info.value, events, idem.key_for("o-1"))


def test_a_release_that_succeeds_on_retry_adds_nothing(
    store: MemoryStore, events: list[Event]
) -> None:
    faulty = FaultyStore(store)
    idem = Idempotency(faulty, on_event=events.append, retries=1)

    @idem.idempotent(key="k", scope="pay")
    def pay(k: str) -> str:
        faulty.fail_next("release", "before")
        raise Declined("card declined")

    with pytest.raises(Declined) as info:
        pay("a")
    assert not getattr(info.value, "__notes__", [])
    assert EventKind.RELEASED in [e.kind for e in events]


def test_a_cached_error_with_a_surrogate_in_its_message_is_stored(store: MemoryStore) -> None:
    idem = Idempotency(store)
    runs: list[int] = []

    @idem.idempotent(key="k", cache_errors=(Declined,))
    def pay(k: str) -> str:
        runs.append(1)
        raise Declined("bad \udc80 name")

    with pytest.raises(Declined):
        pay("a")
    with pytest.raises(Declined, match=r"bad \\udc80 name"):
        pay("a")  # today: a raw UnicodeEncodeError, and the key stays held
    assert runs == [1]


def test_a_cached_error_after_the_lease_was_lost_is_still_the_callers_error(
    store: MemoryStore, clock: ManualClock, events: list[Event]
) -> None:
    idem = Idempotency(store, on_event=events.append)

    @idem.idempotent(key="k", lease=5, cache_errors=(Declined,))
    def pay(k: str, who: str) -> str:
        if who == "zombie":
            clock.advance(6)  # a pause past the lease: a duplicate takes over meanwhile
            assert pay(k, "successor") == "successor"
            raise Declined("declined after the pause")
        return who

    with pytest.raises(Declined) as info:  # today: LeaseLost in its place
        pay("a", "zombie")
    assert any("settling the claim" in note for note in info.value.__notes__)
    assert EventKind.LEASE_LOST in [e.kind for e in events]
    assert pay("a", "successor") == "successor"  # the successor's result stands


async def test_async_a_cached_error_after_the_lease_was_lost_is_still_the_callers_error(
    store: MemoryStore, clock: ManualClock
) -> None:
    idem = Idempotency(store)

    @idem.idempotent(key="k", lease=5, cache_errors=(Declined,))
    async def pay(k: str, who: str) -> str:
        if who == "zombie":
            clock.advance(6)
            assert await pay(k, "successor") == "successor"
            raise Declined("declined after the pause")
        return who

    with pytest.raises(Declined):
        await pay("a", "zombie")
    assert await pay("a", "successor") == "successor"
