"""Steps (:mod:`idem_core.steps`) on SQL: a second table, one row per key and step.

Recording a step is one statement: an ``INSERT … SELECT`` that copies the key from the record
row only while the caller's fence holds it (the condition of ``complete``), upserting the
step's row. A zombie's step selects no row and writes nothing. Run on a store bound to the
caller's connection (``call.step(..., connection=conn)``), the step's row commits or rolls back
with the caller's own writes.

The table is ``<records table>_steps``; ``idem setup`` (and the first use, like the records
table) creates it. Rows of a record that was deleted go with it; rows of an expired record are
never counted again (see the generation rule in :mod:`idem_core.steps`) and ``purge_expired``
deletes them.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import TextClause

from idem_core import machine

from .common import setup_on
from .ops import SQL, Program, _bind_names
from .schema import _KEY_TYPE, _RESULT_TYPE, check_identifier

#: longest step name, in characters
MAX_STEP_NAME = 200
_STEP_TYPE = String(MAX_STEP_NAME).with_variant(
    mysql.VARBINARY(4 * MAX_STEP_NAME), "mysql", "mariadb"
)
_TYPES: dict[str, Any] = {
    "key": String(),
    "fence": BigInteger(),
    "step": String(),
    "until": BigInteger(),
    "result": LargeBinary(),
    "result_hex": String(),
    "batch": BigInteger(),
}


def steps_table_name(records: str) -> str:
    return check_identifier(f"{records}_steps"[:63])


def steps_table(metadata: MetaData, records: str) -> Table:
    """The steps table of the records table ``records`` (for Alembic or ``create_all``)."""
    name = steps_table_name(records)
    return Table(
        name,
        metadata,
        Column("key", _KEY_TYPE, primary_key=True),
        Column("step", _STEP_TYPE, primary_key=True),
        Column("alive_until", BigInteger, nullable=False),
        Column("fence", BigInteger, nullable=False),
        Column("result", _RESULT_TYPE, nullable=False),
        Index(f"ix_{name}_alive_until"[:63], "alive_until"),
    )


def _text(sql: str) -> TextClause:
    names = _bind_names(sql)
    return text(sql).bindparams(
        *(bindparam(n, type_=t) for n, t in _TYPES.items() if f":{n}" in names)
    )


class StepSQL:
    """The statements of one steps table, next to the records table of ``sql``."""

    def __init__(self, sql: SQL) -> None:
        self.sql = sql
        dialect = sql.dialect
        quote = dialect.identifier_preparer.quote
        self.table = steps_table(MetaData(), sql.table)
        st, rt, k, now = quote(self.table.name), sql.t, sql.c["key"], sql.now
        self.mysql = dialect.name in ("mysql", "mariadb")
        insert = (
            f"INSERT INTO {st} ({k}, step, alive_until, fence, result) "
            f"SELECT {rt}.{k}, :step, :until, fence, {sql.result_sql()} FROM {rt} "
            f"WHERE {sql.holds}"
        )
        if self.mysql:
            insert += (
                f" ON DUPLICATE KEY UPDATE {st}.alive_until = VALUES(alive_until), "
                f"{st}.fence = VALUES(fence), {st}.result = VALUES(result)"
            )
            purge = f"DELETE FROM {st} WHERE alive_until <= {now} ORDER BY alive_until LIMIT :batch"
        else:
            insert += (
                f" ON CONFLICT ({k}, step) DO UPDATE SET alive_until = excluded.alive_until, "
                "fence = excluded.fence, result = excluded.result"
            )
            purge = (
                f"DELETE FROM {st} WHERE {k} IN (SELECT {k} FROM {st} "
                f"WHERE alive_until <= {now} LIMIT :batch) AND alive_until <= {now}"
            )
        self.stmt_record = _text(insert)
        self.stmt_load = _text(f"SELECT step, alive_until, result FROM {st} WHERE {k} = :key")
        self.stmt_delete = _text(f"DELETE FROM {st} WHERE {k} = :key")
        self.stmt_purge = _text(purge)

    def record(self, key: str, fence: int, name: str, data: bytes, until: int) -> Program[None]:
        params = {"key": key, "fence": fence, "step": name, "until": until}
        params.update(self.sql.result_param(bytes(data)))
        done = yield self.stmt_record, params
        if done.rowcount > 0:
            return
        # Nothing written: not the holder, or (MySQL) the same values were there already.
        current, now = yield from self.sql.read(key)
        if machine.holds(current, fence, now):
            return
        machine.after_failed_renew(current, key, fence, now)  # raises LeaseLost

    def load(self, key: str) -> Program[dict[str, tuple[int, bytes]]]:
        rows = (yield self.stmt_load, {"key": key}).rows
        out: dict[str, tuple[int, bytes]] = {}
        for name, until, data in rows:
            if isinstance(name, bytes | bytearray | memoryview):
                name = bytes(name).decode()
            out[str(name)] = (int(until), bytes(data))
        return out

    def delete(self, key: str) -> Program[None]:
        yield self.stmt_delete, {"key": key}

    def purge(self, batch: int) -> Program[int]:
        total = 0
        while True:
            done = yield self.stmt_purge, {"batch": batch}
            total += max(done.rowcount, 0)
            if done.rowcount < batch:
                return total


_BY_SQL: weakref.WeakKeyDictionary[SQL, StepSQL] = weakref.WeakKeyDictionary()


def step_sql(sql: SQL) -> StepSQL:
    found = _BY_SQL.get(sql)
    if found is None:
        found = _BY_SQL[sql] = StepSQL(sql)
    return found


def setup_steps_on(conn: Connection, sql: SQL) -> bool:
    """Create the steps table and its index if missing; whether it existed."""
    return setup_on(conn, step_sql(sql).table)


def _check(store: Any, key: str, data: bytes) -> None:
    store._check_result(key, data)


# The stores' thin methods delegate here (sync, then async).


def record_step(store: Any, key: str, fence: int, name: str, data: bytes, until: int) -> None:
    _check(store, key, data)
    program = step_sql(store.sql).record
    store._run(lambda: store._execute(program(key, fence, name, data, until)))


def load_steps(store: Any, key: str) -> dict[str, tuple[int, bytes]]:
    program = step_sql(store.sql).load
    result: dict[str, tuple[int, bytes]] = store._run(lambda: store._execute(program(key)))
    return result


def delete_steps(store: Any, key: str) -> None:
    program = step_sql(store.sql).delete
    store._run(lambda: store._execute(program(key)))


def purge_steps(store: Any, batch: int) -> int:
    program = step_sql(store.sql).purge
    done: int = store._run(lambda: store._execute(program(batch)))
    return done


async def arecord_step(
    store: Any, key: str, fence: int, name: str, data: bytes, until: int
) -> None:
    _check(store, key, data)
    program = step_sql(store.sql).record
    await store._run(lambda: store._execute(program(key, fence, name, data, until)))


async def aload_steps(store: Any, key: str) -> dict[str, tuple[int, bytes]]:
    program = step_sql(store.sql).load
    result: dict[str, tuple[int, bytes]] = await store._run(lambda: store._execute(program(key)))
    return result


async def adelete_steps(store: Any, key: str) -> None:
    program = step_sql(store.sql).delete
    await store._run(lambda: store._execute(program(key)))


async def apurge_steps(store: Any, batch: int) -> int:
    program = step_sql(store.sql).purge
    done: int = await store._run(lambda: store._execute(program(batch)))
    return done
