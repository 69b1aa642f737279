"""``scan`` for the DynamoDB stores: a paginated ``Scan`` (or ``Query`` on a shared table).

On a table of its own (no sort key) there is no index to list records by, so ``idem ls``
runs a ``Scan``: it reads, and is billed for, the whole table, ``page_size`` items per
request (``Limit``), the filter applied by DynamoDB after the read (``FilterExpression``),
the results left out (``ProjectionExpression``). On a shared table (``sort_key=``) the
store's records are one partition: a ``Query`` on it, with ``begins_with`` on the sort key
for a prefix, reads only those. Either way the client holds one page at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from idem_core.record import Record, Status
from idem_core.scanning import ScanFilter

from .plans import Call, Plan

FULL_SCAN_NOTE = (
    "DynamoDB lists with a paginated Scan: it reads (and bills) the whole table, a page at a time"
)
QUERY_NOTE = "DynamoDB lists with a paginated Query on this namespace's partition"
_PROJECTED = ("#k", "#st", "#fp", "#f", "#l", "#e", "#a", "#c", "#u")


def request(plans: Any, where: ScanFilter, page_size: int) -> tuple[str, dict[str, Any]]:
    """The operation (``scan`` or ``query``) and its arguments, without the start key."""
    s = plans.settings
    names = {p: plans.codec.names[p] for p in _PROJECTED}
    projection = ", ".join(_PROJECTED)
    values: dict[str, Any] = {}
    filters: list[str] = []
    key_cond: list[str] = []
    if s.sort_key is not None:
        names["#sk"] = s.sort_key
        projection += ", #sk"
        values[":ns"] = {"S": s.namespace}
        key_cond.append("#k = :ns")
        if where.prefix:
            values[":px"] = {"S": where.prefix}
            key_cond.append("begins_with(#sk, :px)")
    elif where.prefix:
        values[":px"] = {"S": where.prefix}
        filters.append("begins_with(#k, :px)")
    if where.status is not None:
        values[":st"] = {"S": where.status.value}
        filters.append("#st = :st")
    for attr, name, value in (
        ("#u", ":ub", where.updated_before),
        ("#c", ":cb", where.created_before),
    ):
        if value is not None:
            values[name] = {"N": str(value)}
            filters.append(f"{attr} < {name}")
    if where.alive_at is not None:
        values[":alive"] = {"N": str(where.alive_at)}
        filters.append("#e > :alive")
    if where.lapsed_at is not None:
        values[":ip"] = {"S": Status.IN_PROGRESS.value}
        values[":zero"] = {"N": "0"}
        values[":lapsed"] = {"N": str(where.lapsed_at)}
        filters.append("#st = :ip AND #l <> :zero AND #l <= :lapsed")
    kwargs: dict[str, Any] = {
        "TableName": s.table,
        "Limit": page_size,
        "ProjectionExpression": projection,
        "ExpressionAttributeNames": names,
        # Eventually consistent: half the read units of a full-table read. A listing may
        # miss a write of the last second; ``inspect`` (a consistent GetItem) never does.
    }
    if filters:
        kwargs["FilterExpression"] = " AND ".join(filters)
    if values:
        kwargs["ExpressionAttributeValues"] = values
    if key_cond:
        kwargs["KeyConditionExpression"] = " AND ".join(key_cond)
        return "query", kwargs
    return "scan", kwargs


def page(plans: Any, op: str, kwargs: dict[str, Any]) -> Plan[tuple[list[Record], Any]]:
    reply = yield Call(op, kwargs, frozenset())
    assert isinstance(reply, dict)
    records = [plans.codec.record(item) for item in reply.get("Items", [])]
    return [r for r in records if r is not None], reply.get("LastEvaluatedKey")


def scan_pages(store: Any, where: ScanFilter, page_size: int) -> Iterator[list[Record]]:
    op, kwargs = request(store.plans, where, page_size)
    while True:
        records, last = store._run(page(store.plans, op, kwargs))
        if records:
            yield records
        if not last:
            return
        kwargs = {**kwargs, "ExclusiveStartKey": last}


def note(plans: Any) -> str:
    return FULL_SCAN_NOTE if plans.settings.sort_key is None else QUERY_NOTE
