"""Result types (issue 10): pydantic models replay, the declared type is checked when the
function is decorated and again when a result is stored, untyped replays warn of type changes."""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import datetime
import decimal
import importlib.util
import socket
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path
from typing import Any, NoReturn

import pydantic  # installed with the dev extras (fastapi); idem-core itself never imports it
import pytest

from idem_core import (
    ConfigurationError,
    CorruptRecord,
    Event,
    EventKind,
    Idempotency,
    ManualClock,
    ResultNotSerializable,
)
from idem_core.memory import MemoryStore
from idem_core.results import ResultTypeWarning

UTC = datetime.UTC


class Line(pydantic.BaseModel):
    sku: str
    price: decimal.Decimal
    qty: int = 1


class Order(pydantic.BaseModel):
    id: uuid.UUID
    at: datetime.datetime
    day: datetime.date
    lines: list[Line]
    total: decimal.Decimal
    note: str | None = None


class Strict(pydantic.BaseModel):
    """Strict validation and an alias: only pydantic's own JSON round trip gets these back."""

    model_config = pydantic.ConfigDict(strict=True)

    order_id: uuid.UUID = pydantic.Field(alias="orderId")
    at: datetime.datetime
    amount: decimal.Decimal


@dataclasses.dataclass
class Receipt:
    order_id: str
    amount: decimal.Decimal


class Plain:
    """A class neither msgspec nor pydantic can encode."""

    def __init__(self, x: int) -> None:
        self.x = x


def an_order(n: int = 1) -> Order:
    return Order(
        id=uuid.UUID(int=n),
        at=datetime.datetime(2026, 12, 2, 1, 2, 3, 456789, tzinfo=UTC),
        day=datetime.date(2026, 12, 2),
        lines=[Line(sku="a", price=decimal.Decimal("9.99"), qty=2), Line(sku="b", price=1)],
        total=decimal.Decimal("20.98"),
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def idem(store: MemoryStore, events: list[Event]) -> Idempotency:
    return Idempotency(store, namespace="shop", on_event=events.append)


# -- 1. pydantic models ---------------------------------------------------------------------


def test_a_pydantic_model_is_charged_once_and_replays_as_itself(idem: Idempotency) -> None:
    charges: list[str] = []

    @idem.idempotent(key="k")
    def charge(k: str) -> Order:
        charges.append(k)
        return an_order()

    attempts = [charge("card-1") for _ in range(3)]
    assert charges == ["card-1"]  # today: ResultNotSerializable and a charge per attempt
    assert attempts[0] == attempts[1] == attempts[2] == an_order()
    replay = attempts[2]
    assert type(replay) is Order and type(replay.lines[0]) is Line
    assert replay.total == decimal.Decimal("20.98") and type(replay.total) is decimal.Decimal
    assert replay.lines[1].price == decimal.Decimal(1)
    assert replay.at == an_order().at and replay.at.tzinfo is not None
    assert type(replay.id) is uuid.UUID and type(replay.day) is datetime.date


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (list[Order], [an_order(1), an_order(2)]),
        (Order | None, an_order()),
        (Order | None, None),
        (dict[str, Line], {"x": Line(sku="x", price=decimal.Decimal("0.10"))}),
        (tuple[Order, int], (an_order(), 3)),
        (
            Strict,
            Strict(
                orderId=uuid.UUID(int=5),
                at=datetime.datetime(2026, 1, 1, tzinfo=UTC),
                amount=decimal.Decimal("1.10"),
            ),
        ),
    ],
)
def test_pydantic_annotations_round_trip(idem: Idempotency, annotation: Any, value: Any) -> None:
    runs: list[int] = []

    def make(k: str) -> Any:
        runs.append(1)
        return value

    make.__annotations__["return"] = annotation
    fn = idem.idempotent(key="k")(make)
    assert fn("a") == value
    replay = fn("a")
    assert replay == value and type(replay) is type(value)
    assert runs == [1]


async def test_a_pydantic_model_replays_in_async_code(idem: Idempotency) -> None:
    runs: list[int] = []

    @idem.idempotent(key="k")
    async def charge(k: str) -> list[Order]:
        runs.append(1)
        return [an_order()]

    assert await charge("a") == await charge("a") == [an_order()]
    assert type((await charge("a"))[0]) is Order
    assert runs == [1]


def test_claim_with_a_pydantic_result_type(idem: Idempotency) -> None:
    for _ in range(2):
        with idem.claim("o-1", payload=1, result_type=Order) as call:
            if call.replayed:
                replay = call.result
                break
            call.complete(an_order())
    assert replay == an_order() and type(replay) is Order


def test_a_pydantic_model_from_an_untyped_function_is_stored_as_its_fields(
    idem: Idempotency,
) -> None:
    @idem.idempotent(key="k", scope="untyped-pydantic")
    def make(k):  # type: ignore[no-untyped-def]
        return Line(sku="a", price=decimal.Decimal("2.50"))

    with pytest.warns(ResultTypeWarning, match="Line"):
        make("a")
    assert make("a") == {"sku": "a", "price": "2.50", "qty": 1}


def test_idem_core_never_imports_pydantic() -> None:
    code = textwrap.dedent(
        """
        import dataclasses, sys
        from idem_core import Idempotency
        idem = Idempotency(url="memory://")

        @dataclasses.dataclass
        class R:
            x: int

        @idem.idempotent(key="k")
        def f(k: str) -> R:
            return R(1)

        assert f("a") == f("a") == R(1)
        assert "pydantic" not in sys.modules, "idem-core imported pydantic"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- 2. decided at decoration time ------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "named"),
    [
        (socket.socket, "socket.socket"),
        (list[Plain], "Plain"),
        (dict[str, Plain | None], "Plain"),
        (collections.abc.Iterator[int], "Iterator"),
    ],
)
def test_a_return_type_that_cannot_be_stored_fails_at_decoration(
    idem: Idempotency, annotation: Any, named: str
) -> None:
    def make(k: str) -> Any:
        raise AssertionError("never called")

    make.__annotations__["return"] = annotation
    with pytest.raises(ConfigurationError, match=named):
        idem.idempotent(key="k")(make)
    with pytest.raises(ConfigurationError, match=named):
        idem.idempotent(key="k", result_type=annotation)(lambda k: k)


def test_a_claim_with_a_result_type_that_cannot_be_stored_fails_before_claiming(
    idem: Idempotency, store: MemoryStore
) -> None:
    with pytest.raises(ConfigurationError, match="Plain"):
        idem.claim("o-1", payload=1, result_type=Plain)
    assert store.get(idem.key_for("o-1")) is None


def _load(tmp_path: Path, name: str, source: str) -> Any:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_a_forward_reference_resolves_on_first_use(tmp_path: Path) -> None:
    module = _load(
        tmp_path,
        f"forward_{uuid.uuid4().hex}",
        """
        from __future__ import annotations
        import msgspec
        from idem_core import Idempotency

        idem = Idempotency(url="memory://")
        runs = []

        @idem.idempotent(key="k")
        def make(k: str) -> Later:
            runs.append(k)
            return Later(k, 1)

        class Later(msgspec.Struct):
            k: str
            n: int
        """,
    )
    first = module.make("a")
    replay = module.make("a")
    assert replay == first and type(replay) is module.Later
    assert module.runs == ["a"]


def test_a_type_checking_only_return_type_fails_before_the_function_runs(
    tmp_path: Path,
) -> None:
    module = _load(
        tmp_path,
        f"checking_{uuid.uuid4().hex}",
        """
        from __future__ import annotations
        from typing import TYPE_CHECKING
        from idem_core import Idempotency
        if TYPE_CHECKING:
            from decimal import Decimal

        idem = Idempotency(url="memory://")
        runs = []

        @idem.idempotent(key="k")
        def make(k: str) -> Decimal:
            runs.append(k)
            return 1
        """,
    )
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="Decimal"):
            module.make("a")
    assert module.runs == []


def test_a_type_checking_only_parameter_type_does_not_untype_the_result(
    tmp_path: Path,
) -> None:
    module = _load(
        tmp_path,
        f"param_{uuid.uuid4().hex}",
        """
        from __future__ import annotations
        import decimal
        from typing import TYPE_CHECKING
        from idem_core import Idempotency
        if TYPE_CHECKING:
            from socket import socket

        idem = Idempotency(url="memory://")

        @idem.idempotent(key="k", payload=["k"])
        def make(k: str, conn: socket | None = None) -> decimal.Decimal:
            return decimal.Decimal("1.5")
        """,
    )
    assert module.make("a") == decimal.Decimal("1.5")
    assert type(module.make("a")) is decimal.Decimal


# -- 3. checked before storing ----------------------------------------------------------------


def test_a_value_not_of_the_declared_type_is_caught_when_stored(
    idem: Idempotency, store: MemoryStore, events: list[Event]
) -> None:
    runs: list[int] = []

    @idem.idempotent(key="k")
    def charge(k: str) -> Receipt:
        runs.append(1)
        return None  # type: ignore[return-value]

    assert charge("a") is None  # the caller that ran it gets its value
    for _ in range(3):
        with pytest.raises(ResultNotSerializable, match="Receipt") as info:
            charge("a")  # today: CorruptRecord on every duplicate, for the whole TTL
        assert not isinstance(info.value, CorruptRecord)
        assert "NoneType" in str(info.value)
    assert runs == [1]
    assert [e.kind for e in events].count(EventKind.RESULT_NOT_STORED) == 1


def test_a_surrogate_string_is_not_serializable_and_never_sticks(
    idem: Idempotency, events: list[Event]
) -> None:
    runs: list[int] = []

    @idem.idempotent(key="k")
    def name(k: str) -> str:
        runs.append(1)
        return "bad \udc80 name"

    assert name("a") == "bad \udc80 name"
    with pytest.raises(ResultNotSerializable, match="str"):
        name("a")
    assert runs == [1]
    assert EventKind.RESULT_NOT_STORED in [e.kind for e in events]


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (int, "1"),
        (list[int], [1, "2"]),
        (Receipt, {"order_id": "o"}),
        (datetime.datetime, "yesterday"),
        (Order, Line(sku="a", price=1)),
    ],
)
def test_mismatched_values_are_not_stored(idem: Idempotency, annotation: Any, value: Any) -> None:
    def make(k: str) -> Any:
        return value

    make.__annotations__["return"] = annotation
    fn = idem.idempotent(key="k")(make)
    assert fn("a") == value
    with pytest.raises(ResultNotSerializable):
        fn("a")


def test_complete_in_a_claim_checks_the_declared_type(idem: Idempotency) -> None:
    with idem.claim("o-1", payload=1, result_type=Receipt) as call:
        call.complete({"amount": "x"})
    with (
        pytest.raises(ResultNotSerializable, match="Receipt"),
        idem.claim("o-1", payload=1, result_type=Receipt) as call,
    ):
        assert call.replayed
        call.result  # noqa: B018


# -- 5. no silent type change -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "original", "replayed"),
    [
        (Receipt("o", decimal.Decimal("1.5")), "Receipt", "dict"),
        (decimal.Decimal("1.5"), "Decimal", "str"),
        ((1, 2), "tuple", "list"),
        (datetime.datetime(2026, 1, 1), "datetime", "str"),
        ({"items": [{"at": uuid.UUID(int=1)}]}, "UUID", "str"),
        ({1, 2}, "set", "list"),
    ],
)
def test_an_untyped_replay_that_changes_type_warns_once(
    idem: Idempotency, value: Any, original: str, replayed: str
) -> None:
    @idem.idempotent(key="k", scope=f"untyped-{uuid.uuid4().hex}")
    def make(k):  # type: ignore[no-untyped-def]
        return value

    with pytest.warns(ResultTypeWarning) as record:
        make("a")
    message = str(record[0].message)
    assert original in message and replayed in message and "result_type=" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make("b")  # once per function
        make("a")


def test_untyped_plain_results_and_typed_functions_do_not_warn(idem: Idempotency) -> None:
    @idem.idempotent(key="k")
    def plain(k):  # type: ignore[no-untyped-def]
        return {"a": [1, 2.5, "x", None, True, b"b"], "n": {"m": 1}}

    @idem.idempotent(key="k")
    def typed(k: str) -> Receipt:
        return Receipt(k, decimal.Decimal(1))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plain("a") == plain("a")
        assert typed("a") == typed("a")


def test_an_aware_datetime_replays_as_a_datetime_without_warning(idem: Idempotency) -> None:
    at = datetime.datetime(2026, 1, 1, tzinfo=UTC)

    @idem.idempotent(key="k")
    def when(k):  # type: ignore[no-untyped-def]
        return at

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert when("a") == when("a") == at


def test_async_mismatch_is_not_stored(idem: Idempotency) -> None:
    @idem.idempotent(key="k")
    async def charge(k: str) -> Receipt:
        return None  # type: ignore[return-value]

    async def main() -> None:
        assert await charge("a") is None
        with pytest.raises(ResultNotSerializable, match="Receipt"):
            await charge("a")

    asyncio.run(main())


def test_a_function_that_never_returns_stores_its_cached_errors(idem: Idempotency) -> None:
    class Declined(Exception):
        pass

    runs: list[int] = []

    @idem.idempotent(key="k", cache_errors=(Declined,))
    def pay(k: str) -> NoReturn:
        runs.append(1)
        raise Declined("no")

    for _ in range(2):
        with pytest.raises(Declined):
            pay("a")
    assert runs == [1]


def test_a_claim_without_result_type_warns_of_a_type_change(idem: Idempotency) -> None:
    scope = f"refunds-{uuid.uuid4().hex[:8]}"
    with (
        pytest.warns(ResultTypeWarning, match=f"{scope}.*Decimal.*str"),
        idem.claim("o-1", payload=1, scope=scope) as call,
    ):
        call.complete(decimal.Decimal("1.5"))
    with idem.claim("o-1", payload=1, scope=scope, result_type=decimal.Decimal) as call:
        assert call.result == decimal.Decimal("1.5")  # the fix the warning names
