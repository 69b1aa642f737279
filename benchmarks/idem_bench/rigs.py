"""Rigs: one system (idem-core or a peer) on one target, ready to be timed.

A rig exposes the same handful of operations whatever the system: ``call(key)`` runs the
decorated function (a first call on a new key, a replay on a completed one, a conflict on a
key held in progress), ``floor()`` is the server's own one-round-trip primitive on the same
client, and ``claim_many(keys)`` the batch claim where the system has one. A *counting* rig
is built the same way with round-trip counters on its client (driver hooks) and, for
idem-core, a proxy counting store operations; it is used only for counting, never timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from idem_core import AlreadyInProgress, Idempotency, current_acall, current_call

from .targets import REGION, Target, with_params

#: keys whose execution the bench holds in progress: set when entered, wait to be released
ENTERED: dict[str, threading.Event] = {}
HOLD: dict[str, threading.Event] = {}
AENTERED: dict[str, asyncio.Event] = {}
AHOLD: dict[str, asyncio.Event] = {}

TTL = 900.0
LEASE = 30.0
#: steps of the ``steps`` scenario's function (each returns a small dict)
STEPS = 4


def charge(order_id: str, amount: int) -> dict[str, Any]:
    """The function every system makes idempotent; it blocks only on keys the bench holds."""
    held = HOLD.get(order_id)
    if held is not None:
        ENTERED[order_id].set()
        held.wait(120)
    return {"order": order_id, "amount": amount}


async def acharge(order_id: str, amount: int) -> dict[str, Any]:
    held = AHOLD.get(order_id)
    if held is not None:
        AENTERED[order_id].set()
        await held.wait()
    return {"order": order_id, "amount": amount}


class Counter:
    """A thread-safe enough tally (CPython's += on an attribute under the GIL is not atomic,
    but counting rigs run one call at a time)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.n += 1


class StoreOps:
    """``Idempotency(instrument=...)``: counts each store operation by name."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, store: Any) -> Any:
        return _Proxy(store, self)


class _Proxy:
    _OPS = frozenset(
        {
            "claim",
            "claim_many",
            "complete",
            "release",
            "renew",
            "get",
            "delete",
            "record_step",
            "load_steps",
        }
    )

    def __init__(self, store: Any, ops: StoreOps) -> None:
        self._store = store
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if name in self._OPS:
            ops = self._ops

            def counted(*args: Any, **kwargs: Any) -> Any:
                ops.n += 1
                return value(*args, **kwargs)

            return counted
        return value


@dataclasses.dataclass
class SyncRig:
    system: str
    call: Callable[[str], Any]
    in_progress: tuple[type[BaseException], ...]
    floor: Callable[[], Any] | None = None
    floor_name: str = ""
    claim_many: Callable[[Sequence[str]], Any] | None = None
    round_trips: Counter | None = None
    store_ops: StoreOps | None = None
    closers: list[Callable[[], Any]] = dataclasses.field(default_factory=list)
    #: a first call whose function runs ``STEPS`` steps (idem-core only)
    stepped: Callable[[str], Any] | None = None

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()


@dataclasses.dataclass
class AsyncRig:
    system: str
    call: Callable[[str], Awaitable[Any]]
    in_progress: tuple[type[BaseException], ...]
    floor: Callable[[], Awaitable[Any]] | None = None
    floor_name: str = ""
    claim_many: Callable[[Sequence[str]], Awaitable[Any]] | None = None
    round_trips: Counter | None = None
    store_ops: StoreOps | None = None
    closers: list[Callable[[], Any]] = dataclasses.field(default_factory=list)
    stepped: Callable[[str], Awaitable[Any]] | None = None

    async def close(self) -> None:
        for close in reversed(self.closers):
            try:
                value = close()
                if asyncio.iscoroutine(value):
                    await value
            except Exception:
                pass


def run_tag() -> str:
    return uuid.uuid4().hex[:8]


# -- driver glue ------------------------------------------------------------------------


def _redis_client(target: Target, counting: Counter | None, aio: bool) -> Any:
    """A redis-py client for the target; with ``counting``, every packet sent is counted
    (one ``send_packed_command`` per round trip, pipelines included)."""
    import redis
    import redis.asyncio as aredis

    url = target.server or "redis://127.0.0.1:6379/0"
    kwargs: dict[str, Any] = {}
    if counting is not None and not target.cluster:
        # (redis-py's cluster clients take no connection class: store operations only)
        kwargs["connection_class"] = _counting_connection(aio, counting)
    if target.cluster:
        nodes = target.url.split("://", 1)[1].split("?", 1)[0].split(",")
        startup = [redis.cluster.ClusterNode(*_host_port(n)) for n in nodes]  # type: ignore[no-untyped-call]
        if aio:
            anodes = [aredis.cluster.ClusterNode(*_host_port(n)) for n in nodes]
            return aredis.RedisCluster(startup_nodes=anodes, **kwargs)
        return redis.RedisCluster(startup_nodes=startup, **kwargs)
    if aio:
        return aredis.Redis(connection_pool=aredis.ConnectionPool.from_url(url, **kwargs))
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, **kwargs))


def _host_port(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host, int(port)


def _counting_connection(aio: bool, counter: Counter) -> type:
    if aio:
        from redis.asyncio.connection import Connection as AConnection

        class ACounting(AConnection):
            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                counter()
                await super().send_packed_command(command, check_health)

        return ACounting
    from redis.connection import Connection

    class Counting(Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counter()
            super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

    return Counting


def _boto_client(endpoint: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "dynamodb",
        region_name=REGION,
        endpoint_url=endpoint,
        config=Config(max_pool_connections=128, retries={"mode": "standard"}),
    )


def _table_of(url: str) -> str:
    return url.split("://", 1)[1].split("?", 1)[0].strip("/")


def _floor_key() -> dict[str, Any]:
    return {"pk": {"S": "idem-bench-floor"}}


def _ddb_setup(url: str) -> None:
    """Creates the table on a store of its own: setup goes through boto3, and the timed
    store must not hold a boto3 client it never needs on the lean path."""
    with Idempotency.from_url(url) as idem:
        getattr(idem.store, "setup", lambda: None)()


def _ddb_table(target: Target, url: str, closers: list[Any]) -> None:
    """Creates the table of ``url``; a rig's own table (see :func:`_ours_url`) is dropped
    when the rig closes."""
    _ddb_setup(url)
    if _table_of(url) != _table_of(target.url):
        closers.append(lambda: _boto_client(target.server).delete_table(TableName=_table_of(url)))


def _count_wire(wire: Any, counter: Counter) -> None:
    """Counts the requests of a lean DynamoDB client (:mod:`idem_dynamodb.wire`): each
    ``call`` is one API call (its retries, if any, are not counted, as botocore's
    ``before-call`` would not)."""
    call = wire.call

    def counted(op: str, kwargs: dict[str, Any]) -> Any:
        counter()
        return call(op, kwargs)

    wire.call = counted


# -- idem-core -------------------------------------------------------------------------


def _steps_idem(
    target: Target, tag: str, idem: Idempotency, closers: list[Any], aio: bool, ops: Any
) -> Idempotency:
    """The Idempotency a rig's steps run on: its own, but on moto one on a table of its own
    (steps are transactions there, and moto copies the whole table for each, see
    :func:`_ours_url`), which only the steps cell fills."""
    if not (target.kind == "dynamodb" and target.name == "moto"):
        return idem
    url = _ours_url(target, f"{tag}s")
    _ddb_table(target, url, closers)
    steps = Idempotency.from_url(url, namespace=f"bench{tag}", ttl=TTL, lease=LEASE, instrument=ops)
    closers.append(steps.aclose if aio else steps.close)
    return steps


def _ours_url(target: Target, tag: str) -> str:
    if target.kind == "sql" and target.database != "sqlite":
        return with_params(target.url, table=f"idem_bench_{tag}")
    if target.kind == "dynamodb" and target.name == "moto":
        # moto deep-copies a whole table for every transaction (steps are 2-item
        # TransactWriteItems) and keeps the copies: on the run's shared table, megabytes per
        # step until the kernel killed moto (23 GB). A table per rig stays small.
        table = _table_of(target.url)
        return target.url.replace(f"://{table}", f"://{table}_{tag}", 1)
    return target.url


def ours_sync(target: Target, tag: str, counting: bool = False) -> SyncRig:
    ops = StoreOps() if counting else None
    rts = Counter() if counting else None
    client: Any = None
    options: dict[str, Any] = {}
    floor: Callable[[], Any] | None = None
    floor_name = ""
    closers: list[Callable[[], Any]] = []
    if target.kind == "redis":
        rts = None if target.cluster else rts
        client = _redis_client(target, rts, aio=False)
        options["prefix"] = f"idembench:{tag}:"
        closers.append(client.close)
        if target.cluster:
            floor_key = f"idembench:{tag}:floor"
            floor, floor_name = (lambda: client.get(floor_key)), "GET (cluster)"
        else:
            floor, floor_name = client.ping, "PING"
    elif target.kind == "dynamodb":
        _ddb_table(target, _ours_url(target, tag), closers)
    idem = Idempotency.from_url(
        _ours_url(target, tag),
        client=client,
        store_options=options,
        namespace=f"bench{tag}",
        ttl=TTL,
        lease=LEASE,
        instrument=ops,
    )
    closers.append(idem.close)
    store = idem.store
    if target.kind == "dynamodb":
        # the store opened from its URL takes the lean path (a given client turns it off)
        wire = cast(Any, store)._lean_client()
        if rts is not None:
            _count_wire(wire, rts)
        table, key = _table_of(_ours_url(target, tag)), _floor_key()

        def ddb_floor() -> Any:
            return wire.call("get_item", {"TableName": table, "Key": key})

        floor, floor_name = ddb_floor, "GetItem (lean)"
    if target.kind == "sql":
        engine = getattr(store, "engine", None)
        if engine is None:
            engine = getattr(getattr(store, "_store", None), "engine", None)
        if engine is not None:
            from sqlalchemy import event

            if rts is not None:
                event.listen(engine, "before_cursor_execute", rts)

            floor, close_floor = _dbapi_floor(engine)
            floor_name = "SELECT 1 (DBAPI cursor)"
            closers.append(close_floor)
            if target.database != "sqlite":
                closers.append(lambda: _drop(engine, f"idem_bench_{tag}"))
    fn = idem.idempotent(key="order_id", scope=f"charge{tag}")(charge)

    def call(key: str) -> Any:
        return fn(key, 1)

    def claim_many(keys: Sequence[str]) -> Any:
        return idem.claim_many([(k, 1) for k in keys])

    def charge_in_steps(order_id: str, amount: int) -> Any:
        step = current_call().step
        return [step(f"s{i}", lambda: charge(order_id, amount)) for i in range(STEPS)]

    sidem = _steps_idem(target, tag, idem, closers, False, ops)
    if sidem is not idem and rts is not None:
        _count_wire(cast(Any, sidem.store)._lean_client(), rts)
    sfn = sidem.idempotent(key="order_id", scope=f"steps{tag}")(charge_in_steps)

    return SyncRig(
        "idem-core",
        call,
        (AlreadyInProgress,),
        floor,
        floor_name,
        claim_many,
        rts,
        ops,
        closers,
        lambda key: sfn(key, 1),
    )


def _dbapi_floor(engine: Any) -> tuple[Callable[[], Any], Callable[[], None]]:
    """``SELECT 1`` on a DBAPI cursor of the store's driver and URL, the way the sync SQL
    store runs its statements (cursors of kept connections, autocommit), from a pool of its
    own so that it never waits on the connections the store keeps."""
    from sqlalchemy import create_engine

    own = create_engine(engine.url, pool_size=80, max_overflow=0)
    idle: list[tuple[Any, Any]] = []
    lock = threading.Lock()

    def floor() -> Any:
        with lock:
            entry = idle.pop() if idle else None
        if entry is None:
            raw = own.raw_connection()
            dbapi = raw.dbapi_connection
            assert dbapi is not None
            own.dialect.set_isolation_level(dbapi, "AUTOCOMMIT")
            entry = (raw, raw.cursor())
        try:
            entry[1].execute("SELECT 1")
            return entry[1].fetchall()
        finally:
            with lock:
                idle.append(entry)

    def close() -> None:
        while idle:
            raw, cursor = idle.pop()
            cursor.close()
            raw.close()
        own.dispose()

    return floor, close


def _drop(engine: Any, table: str) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}_steps")  # see idem_sql.steps
        if conn.in_transaction():
            conn.commit()


async def ours_async(target: Target, tag: str, counting: bool = False) -> AsyncRig:
    ops = StoreOps() if counting else None
    rts = Counter() if counting else None
    client: Any = None
    options: dict[str, Any] = {}
    floor: Callable[[], Awaitable[Any]] | None = None
    floor_name = ""
    closers: list[Callable[[], Any]] = []
    if target.kind == "redis":
        rts = None if target.cluster else rts
        client = _redis_client(target, rts, aio=True)
        options["prefix"] = f"idembench:{tag}:"
        closers.append(client.aclose)
        if target.cluster:
            floor_key = f"idembench:{tag}:floor"
            floor, floor_name = (lambda: client.get(floor_key)), "GET (cluster)"
        else:
            floor, floor_name = client.ping, "PING"
    elif target.kind == "dynamodb":
        await asyncio.to_thread(_ddb_table, target, _ours_url(target, tag), closers)
    idem = Idempotency.from_url(
        _ours_url(target, tag),
        client=client,
        store_options=options,
        namespace=f"bench{tag}",
        ttl=TTL,
        lease=LEASE,
        instrument=ops,
    )
    closers.append(idem.aclose)
    astore = idem.astore
    if target.kind == "dynamodb":
        # this loop's lean client, the one the store's calls use
        awire = await cast(Any, astore)._get_wire()
        if rts is not None:
            _count_wire(awire, rts)
        table, key = _table_of(_ours_url(target, tag)), _floor_key()

        async def ddb_floor() -> Any:
            return await awire.call("get_item", {"TableName": table, "Key": key})

        floor, floor_name = ddb_floor, "GetItem (lean)"
    if target.kind == "sql":
        engine = getattr(astore, "engine", None)
        if engine is None:
            engine = getattr(getattr(astore, "_store", None), "engine", None)
        if engine is not None:
            from sqlalchemy import event

            if rts is not None:
                event.listen(engine.sync_engine, "before_cursor_execute", rts)

            async def sql_floor() -> Any:
                async with engine.connect() as conn:
                    return (await conn.exec_driver_sql("SELECT 1")).scalar()

            floor, floor_name = sql_floor, "SELECT 1"
            if target.database != "sqlite":

                async def adrop() -> None:
                    async with engine.connect() as conn:
                        await conn.exec_driver_sql(f"DROP TABLE IF EXISTS idem_bench_{tag}")
                        await conn.exec_driver_sql(f"DROP TABLE IF EXISTS idem_bench_{tag}_steps")
                        if conn.in_transaction():
                            await conn.commit()

                closers.append(adrop)
    fn = idem.idempotent(key="order_id", scope=f"acharge{tag}")(acharge)

    async def call(key: str) -> Any:
        return await fn(key, 1)

    async def claim_many(keys: Sequence[str]) -> Any:
        return await idem.aclaim_many([(k, 1) for k in keys])

    async def acharge_in_steps(order_id: str, amount: int) -> Any:
        astep = current_acall().astep
        return [await astep(f"s{i}", lambda: acharge(order_id, amount)) for i in range(STEPS)]

    sidem = await asyncio.to_thread(_steps_idem, target, tag, idem, closers, True, ops)
    if sidem is not idem and rts is not None:
        _count_wire(await cast(Any, sidem.astore)._get_wire(), rts)
    sfn = sidem.idempotent(key="order_id", scope=f"asteps{tag}")(acharge_in_steps)

    async def stepped(key: str) -> Any:
        return await sfn(key, 1)

    return AsyncRig(
        "idem-core",
        call,
        (AlreadyInProgress,),
        floor,
        floor_name,
        claim_many,
        rts,
        ops,
        closers,
        stepped,
    )


# -- Powertools for AWS Lambda (sync only) ----------------------------------------------


class LambdaContext:
    """What Powertools reads from a Lambda context: the time left, which bounds how long an
    in-progress record blocks others (its only lease)."""

    def __init__(self, lease: float) -> None:
        self.lease_ms = int(lease * 1000)

    def get_remaining_time_in_millis(self) -> int:
        return self.lease_ms


def powertools_supports(target: Target) -> bool:
    return (target.kind == "redis" and not target.cluster) or target.kind == "dynamodb"


def powertools_layer(target: Target, client: Any, tag: str) -> Any:
    if target.kind == "redis":
        from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
            RedisCachePersistenceLayer,
        )

        return RedisCachePersistenceLayer(client=client)
    from aws_lambda_powertools.utilities.idempotency.persistence.dynamodb import (
        DynamoDBPersistenceLayer,
    )

    table = "idem_bench_powertools"
    ensure_table(client, table, "id")
    return DynamoDBPersistenceLayer(table_name=table, boto3_client=client)


def ensure_table(client: Any, table: str, key: str) -> None:
    try:
        client.describe_table(TableName=table)
        return
    except client.exceptions.ResourceNotFoundException:
        pass
    client.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    client.get_waiter("table_exists").wait(TableName=table)


def powertools_function(layer: Any, lease: float, body: Callable[[str], Any]) -> Callable[..., Any]:
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function

    config = IdempotencyConfig(event_key_jmespath="order_id", expires_after_seconds=int(TTL))
    config.register_lambda_context(cast(Any, LambdaContext(lease)))

    def pt_charge(order: dict[str, Any]) -> dict[str, Any]:
        return {"value": body(order["order_id"])}

    decorate = idempotent_function(
        data_keyword_argument="order", persistence_store=layer, config=config
    )
    return cast(Callable[..., Any], decorate(pt_charge))


def powertools_sync(target: Target, tag: str, counting: bool = False) -> SyncRig:
    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyAlreadyInProgressError,
    )

    rts = Counter() if counting else None
    closers: list[Callable[[], Any]] = []
    if target.kind == "redis":
        client = _redis_client(target, rts, aio=False)
        closers.append(client.close)
        floor, floor_name = client.ping, "PING"
    else:
        client = _boto_client(target.server)
        closers.append(client.close)

        def ddb_floor() -> Any:
            return client.get_item(
                TableName="idem_bench_powertools", Key={"id": {"S": "idem-bench-floor"}}
            )

        floor, floor_name = ddb_floor, "GetItem"
    layer = powertools_layer(target, client, tag)
    if rts is not None and target.kind == "dynamodb":
        client.meta.events.register("before-send.dynamodb", rts)
    fn = powertools_function(layer, LEASE, lambda key: charge(key, 1))

    def call(key: str) -> Any:
        return fn(order={"order_id": key, "amount": 1})

    return SyncRig(
        "powertools",
        call,
        (IdempotencyAlreadyInProgressError,),
        floor,
        floor_name,
        None,
        rts,
        None,
        closers,
    )


# -- idemkit (async core; a sync facade over a background loop) ---------------------------


def idemkit_supports(target: Target) -> bool:
    return (
        (target.kind == "redis" and not target.cluster)
        or target.kind == "dynamodb"
        or (target.kind == "sql" and target.database == "postgresql")
    )


async def idemkit_backend(target: Target, tag: str, counting: Counter | None) -> tuple[Any, Any]:
    """(backend, async floor or None). Built on the running loop, which it binds to."""
    if target.kind == "redis":
        from idemkit.backends.redis import RedisBackend

        client = _redis_client(target, counting, aio=True)
        return RedisBackend(client, namespace=f"idembench:{tag}"), client.ping
    if target.kind == "dynamodb":
        from idemkit.backends.dynamodb import DynamoBackend

        backend = DynamoBackend(
            table="idem_bench_idemkit", endpoint_url=target.server, region_name=REGION
        )
        return backend, None
    from idemkit.backends.postgres import PostgresBackend, init_pg

    dsn = target.server or "postgresql://postgres@127.0.0.1:5432/test"
    table = "idemkit_bench"
    await init_pg(dsn, table=table)
    pg = PostgresBackend.from_url(dsn, table=table, min_size=2, max_size=70)

    async def pg_floor() -> Any:
        # idemkit's own pool: the same client its records go through
        await pg._ensure_pool()
        async with pg._pool.acquire() as conn:
            return await conn.fetchval("SELECT 1")

    return pg, pg_floor


def _scope() -> str:
    return "bench"


def idemkit_config(lease: float, wait: float) -> Any:
    from idemkit import MethodConfig

    return MethodConfig(
        key_fields=["order_id"],
        scope=cast(Any, _scope),
        lease_ttl_seconds=lease,
        wait_timeout_seconds=wait,
        expires_after_seconds=TTL,
    )


async def idemkit_async(target: Target, tag: str, counting: bool = False) -> AsyncRig:
    from idemkit.adapters.ai import idempotent
    from idemkit.core.exceptions import IdempotencyConflict

    rts = Counter() if counting else None
    backend, floor = await idemkit_backend(target, tag, rts)
    fn = idempotent(backend=backend, config=idemkit_config(LEASE, 0.0))(acharge)

    async def call(key: str) -> Any:
        return await fn(order_id=key, amount=1)

    return AsyncRig(
        "idemkit",
        call,
        (IdempotencyConflict,),
        floor,
        "PING" if target.kind == "redis" else "SELECT 1" if floor else "",
        None,
        rts if target.kind == "redis" else None,
        None,
        [backend.aclose],
    )


def idemkit_sync(target: Target, tag: str, counting: bool = False) -> SyncRig:
    from idemkit.adapters.ai import idempotent_sync
    from idemkit.core.exceptions import IdempotencyConflict
    from idemkit.core.sync_bridge import run_sync

    rts = Counter() if counting else None

    async def build() -> Any:
        return await idemkit_backend(target, tag, rts)

    backend, _ = run_sync(build())
    fn = idempotent_sync(backend=backend, config=idemkit_config(LEASE, 0.0))(charge)

    def call(key: str) -> Any:
        return fn(order_id=key, amount=1)

    return SyncRig(
        "idemkit",
        call,
        (IdempotencyConflict,),
        None,
        "",
        None,
        rts if target.kind == "redis" else None,
        None,
        [lambda: run_sync(backend.aclose())],
    )


def now_us() -> int:
    return time.time_ns() // 1000
