"""The decorator's default key and fingerprint: parameter order however arguments are passed,
rich argument types, and methods (self/cls left out)."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from typing import Any

import msgspec
import pydantic
import pytest

from idem_core import Idempotency, KeyMissing, PayloadMismatch
from idem_core.keys import fingerprint
from idem_core.memory import MemoryStore


@pytest.fixture
def idem() -> Idempotency:
    return Idempotency(MemoryStore(), namespace="shop")


# -- 3. keyword order ------------------------------------------------------------------------


def test_the_same_call_in_any_argument_style_replays(idem: Idempotency) -> None:
    runs: list[tuple[Any, ...]] = []

    @idem.idempotent(key="order")
    def charge(order: str, amount: int, currency: str = "EUR", note: str = "") -> int:
        runs.append((order, amount, currency, note))
        return amount

    charge("o-1", 5)
    charge("o-1", 5, "EUR")
    charge("o-1", amount=5)
    charge(order="o-1", amount=5)
    charge(amount=5, order="o-1")  # before: PayloadMismatch
    charge(currency="EUR", amount=5, order="o-1", note="")
    charge("o-1", note="", amount=5)
    assert len(runs) == 1
    with pytest.raises(PayloadMismatch):
        charge(amount=6, order="o-1")


def test_keyword_order_with_a_key_callable_and_payload_names(idem: Idempotency) -> None:
    runs: list[int] = []

    @idem.idempotent(key=lambda order, amount: order, payload=["amount", "currency"])
    def charge(order: str, amount: int, currency: str = "EUR") -> int:
        runs.append(amount)
        return amount

    charge(currency="EUR", amount=5, order="o-2")
    charge("o-2", 5)
    charge(amount=5, order="o-2", currency="EUR")
    assert runs == [5]


def test_kwargs_catch_all_is_sorted_and_defaults_applied(idem: Idempotency) -> None:
    runs: list[dict[str, Any]] = []

    @idem.idempotent(key="order")
    def ship(order: str, *items: str, express: bool = False, **extra: Any) -> int:
        runs.append(extra)
        return len(items)

    ship("o-3", "a", "b", colour="red", size=2)
    ship("o-3", "a", "b", size=2, colour="red")
    ship("o-3", "a", "b", size=2, express=False, colour="red")
    assert len(runs) == 1
    with pytest.raises(PayloadMismatch):
        ship("o-3", "b", "a", size=2, colour="red")  # *args keep their order


def test_keyword_only_and_positional_only_parameters(idem: Idempotency) -> None:
    runs: list[int] = []

    @idem.idempotent(key="order")
    def pay(order: str, /, amount: int, *, fee: int = 0) -> int:
        runs.append(amount)
        return amount

    pay("o-4", 5)
    pay("o-4", amount=5)
    pay("o-4", fee=0, amount=5)
    assert runs == [5]


def test_a_bad_call_is_refused_before_the_claim(idem: Idempotency) -> None:
    runs: list[int] = []

    @idem.idempotent(key="order")
    def pay(order: str, amount: int) -> int:
        runs.append(amount)
        return amount

    with pytest.raises(KeyMissing, match="cannot bind"):
        pay("o-5", 5, nope=1)  # type: ignore[call-arg]
    with pytest.raises(KeyMissing, match="cannot bind"):
        pay("o-5", 5, amount=5)  # type: ignore[misc]
    with pytest.raises(KeyMissing, match="cannot bind"):
        pay(amount=5)  # type: ignore[call-arg]
    assert runs == []
    assert pay("o-5", 5) == 5  # nothing was left claimed


async def test_keyword_order_async(idem: Idempotency) -> None:
    runs: list[int] = []

    @idem.idempotent(key="order")
    async def charge(order: str, amount: int, currency: str = "EUR") -> int:
        runs.append(amount)
        return amount

    await charge("o-6", 5)
    await charge(amount=5, order="o-6")
    await charge(currency="EUR", order="o-6", amount=5)
    assert runs == [5]


# -- 4. argument types -----------------------------------------------------------------------


class Order(pydantic.BaseModel):
    id: str
    amount: decimal.Decimal
    at: datetime.datetime
    tags: set[str] = set()


def test_pydantic_arguments_fingerprint_and_key(idem: Idempotency) -> None:
    runs: list[str] = []
    at = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)

    @idem.idempotent(key=lambda order: order.id)
    def place(order: Order) -> str:
        runs.append(order.id)
        return order.id

    place(Order(id="o-1", amount=decimal.Decimal("1.50"), at=at))  # before: KeyMissing
    place(Order(id="o-1", amount=decimal.Decimal("1.50"), at=at))
    assert runs == ["o-1"]
    with pytest.raises(PayloadMismatch):
        place(Order(id="o-1", amount=decimal.Decimal("2"), at=at))

    @idem.idempotent(key="ref", payload=["order"])
    def refund(ref: str, order: Order) -> str:
        runs.append(ref)
        return ref

    refund("r-1", Order(id="o-1", amount=decimal.Decimal(1), at=at))
    refund("r-1", order=Order(id="o-1", amount=decimal.Decimal(1), at=at))
    assert runs == ["o-1", "r-1"]


def test_pydantic_payload_in_claim(idem: Idempotency) -> None:
    at = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    with idem.claim("o-9", payload=Order(id="o-9", amount=decimal.Decimal(1), at=at)) as call:
        call.complete(1)
    with (
        pytest.raises(PayloadMismatch),
        idem.claim("o-9", payload=Order(id="o-9", amount=decimal.Decimal(2), at=at)),
    ):
        pass


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(msgspec.Struct):
    x: int
    y: int


def _reversed_set(items: list[str]) -> set[str]:
    out: set[str] = set()
    for item in reversed(items):
        out.add(item)
    return out


@pytest.mark.parametrize(
    ("make", "other"),
    [
        (lambda: Line("a", 1), lambda: Line("a", 2)),
        (lambda: Point(1, 2), lambda: Point(2, 1)),
        (lambda: uuid.UUID(int=7), lambda: uuid.UUID(int=8)),
        (lambda: decimal.Decimal("1.10"), lambda: decimal.Decimal("1.1")),
        (
            lambda: datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC),
            lambda: datetime.date(2026, 1, 2),
        ),
        (lambda: Colour.RED, lambda: Colour.BLUE),
        (lambda: {f"k{i}" for i in range(50)}, lambda: {f"k{i}" for i in range(51)}),
        (lambda: frozenset(range(40)), lambda: frozenset(range(41))),
        (lambda: {"b": 1, "a": 2}, lambda: {"a": 1, "b": 2}),
    ],
)
def test_argument_types_fingerprint_deterministically(make: Any, other: Any) -> None:
    assert fingerprint([make()]) == fingerprint([make()])
    assert fingerprint([make()]) != fingerprint([other()])


def test_sets_fingerprint_whatever_their_insertion_order() -> None:
    items = [f"item-{i}" for i in range(200)]
    assert fingerprint(set(items)) == fingerprint(_reversed_set(items))
    assert fingerprint({"a": set(items)}) == fingerprint({"a": _reversed_set(items)})


def test_pydantic_is_not_imported_for_other_objects() -> None:
    class Opaque:
        pass

    with pytest.raises(KeyMissing, match="cannot fingerprint"):
        fingerprint(Opaque())


# -- 5. methods and bound tasks --------------------------------------------------------------


class Opaque:
    """Not encodable: an instance in the fingerprint would be KeyMissing."""


def test_methods_leave_self_out(idem: Idempotency) -> None:
    class Payments(Opaque):
        def __init__(self) -> None:
            self.runs: list[str] = []

        @idem.idempotent(key="order")
        def charge(self, order: str, amount: int) -> int:
            self.runs.append(order)
            return amount

        @idem.idempotent(key=lambda self, order: f"{self.tenant}/{order}")
        def tenanted(self, order: str) -> str:
            self.runs.append(order)
            return order

        tenant = "acme"

    p = Payments()
    assert p.charge("o-1", 5) == 5  # before: KeyMissing (self in the fingerprint)
    assert p.charge("o-1", amount=5) == 5
    assert Payments().charge("o-1", 5) == 5  # another instance: the same operation
    assert p.tenanted("o-2") == "o-2"
    assert p.tenanted(order="o-2") == "o-2"
    assert p.runs == ["o-1", "o-2"]
    with pytest.raises(PayloadMismatch):
        p.charge("o-1", 6)


def test_classmethods_leave_cls_out(idem: Idempotency) -> None:
    runs: list[str] = []

    class Jobs:
        @classmethod
        @idem.idempotent(key="job")
        def run(cls, job: str) -> str:
            runs.append(job)
            return job

    assert Jobs.run("j-1") == "j-1"
    assert Jobs().run("j-1") == "j-1"
    assert runs == ["j-1"]


async def test_async_methods_leave_self_out(idem: Idempotency) -> None:
    runs: list[str] = []

    class Worker(Opaque):
        @idem.idempotent(key="job")
        async def run(self, job: str, n: int = 1) -> str:
            runs.append(job)
            return job

    await Worker().run("j-2")
    await Worker().run(n=1, job="j-2")
    assert runs == ["j-2"]


def test_bound_task_self_is_left_out(idem: Idempotency) -> None:
    # Celery's bind=True passes the task as the first argument, named self by convention.
    runs: list[str] = []

    class Task(Opaque):
        name = "tasks.process"

    @idem.idempotent(key="order")
    def process(self: Any, order: str) -> str:
        runs.append(order)
        return order

    process(Task(), "o-1")
    process(Task(), order="o-1")
    assert runs == ["o-1"]


def test_a_first_parameter_with_another_name_is_an_argument(idem: Idempotency) -> None:
    @idem.idempotent(key="order")
    def process(task: Opaque, order: str) -> str:
        return order

    with pytest.raises(KeyMissing, match="cannot fingerprint"):
        process(Opaque(), "o-1")


def test_a_connection_argument_is_left_out(tmp_path: Any) -> None:
    # The documented decorator form: before, KeyMissing (a Connection cannot be fingerprinted).
    from sqlalchemy import create_engine

    url = f"sqlite:///{tmp_path / 'conn.db'}"
    idem = Idempotency(url=f"{url}?table=idem_conn")
    idem.store.setup()
    engine = create_engine(url)
    runs: list[int] = []

    @idem.idempotent(key="key", connection="conn")
    def place(conn: Any, key: str, amount: int) -> int:
        runs.append(amount)
        return amount

    try:
        with engine.begin() as conn:
            assert place(conn, "k1", 5) == 5
        with engine.begin() as conn:
            assert place(conn, key="k1", amount=5) == 5  # another connection: a replay
        with engine.begin() as conn, pytest.raises(PayloadMismatch):
            place(conn, "k1", 6)
        assert runs == [5]
    finally:
        engine.dispose()
        idem.close()
