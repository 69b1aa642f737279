"""Bytes per record on each store, and Redis server time per command (``--scenario footprint``).

One completed record with a 200-byte result, made through the store's public API, measured
with the server's own accounting:

* Redis: ``MEMORY USAGE`` of every server key the record occupies, and their encodings;
* DynamoDB: the item's size by DynamoDB's rules, and the write units of a first call
  (claim + complete): as returned by the server (``ReturnConsumedCapacity``, on requests that go
  through botocore) and as the rules compute them from the item's sizes;
* PostgreSQL: ``pg_column_size`` of the row; MariaDB/MySQL: its columns' stored lengths;
  SQLite: the row's payload in ``dbstat``. For SQL, also the table and its indexes on disk
  divided by the rows, with :data:`DISK_ROWS` copies of the record in the table.

Redis server time: ``INFO commandstats`` around :data:`CALLS` first calls and as many
replays, per command (calls and µs per call) and per idem-core call. On a server the bench
started itself the counters are reset first; on any other server, the bench reads them before
and after and takes the difference (other clients' traffic included, so use a quiet server).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from idem_core import Idempotency
from idem_core.record import ClaimRequest

from . import fill, targets
from .rigs import LEASE, TTL, _boto_client, _table_of, charge, run_tag
from .targets import Target

RESULT = b"r" * 200
DISK_ROWS = 10_000
CALLS = 2_000


def supports(target: Target) -> bool:
    return target.kind in ("redis", "dynamodb") or (
        target.kind == "sql" and target.database in ("sqlite", "postgresql", "mysql")
    )


def run(target: Target, calls: int = CALLS, disk_rows: int = DISK_ROWS) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target.name}
    try:
        if target.kind == "redis":
            with _redis_server(target) as (server, private, note):
                out["server"] = note
                out["record"] = redis_record(server)
                if not server.cluster:
                    out["server_time"] = redis_server_time(server, private, calls)
        elif target.kind == "dynamodb":
            out["record"] = dynamodb_record(target)
        elif target.kind == "sql":
            out["record"] = sql_record(target, disk_rows)
        else:
            out["skipped"] = "no per-record accounting for this store"
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:400]
    return out


def _key(tag: str) -> str:
    """A store key as the library builds them (namespace:scope:key) with a unique part."""
    return f"bench{tag}:charge:order-{tag}-0001"


# -- Redis ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _redis_server(target: Target) -> Iterator[tuple[Target, bool, str]]:
    if target.shared and not target.cluster:
        private = targets.PrivateRedis.start()
        if private is not None:
            try:
                yield targets.target_for_url(private.url, target.name), True, private.describe()
            finally:
                private.stop()
            return
    yield target, False, "the target's own server"


def _redis_client(target: Target) -> Any:
    from .rigs import _redis_client as make

    return make(target, None, aio=False)


def redis_record(target: Target) -> dict[str, Any]:
    tag = run_tag()
    prefix = f"idemfp:{tag}:"
    idem = Idempotency.from_url(target.url, store_options={"prefix": prefix})
    client = _redis_client(target)
    try:
        key = _key(tag)
        fill.make_template(idem.store, key, RESULT, TTL)
        names = sorted(client.scan_iter(match=f"{prefix}*", count=1000))
        if target.cluster and not names:
            names = sorted(
                name
                for node in client.get_primaries()
                for name in client.scan_iter(match=f"{prefix}*", target_nodes=node)
            )
        keys = []
        for name in names:
            keys.append(
                {
                    "key": name.decode(),
                    "bytes": int(client.memory_usage(name, samples=0)),
                    "type": _text(client.type(name)),
                    "encoding": _text(client.object("encoding", name)),
                }
            )
        version = client.info("server").get("redis_version") if not target.cluster else None
        return {
            "result_bytes": len(RESULT),
            "key_length": len(prefix) + len(key),
            "bytes": sum(k["bytes"] for k in keys),
            "keys": keys,
            "redis_version": version,
        }
    finally:
        with contextlib.suppress(Exception):
            for name in client.scan_iter(match=f"{prefix}*"):
                client.delete(name)
        client.close()
        idem.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def commandstats(client: Any) -> dict[str, dict[str, float]]:
    """``INFO commandstats`` as {command: {calls, usec}}."""
    stats: dict[str, dict[str, float]] = {}
    for name, value in client.info("commandstats").items():
        if name.startswith("cmdstat_"):
            stats[name[8:]] = {"calls": float(value["calls"]), "usec": float(value["usec"])}
    return stats


#: commands that run a script; the commands a script runs are counted on their own too, and
#: their time is part of the script's
_SCRIPTS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})
_ADMIN = frozenset({"info", "config|resetstat", "config", "ping", "hello", "client|setinfo"})


def redis_server_time(target: Target, private: bool, calls: int) -> dict[str, Any]:
    """Server µs per command and per call, for first calls and for replays."""
    tag = run_tag()
    prefix = f"idemst:{tag}:"
    idem = Idempotency.from_url(
        target.url, store_options={"prefix": prefix}, namespace=f"st{tag}", ttl=TTL, lease=LEASE
    )
    client = _redis_client(target)
    fn = idem.idempotent(key="order_id", scope="charge")(charge)
    out: dict[str, Any] = {
        "calls": calls,
        "method": "CONFIG RESETSTAT on a server the bench started"
        if private
        else "difference of INFO commandstats before/after (other clients included)",
    }
    try:
        fn("warm", 1)
        for phase in ("first", "replay"):
            if private:
                client.config_resetstat()
            before = commandstats(client)
            for i in range(calls):
                fn(f"{tag}-{i}", 1)  # new keys in the first phase, the same ones replayed
            after = commandstats(client)
            commands: dict[str, Any] = {}
            scripts = script_usec = 0.0
            for name, now in after.items():
                if name in _ADMIN:
                    continue
                was = before.get(name, {"calls": 0.0, "usec": 0.0})
                n, usec = now["calls"] - was["calls"], now["usec"] - was["usec"]
                if n <= 0:
                    continue
                if name in _SCRIPTS:
                    scripts += n
                    script_usec += usec
                commands[name] = {"calls": int(n), "usec_per_call": round(usec / n, 2)}
            out[phase] = {
                "commands": commands,
                "scripts_per_call": round(scripts / calls, 2),
                "us_per_script": round(script_usec / scripts, 2) if scripts else None,
                "script_us_per_call": round(script_usec / calls, 2),
            }
        return out
    finally:
        with contextlib.suppress(Exception):
            for name in client.scan_iter(match=f"{prefix}*"):
                client.delete(name)
        client.close()
        idem.close()


# -- DynamoDB ------------------------------------------------------------------------------


def item_size(item: dict[str, Any]) -> int:
    """An item's size by DynamoDB's rules: each attribute's name (UTF-8) plus its value."""
    return sum(len(name.encode()) + _value_size(value) for name, value in item.items())


def _value_size(value: dict[str, Any]) -> int:
    (kind, v), *_ = value.items()
    if kind == "S":
        return len(v.encode())
    if kind == "B":
        return len(v)
    if kind == "N":
        return _number_size(v)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(x.encode()) for x in v)
    if kind == "BS":
        return sum(len(x) for x in v)
    if kind == "NS":
        return sum(_number_size(x) for x in v)
    if kind == "M":  # 3 bytes for the map, 1 per element, then names and values
        return 3 + sum(1 + len(k.encode()) + _value_size(x) for k, x in v.items())
    if kind == "L":
        return 3 + sum(1 + _value_size(x) for x in v)
    raise ValueError(f"unknown DynamoDB type {kind!r}")


def _number_size(text: str) -> int:
    """1 byte per 2 significant digits (leading and trailing zeros trimmed), plus 1."""
    digits = format(abs(Decimal(text)), "f").replace(".", "").strip("0")
    return math.ceil(max(len(digits), 1) / 2) + 1


def write_units(size_before: int, size_after: int) -> int:
    """Standard write units of one write: the larger of the item before and after, per KB."""
    return max(1, math.ceil(max(size_before, size_after) / 1024))


class _Capacity:
    """botocore hooks: ask for ``ReturnConsumedCapacity`` on writes and add up the units."""

    WRITES = ("PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem")

    def __init__(self, client: Any) -> None:
        self.units = 0.0
        self.requests = 0
        client.meta.events.register("provide-client-params.dynamodb.*", self.ask)
        client.meta.events.register("after-call.dynamodb.*", self.add)

    def ask(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name in self.WRITES:
            params.setdefault("ReturnConsumedCapacity", "TOTAL")

    def add(self, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name not in self.WRITES:
            return
        self.requests += 1
        consumed = parsed.get("ConsumedCapacity")
        for entry in consumed if isinstance(consumed, list) else [consumed] if consumed else []:
            self.units += float(entry.get("CapacityUnits") or 0)


def dynamodb_record(target: Target) -> dict[str, Any]:
    tag = run_tag()
    client = _boto_client(target.server)
    capacity = _Capacity(client)
    idem = Idempotency.from_url(target.url, client=client)
    store = idem.store
    table = _table_of(target.url)
    try:
        getattr(store, "setup", lambda: None)()
        key = _key(tag)
        hash_key = next(
            k["AttributeName"]
            for k in client.describe_table(TableName=table)["Table"]["KeySchema"]
            if k["KeyType"] == "HASH"
        )
        claimed = store.claim(ClaimRequest(key, "fp", f"a-{tag}", LEASE, TTL))
        units_claim, requests_claim = capacity.units, capacity.requests
        claimed_item = _raw_item(client, table, hash_key, key)
        store.complete(key, claimed.fence, RESULT, TTL)
        units, requests = capacity.units, capacity.requests
        item = _raw_item(client, table, hash_key, key)
        size_claimed, size = item_size(claimed_item), item_size(item)
        computed = write_units(0, size_claimed) + write_units(size_claimed, size)
        store.delete(key)
        return {
            "result_bytes": len(RESULT),
            "item_bytes": size,
            "item_bytes_in_progress": size_claimed,
            "attributes": sorted(item),
            "write_units_first_call": computed,
            "write_units_measured": units if requests else None,
            "write_requests_seen": requests,
            "measured_note": None
            if requests
            else "the store's writes bypass botocore: units computed from the item sizes",
            "claim_units_measured": units_claim if requests_claim else None,
        }
    finally:
        idem.close()
        client.close()


def _raw_item(client: Any, table: str, hash_key: str, key: str) -> dict[str, Any]:
    """The item as stored: by its key, or the one whose hash key ends with it (a prefix)."""
    found = client.get_item(TableName=table, Key={hash_key: {"S": key}}, ConsistentRead=True)
    if "Item" in found:
        return dict(found["Item"])
    pages = client.get_paginator("scan").paginate(
        TableName=table,
        FilterExpression="contains(#k, :k)",
        ExpressionAttributeNames={"#k": hash_key},
        ExpressionAttributeValues={":k": {"S": key}},
        ConsistentRead=True,
    )
    for page in pages:
        for item in page.get("Items", []):
            return dict(item)
    raise RuntimeError(f"no item for {key!r} in {table}")


# -- SQL -----------------------------------------------------------------------------------


def sql_record(target: Target, disk_rows: int) -> dict[str, Any]:
    tag = run_tag()
    table = f"idem_fp_{tag}"
    idem = Idempotency.from_url(targets.with_params(target.url, table=table))
    engine = fill.sql_engine(target)
    try:
        key = _key(tag)
        fill.make_template(idem.store, key, RESULT, TTL)
        layout = fill.key_columns(engine, table, key)
        out: dict[str, Any] = {"result_bytes": len(RESULT)}
        out.update(_row_bytes(engine, table, layout[1][0], key))
        fill.fill_sql(engine, table, key, f"fp{tag}-", disk_rows, layout)
        out.update(_disk_bytes(engine, table))
        return out
    finally:
        idem.close()
        from .rigs import _drop

        with contextlib.suppress(Exception):
            _drop(engine, table)
        engine.dispose()


def _row_bytes(engine: Any, table: str, key_column: str, key: str) -> dict[str, Any]:
    from sqlalchemy import text

    dialect = engine.dialect.name
    q = engine.dialect.identifier_preparer.quote
    key_column = q(key_column)
    with engine.connect() as conn:
        if dialect == "postgresql":
            size = conn.execute(
                text(f"SELECT pg_column_size(t.*) FROM {table} AS t WHERE {key_column} = :k"),
                {"k": key},
            ).scalar_one()
            return {"row_bytes": int(size), "row_measure": "pg_column_size(t.*)"}
        if dialect == "sqlite":
            size = conn.execute(
                text("SELECT SUM(payload) FROM dbstat WHERE name = :t"), {"t": table}
            ).scalar_one()
            return {"row_bytes": int(size), "row_measure": "dbstat payload (1 row)"}
        # MySQL/MariaDB: the stored length of each column (numbers by their type)
        columns = conn.execute(
            text(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = :t"
            ),
            {"t": table},
        ).all()
        fixed = {"tinyint": 1, "smallint": 2, "mediumint": 3, "int": 4, "bigint": 8}
        fixed.update({"double": 8, "float": 4, "datetime": 8, "timestamp": 4, "date": 3})
        parts = [
            str(fixed[kind]) if kind in fixed else f"COALESCE(LENGTH({q(name)}), 0)"
            for name, kind in columns
        ]
        size = conn.execute(
            text(f"SELECT {' + '.join(parts)} FROM {table} WHERE {key_column} = :k"), {"k": key}
        ).scalar_one()
        return {"row_bytes": int(size), "row_measure": "sum of column lengths"}


def _disk_bytes(engine: Any, table: str) -> dict[str, Any]:
    from sqlalchemy import text

    dialect = engine.dialect.name
    with engine.connect() as conn:
        rows = int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())
        if dialect == "postgresql":
            data, index = conn.execute(
                text("SELECT pg_table_size(:t), pg_indexes_size(:t)"), {"t": table}
            ).one()
        elif dialect == "sqlite":
            data = conn.execute(
                text("SELECT SUM(pgsize) FROM dbstat WHERE name = :t"), {"t": table}
            ).scalar_one()
            index = conn.execute(
                text(
                    "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN "
                    "(SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = :t)"
                ),
                {"t": table},
            ).scalar_one()
        else:
            conn.exec_driver_sql(f"ANALYZE TABLE {table}")
            data, index = conn.execute(
                text(
                    "SELECT data_length, index_length FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_name = :t"
                ),
                {"t": table},
            ).one()
    return {
        "disk_rows": rows,
        "disk_bytes_per_row": round(int(data) / rows, 1),
        "index_bytes_per_row": round(int(index) / rows, 1),
    }
