"""Bulk fills: N copies of one record, made through the store, copied on the server.

The template record is claimed and completed through the store's public API, so it has
whatever layout the store writes today; a copy differs from it only in its key. That is all a
copy must know of a store's layout, and it is found rather than assumed, once per store here:

* SQL: the columns whose value is the template's key (looked up by value, so a renamed or
  added column still copies). ``INSERT ... SELECT`` over a generated series, in chunks.
* Redis: the server keys a record occupies (found with ``SCAN`` under a prefix only the
  template uses, so side keys are copied too). ``DUMP`` once, ``RESTORE`` per copy, in a
  server-side script (the copies never cross the network).

:func:`check_sample` reads copies back through the store, so a layout that ties more than the
key to a record (a checksum of the key, say) fails loudly instead of benchmarking garbage.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

from idem_core.record import ClaimRequest, Record

from .targets import Target

#: rows per ``INSERT ... SELECT`` (one transaction each), copies per Redis script call
SQL_CHUNK = 50_000
REDIS_CHUNK = 20_000


def copy_key(prefix: str, i: int) -> str:
    """The key of copy ``i`` (1-based): what the fills write, for callers to read back."""
    return f"{prefix}{i}"


def make_template(store: Any, key: str, result: bytes, ttl: float) -> Record:
    """A completed record made through the store: claim, then complete with ``result``."""
    claimed = store.claim(ClaimRequest(key, "fp", f"tpl-{key}", 30.0, ttl))
    if not claimed.outcome.acquired:
        raise RuntimeError(f"the template key {key!r} is taken: {claimed.outcome}")
    record: Record = store.complete(key, claimed.fence, result, ttl)
    return record


def check_sample(store: Any, prefix: str, n: int, samples: int = 20) -> None:
    """Reads ``samples`` random copies through the store: each must be a completed record."""
    for i in random.sample(range(1, n + 1), min(samples, n)):
        key = copy_key(prefix, i)
        record = store.get(key)
        if record is None or record.key != key or record.status.value != "completed":
            raise RuntimeError(f"copy {key!r} does not read back through the store: {record}")


# -- SQL -----------------------------------------------------------------------------------


def sql_engine(target: Target) -> Any:
    """An engine of our own on the target's database (the URL's store options removed)."""
    from sqlalchemy import create_engine

    return create_engine(target.url.split("?", 1)[0])


def key_columns(engine: Any, table: str, template: str) -> tuple[list[str], list[str]]:
    """(all columns, the columns holding ``template``): the one layout fact a copy needs."""
    from sqlalchemy import inspect, text

    columns = [c["name"] for c in inspect(engine).get_columns(table)]
    with engine.connect() as conn:  # called while the table holds a handful of rows
        found = conn.execute(text(f"SELECT * FROM {table} LIMIT 1000")).mappings().all()
    as_stored = (template, template.encode())  # MySQL keeps keys as VARBINARY
    rows = [r for r in found if any(v in as_stored for v in r.values())]
    if len(rows) != 1:
        raise RuntimeError(f"{len(rows)} rows of {table} hold the template key {template!r}")
    keyed = [c for c in columns if rows[0][c] in as_stored]
    return columns, keyed


def fill_sql(
    engine: Any,
    table: str,
    template: str,
    prefix: str,
    n: int,
    layout: tuple[list[str], list[str]],
    progress: Callable[[int], None] | None = None,
) -> float:
    """Copies the row keyed ``template`` as ``prefix1`` .. ``prefixN``; returns seconds.
    ``layout`` is :func:`key_columns`' answer, found while the table was small."""
    from sqlalchemy import text

    columns, keyed = layout
    dialect = engine.dialect.name
    q = engine.dialect.identifier_preparer.quote  # `key` is reserved in MySQL
    concat = {"postgresql": "(:p || CAST(s.n AS TEXT))", "sqlite": "(:p || s.n)"}.get(
        dialect, "CONCAT(:p, s.n)"
    )
    select = ", ".join(concat if c in keyed else f"tpl.{q(c)}" for c in columns)
    where = " AND ".join(f"tpl.{q(c)} = :tpl" for c in keyed)
    names = ", ".join(q(c) for c in columns)
    if dialect == "postgresql":
        sql = (
            f"INSERT INTO {table} ({names}) SELECT {select} FROM {table} AS tpl "
            "CROSS JOIN generate_series(CAST(:lo AS BIGINT), CAST(:hi AS BIGINT)) AS s(n) "
            f"WHERE {where}"
        )
    else:  # SQLite, MariaDB and MySQL 8: a recursive CTE counts
        sql = (
            f"INSERT INTO {table} ({names}) WITH RECURSIVE s(n) AS (SELECT :lo UNION ALL "
            f"SELECT n + 1 FROM s WHERE n < :hi) SELECT {select} FROM {table} AS tpl "
            f"CROSS JOIN s WHERE {where}"
        )
    stmt = text(sql)
    started = time.perf_counter()
    with engine.connect() as conn:
        if dialect in ("mysql", "mariadb"):
            # servers may stop a recursive CTE at 1000 rows: MySQL 8 by default, MariaDB
            # when configured so; each knows one of these two settings
            for setting in ("cte_max_recursion_depth", "max_recursive_iterations"):
                with contextlib.suppress(Exception):
                    conn.exec_driver_sql(f"SET SESSION {setting} = {SQL_CHUNK + 1}")
        for lo in range(1, n + 1, SQL_CHUNK):
            hi = min(n, lo + SQL_CHUNK - 1)
            conn.execute(stmt, {"p": prefix, "tpl": template, "lo": lo, "hi": hi})
            conn.commit()
            if progress is not None:
                progress(hi)
    return time.perf_counter() - started


def count_rows(engine: Any, table: str) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


# -- Redis ---------------------------------------------------------------------------------


def redis_keys(client: Any, pattern: str) -> list[bytes]:
    return list(client.scan_iter(match=pattern, count=1000))


#: RESTOREs one template key's payload under copies ``lo`` .. ``hi``, on the server: the copies
#: never cross the network (the script names keys it was not given, so standalone Redis only)
_RESTORE_RANGE = """
local before, after, prefix, ttl, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[6], ARGV[7]
for i = tonumber(ARGV[4]), tonumber(ARGV[5]) do
  redis.call('RESTORE', before .. prefix .. i .. after, ttl, payload, 'REPLACE')
end
return 1
"""


def fill_redis(
    client: Any,
    store_prefix: str,
    template: str,
    prefix: str,
    n: int,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Copies every server key under ``store_prefix`` whose name holds ``template`` (a key
    no other record's name contains), with ``template`` replaced by each copy's key."""
    names = redis_keys(client, f"{store_prefix}*{template}*")
    if not names:
        raise RuntimeError(f"no Redis key holds {template!r} under {store_prefix!r}")
    dumps: list[tuple[str, str, bytes, int]] = []
    for raw in names:
        before, _, after = raw.decode().partition(template)
        dumps.append((before, after, client.dump(raw), max(int(client.pttl(raw)), 0)))
    restore = client.register_script(_RESTORE_RANGE)
    started = time.perf_counter()
    for lo in range(1, n + 1, REDIS_CHUNK):
        hi = min(n, lo + REDIS_CHUNK - 1)
        for before, after, payload, ttl in dumps:
            restore(keys=[], args=[before, after, prefix, lo, hi, ttl, payload])
        if progress is not None:
            progress(hi)
    return time.perf_counter() - started


def delete_redis(client: Any, pattern: str) -> int:
    """Unlinks every key matching ``pattern`` (copies on a server we did not start)."""
    done = 0
    batch: list[bytes] = []
    for name in client.scan_iter(match=pattern, count=5000):
        batch.append(name)
        if len(batch) >= REDIS_CHUNK:
            done += client.unlink(*batch)
            batch.clear()
    if batch:
        done += client.unlink(*batch)
    return done
