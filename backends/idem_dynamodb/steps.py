"""Steps (:mod:`idem_core.steps`) on DynamoDB: one item of steps per record, next to it.

A claim writes the record with ``PutItem``, which replaces the whole item, so steps cannot
live in the record's item without every takeover dropping them. They live in a second item
of the same table (key: the record's key and ``"\\x00steps"``), one attribute per step
(``s:<name>`` = ``<until>:<data>``). Recording a step is one ``TransactWriteItems`` request:
a ``ConditionCheck`` that the caller's fence holds the record (the condition of ``complete``)
and the ``Update`` of the step's attribute, applied together or not at all. The steps item
carries the table's TTL attribute (the record's expiry as the step was written), and
``delete`` removes it with the record.
"""

from __future__ import annotations

from typing import Any

from idem_core import machine
from idem_core.errors import CorruptRecord, ResultNotSerializable, StoreUnavailable

from .plans import HOLDS, TX_CANCELED, Call, Failed, Plan, Plans

SUFFIX = "\x00steps"
_PREFIX = "s:"
# An item holds 400 KB: leave room for the key and the other steps.
MAX_STEP_SIZE = 300_000
_TRANSACTION = frozenset({TX_CANCELED})


def steps_key(key: str) -> str:
    return key + SUFFIX


def record_plan(
    plans: Plans, key: str, fence: int, name: str, data: bytes, until: int
) -> Plan[None]:
    if len(data) > MAX_STEP_SIZE:
        raise ResultNotSerializable(
            f"step {name!r} of key {key!r} is {len(data)} bytes; a DynamoDB step holds at "
            f"most {MAX_STEP_SIZE}; nothing was written"
        )
    now = plans.clock()
    table = plans.settings.table
    check = {
        **plans._base(key),
        "ConditionExpression": HOLDS,
        "ExpressionAttributeNames": plans._names("#st", "#f", "#l", "#e"),
        "ExpressionAttributeValues": plans._holds_values(fence, now),
    }
    update = {
        "TableName": table,
        "Key": plans.codec.key(steps_key(key)),
        "UpdateExpression": "SET #s = :v, #t = :ttl",
        "ExpressionAttributeNames": {"#s": _PREFIX + name, "#t": plans.codec.names["#t"]},
        "ExpressionAttributeValues": {
            ":v": {"B": str(until).encode() + b":" + bytes(data)},
            ":ttl": {"N": str(plans.codec.ttl_seconds(until))},
        },
    }
    reply = yield Call(
        "transact_write_items",
        {"TransactItems": [{"ConditionCheck": check}, {"Update": update}]},
        _TRANSACTION,
    )
    if isinstance(reply, Failed):
        reasons = list(reply.response.get("CancellationReasons") or [])
        if reasons and reasons[0].get("Code") == "ConditionalCheckFailed":
            current = yield from plans._read(key, projection=True)
            machine.after_failed_renew(current, key, fence, now)  # raises LeaseLost
        codes = ", ".join(str(r.get("Code")) for r in reasons) or reply.code
        raise StoreUnavailable(
            f"recording step {name!r} of key {key!r} was canceled: {codes}"
        ) from reply.error


def load_plan(plans: Plans, key: str) -> Plan[dict[str, tuple[int, bytes]]]:
    reply = yield Call(
        "get_item",
        {
            "TableName": plans.settings.table,
            "Key": plans.codec.key(steps_key(key)),
            "ConsistentRead": True,
        },
        frozenset(),
    )
    assert isinstance(reply, dict)
    item: dict[str, Any] = reply.get("Item") or {}
    steps: dict[str, tuple[int, bytes]] = {}
    for attr, value in item.items():
        if not attr.startswith(_PREFIX):
            continue
        try:
            raw = bytes(value["B"])
            until, _, data = raw.partition(b":")
            steps[attr[len(_PREFIX) :]] = (int(until), data)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecord(f"step {attr!r} of key {key!r} is corrupt: {exc}") from exc
    return steps


def delete_plan(plans: Plans, key: str) -> Plan[None]:
    yield Call(
        "delete_item",
        {"TableName": plans.settings.table, "Key": plans.codec.key(steps_key(key))},
        frozenset(),
    )
