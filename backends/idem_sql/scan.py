"""``scan`` for the SQL stores: keyset pagination on the primary key.

Each page is one short ``SELECT ... WHERE key > :after ... ORDER BY key LIMIT :n``, so no
cursor stays open between pages, the database walks its primary-key index, and the client
holds one page whatever the table's size. Results are not read (``idem ls`` does not show
them). Every filter of :class:`~idem_core.scanning.ScanFilter` runs on the server; the prefix
is compared with ``SUBSTR`` (exact, case included, whatever the collation: ``LIKE`` ignores
case on SQLite and MySQL).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy.sql.elements import TextClause

from idem_core.record import Record, Status
from idem_core.scanning import ScanFilter

from .ops import SQL, Program, decode

_IN_PROGRESS = Status.IN_PROGRESS.value
# Statements built per SQL object and filter shape (at most 2**7 of them).
_built: weakref.WeakKeyDictionary[SQL, dict[tuple[bool, ...], TextClause]] = (
    weakref.WeakKeyDictionary()
)


def _statement(sql: SQL, shape: tuple[bool, ...]) -> TextClause:
    per_sql = _built.setdefault(sql, {})
    stmt = per_sql.get(shape)
    if stmt is not None:
        return stmt
    after, status, prefix, updated, created, alive, lapsed = shape
    c, t = sql.c, sql.t
    key = c["key"]
    cols = ", ".join(c[name] for name in c if name != "result")
    where = []
    if after:
        where.append(f"{key} > :after")
    if status:
        where.append("status = :status")
    if prefix:
        where.append(f"SUBSTR({key}, 1, :plen) = :prefix")
    if updated:
        where.append("updated_at < :updated")
    if created:
        where.append("created_at < :created")
    if alive:
        where.append("expires_at > :alive")
    if lapsed:
        where.append(
            f"status = '{_IN_PROGRESS}' AND lease_expires_at <> 0 AND lease_expires_at <= :lapsed"
        )
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    stmt = per_sql[shape] = sql._text(f"SELECT {cols} FROM {t}{cond} ORDER BY {key} LIMIT :n")
    return stmt


def _page(stmt: TextClause, params: dict[str, Any]) -> Program[list[Record]]:
    rows = (yield stmt, params).rows
    return [decode((*row, None)) for row in rows]


def scan_pages(store: Any, where: ScanFilter, page_size: int) -> Iterator[list[Record]]:
    """Pages of at most ``page_size`` records (see :mod:`idem_core.scanning`); ``store`` is
    a :class:`~idem_sql.store.SQLStore` (its ``_run``/``_execute`` translate errors)."""
    sql: SQL = store.sql
    params: dict[str, Any] = {"n": page_size}
    if where.status is not None:
        params["status"] = where.status.value
    if where.prefix:
        binary = sql.dialect.name in ("mysql", "mariadb")  # keys are VARBINARY there
        params["prefix"] = where.prefix.encode() if binary else where.prefix
        params["plen"] = len(params["prefix"])
    for name, value in (
        ("updated", where.updated_before),
        ("created", where.created_before),
        ("alive", where.alive_at),
        ("lapsed", where.lapsed_at),
    ):
        if value is not None:
            params[name] = value
    flags = ("status", "prefix", "updated", "created", "alive", "lapsed")
    shape = tuple(name in params for name in flags)
    after: str | None = None
    while True:
        if after is not None:
            params["after"] = after.encode() if sql.dialect.name in ("mysql", "mariadb") else after
        page: list[Record] = store._run(
            lambda stmt=_statement(sql, (after is not None, *shape)), now=dict(params): (
                store._execute(_page(stmt, now))
            )
        )
        if page:
            yield page
        if len(page) < page_size:
            return
        after = page[-1].key
