"""Core overhead: a decorated call on memory:// against the bare function, first call and
replay, next to Powertools' idempotency utility on an in-process dict persistence layer and
idemkit's in-memory backend, all in the same run (issue 2's performance figures)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from idem_core import Idempotency

from .rigs import LEASE, TTL, LambdaContext, acharge, charge

ROUNDS = 5


def _positional(fn: Any) -> Callable[[str], Any]:
    return lambda k: fn(k, 1)


def _keywords(fn: Any) -> Callable[[str], Any]:
    return lambda k: fn(order_id=k, amount=1)


def _per_call(fn: Callable[[str], Any], keys: list[str]) -> float:
    t0 = time.perf_counter()
    for k in keys:
        fn(k)
    return (time.perf_counter() - t0) / len(keys)


def _measure(
    make: Callable[[], Callable[[str], Any]], bare: Callable[[str], Any], ops: int, name: str
) -> dict[str, Any]:
    """Median over rounds of (decorated - bare) µs per call, first call and replay."""
    firsts, replays, bares = [], [], []
    for r in range(ROUNDS):
        fn = make()
        keys = [f"{name}-{r}-{i}" for i in range(ops)]
        bares.append(_per_call(bare, keys))
        firsts.append(_per_call(fn, keys))
        replays.append(_per_call(fn, keys))
    b = statistics.median(bares)
    return {
        "bare_us": round(b * 1e6, 3),
        "first_us": round(statistics.median(firsts) * 1e6, 2),
        "replay_us": round(statistics.median(replays) * 1e6, 2),
        "first_overhead_us": round((statistics.median(firsts) - b) * 1e6, 2),
        "replay_overhead_us": round((statistics.median(replays) - b) * 1e6, 2),
        "ops": ops,
        "rounds": ROUNDS,
    }


def ours(ops: int) -> dict[str, Any]:
    def make() -> Callable[[str], Any]:
        idem = Idempotency.from_url("memory://", namespace="overhead", ttl=TTL, lease=LEASE)
        fn = idem.idempotent(key="order_id")(charge)
        return lambda k: fn(k, 1)

    return _measure(make, lambda k: charge(k, 1), ops, "ours")


def ours_async(ops: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async def per_call(fn: Callable[[str], Any], keys: list[str]) -> float:
            t0 = time.perf_counter()
            for k in keys:
                await fn(k)
            return (time.perf_counter() - t0) / len(keys)

        firsts, replays, bares = [], [], []
        for r in range(ROUNDS):
            idem = Idempotency.from_url("memory://", namespace="aoverhead", ttl=TTL, lease=LEASE)
            fn = idem.idempotent(key="order_id")(acharge)
            keys = [f"a-{r}-{i}" for i in range(ops)]
            bares.append(await per_call(lambda k: acharge(k, 1), keys))
            firsts.append(await per_call(_positional(fn), keys))
            replays.append(await per_call(_positional(fn), keys))
        b = statistics.median(bares)
        return {
            "bare_us": round(b * 1e6, 3),
            "first_overhead_us": round((statistics.median(firsts) - b) * 1e6, 2),
            "replay_overhead_us": round((statistics.median(replays) - b) * 1e6, 2),
            "ops": ops,
            "rounds": ROUNDS,
        }

    return asyncio.run(run())


def _dict_layer() -> Any:
    """A Powertools persistence layer on a dict, with the conditional put its DynamoDB and
    Redis layers make (a live record blocks the put)."""
    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyItemAlreadyExistsError,
        IdempotencyItemNotFoundError,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.base import (
        BasePersistenceLayer,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import DataRecord

    class DictPersistenceLayer(BasePersistenceLayer):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.items: dict[str, DataRecord] = {}
            self.lock = threading.Lock()

        def _get_record(self, idempotency_key: str) -> DataRecord:
            try:
                return self.items[idempotency_key]
            except KeyError:
                raise IdempotencyItemNotFoundError from None

        def _put_record(self, data_record: DataRecord) -> None:
            with self.lock:
                old = self.items.get(data_record.idempotency_key)
                now = time.time()
                if old is not None and old.expiry_timestamp and old.expiry_timestamp > now:
                    lapsed = (
                        old.status == "INPROGRESS"
                        and old.in_progress_expiry_timestamp is not None
                        and old.in_progress_expiry_timestamp < now * 1000
                    )
                    if not lapsed:
                        raise IdempotencyItemAlreadyExistsError(old_data_record=old)
                self.items[data_record.idempotency_key] = data_record

        def _update_record(self, data_record: DataRecord) -> None:
            self.items[data_record.idempotency_key] = data_record

        def _delete_record(self, data_record: DataRecord) -> None:
            self.items.pop(data_record.idempotency_key, None)

    return DictPersistenceLayer()


def powertools(ops: int) -> dict[str, Any]:
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function

    def make() -> Callable[[str], Any]:
        config = IdempotencyConfig(event_key_jmespath="order_id", expires_after_seconds=int(TTL))
        config.register_lambda_context(cast(Any, LambdaContext(LEASE)))

        def raw(order: dict[str, Any]) -> dict[str, Any]:
            return charge(order["order_id"], order["amount"])

        pt_charge = idempotent_function(
            data_keyword_argument="order", persistence_store=_dict_layer(), config=config
        )(raw)

        return lambda k: pt_charge(order={"order_id": k, "amount": 1})

    def bare(k: str) -> Any:
        order: dict[str, Any] = {"order_id": k, "amount": 1}
        return charge(order["order_id"], order["amount"])

    return _measure(make, bare, ops, "powertools")


def idemkit_async(ops: int) -> dict[str, Any]:
    import warnings

    from idemkit import InMemoryBackend
    from idemkit.adapters.ai import idempotent

    from .rigs import idemkit_config

    async def run() -> dict[str, Any]:
        async def per_call(fn: Callable[[str], Any], keys: list[str]) -> float:
            t0 = time.perf_counter()
            for k in keys:
                await fn(k)
            return (time.perf_counter() - t0) / len(keys)

        firsts, replays, bares = [], [], []
        for r in range(ROUNDS):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = idempotent(backend=InMemoryBackend(), config=idemkit_config(LEASE, 0.0))(
                    acharge
                )
            keys = [f"k-{r}-{i}" for i in range(ops)]
            bares.append(await per_call(lambda k: acharge(k, 1), keys))
            firsts.append(await per_call(_keywords(fn), keys))
            replays.append(await per_call(_keywords(fn), keys))
        b = statistics.median(bares)
        return {
            "bare_us": round(b * 1e6, 3),
            "first_overhead_us": round((statistics.median(firsts) - b) * 1e6, 2),
            "replay_overhead_us": round((statistics.median(replays) - b) * 1e6, 2),
            "ops": ops,
            "rounds": ROUNDS,
        }

    return asyncio.run(run())


def run(ops: int, peers: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"idem-core (sync)": ours(ops), "idem-core (async)": ours_async(ops)}
    if peers:
        # the peers are slower per call: fewer calls keep the run short
        for name, fn, n in (
            ("powertools (sync, dict layer)", powertools, max(ops // 10, 500)),
            ("idemkit (async, InMemoryBackend)", idemkit_async, 300),
        ):
            try:
                out[name] = fn(n)
            except ImportError as exc:
                out[name] = {"skipped": f"not installed: {exc}"}
            except Exception as exc:
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out
