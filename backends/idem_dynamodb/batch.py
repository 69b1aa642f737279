"""``claim_many`` in a fixed number of requests: the claims' conditional writes as the Puts of
``TransactWriteItems``, shared by the sync and async stores.

DynamoDB applies a transaction (at most 100 items) whole or not at all. When conditions fail it
cancels it, and its ``CancellationReasons`` say, item by item, which conditions failed and
(``ReturnValuesOnConditionCheckFailure``) what those items hold. Those claims are settled as
:meth:`Plans.claim` settles a refused write (:meth:`Plans.refused`: replay, in progress,
mismatch, or another try on what was found, including the takeover of a lease watched for its
whole duration); the others go again in the next round, with the claims the first one found
takeable (expired, released, abandoned). A round is one request per 100 distinct keys (or the
server's smaller limit, learnt from its refusal); a batch that meets no race settles in two
rounds at most. Concurrent claimers can keep cancelling one another's transactions
(``TransactionConflict``), so after :data:`ROUNDS` rounds the claims still open go one by one
(:meth:`Plans.claim`). A server whose reasons lack the old items costs one consistent
``BatchGetItem`` for the refused keys of a transaction.

The first round writes only where no item exists, so its success means CLAIMED without the
replaced item (a transaction returns none). A later write is conditioned on what the refused
one found, down to whether it replaces a live lease, so CLAIMED and TOOK_OVER are what
:meth:`Plans.claim` reports from the item it replaced.

A transaction cannot touch one item twice: the first request for a key goes in the
transaction, and a later one in the same batch meets what the first left, as the second of
two successive ``claim`` calls would.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from idem_core import machine
from idem_core.errors import StoreUnavailable
from idem_core.record import RELEASED, ClaimOutcome, ClaimRequest, ClaimResult, Record, Status

from .plans import TX_CANCELED, Call, Failed, Plan, Plans, Seen, new_version
from .settings import Settings

#: transaction rounds before the claims still open go one by one
ROUNDS = 4
_INVALID = "ValidationException"
_TRANSACTION = frozenset({TX_CANCELED, _INVALID})
# How a server states its limit on the items of a transaction (DynamoDB's 100; DynamoDB
# Local before 2022 takes 10): "Member must have length less than or equal to 10".
_ITEM_LIMIT = re.compile(r"length less than or equal to (\d+)")
_REFUSED = "ConditionalCheckFailed"
# Reasons after which the claim simply goes again: its condition held ("None"), or the
# transaction met another one or throttling on that item.
_AGAIN = frozenset(
    {
        "None",
        "TransactionConflict",
        "ThrottlingError",
        "ProvisionedThroughputExceeded",
        "RequestLimitExceeded",
    }
)
# Whether the replaced item is a live lease: a claim over it is a takeover (machine.new_claim).
_LIVE_LEASE = "(#st = :ip AND #l <> :released AND #e > :now)"


def batched(settings: Settings, requests: Sequence[ClaimRequest]) -> bool:
    """Whether ``claim_many`` sends ``requests`` as transactions (``batch_from`` distinct keys
    or more; a transactional write costs twice the write units, see the docs)."""
    least = settings.batch_from
    return least is not None and len(requests) >= least and len({r.key for r in requests}) >= least


class _Claim(msgspec.Struct):
    """One key's claim across rounds: what its last refused write found, and this try."""

    index: int
    request: ClaimRequest
    known: tuple[Seen | None] = (None,)
    watched: bool = False
    outcome: ClaimOutcome = ClaimOutcome.CLAIMED
    record: Record | None = None
    version: str = ""


def claim_many(plans: Plans, requests: Sequence[ClaimRequest]) -> Plan[list[ClaimResult]]:
    now = plans.clock()
    results: list[ClaimResult | None] = [None] * len(requests)
    firsts: dict[str, _Claim] = {}
    later: list[int] = []
    for i, request in enumerate(requests):
        if request.key in firsts:
            later.append(i)
        else:
            firsts[request.key] = _Claim(i, request)
    pending = list(firsts.values())
    for _ in range(ROUNDS):
        if not pending:
            break
        again: list[_Claim] = []
        again += yield from _rounds(plans, pending, now, results)
        pending = again
    for claim in pending:
        results[claim.index] = yield from plans.claim(claim.request)
    last = {key: results[claim.index] for key, claim in firsts.items()}
    for i in later:
        before = last[requests[i].key]
        assert before is not None
        results[i] = last[requests[i].key] = yield from _again(plans, requests[i], before, now)
    done = [r for r in results if r is not None]
    assert len(done) == len(requests)
    return done


def _again(plans: Plans, request: ClaimRequest, before: ClaimResult, now: int) -> Plan[ClaimResult]:
    """A later request for a key this batch settled: it meets ``before``'s record."""
    record = before.record
    if record.status is Status.COMPLETED or (
        before.outcome.acquired and record.lease_expires_at > now
    ):
        # Our fresh claim or a completed record: a claim of its own would be refused and
        # classified, with nothing to watch.
        return ClaimResult(machine.classify(record, request, now), record)
    # Someone else's lease (rare in one batch): whether to watch it is the claim's call.
    return (yield from plans.claim(request))


def _rounds(
    plans: Plans, claims: list[_Claim], now: int, results: list[ClaimResult | None]
) -> Plan[list[_Claim]]:
    """One round: a transaction per ``plans.transaction_items`` claims; returns the claims
    to try again."""
    again: list[_Claim] = []
    size = plans.transaction_items
    for start in range(0, len(claims), size):
        again += yield from _round(plans, claims[start : start + size], now, results)
    return again


def _round(
    plans: Plans, claims: list[_Claim], now: int, results: list[ClaimResult | None]
) -> Plan[list[_Claim]]:
    """One transaction of ``claims``; returns the claims to try again."""
    items = [{"Put": _put(plans, claim, now)} for claim in claims]
    reply = yield Call("transact_write_items", {"TransactItems": items}, _TRANSACTION)
    if isinstance(reply, Failed) and reply.code == _INVALID:
        message = str(reply.response.get("Error", {}).get("Message", ""))
        limit = _ITEM_LIMIT.search(message)
        if limit is None or not 0 < int(limit[1]) < len(claims):
            raise StoreUnavailable(
                f"DynamoDB request on table {plans.settings.table!r} failed: {reply.error}"
            ) from reply.error
        # A server that takes fewer items per transaction: learnt once, for this store.
        plans.transaction_items = int(limit[1])
        return (yield from _rounds(plans, claims, now, results))
    if not isinstance(reply, Failed):
        for claim in claims:
            record = claim.record
            assert record is not None
            plans._remember(record)
            plans._wrote(record.key, claim.version)
            results[claim.index] = ClaimResult(claim.outcome, record)
        return []
    reasons: list[dict[str, Any]] = list(reply.response.get("CancellationReasons") or [])
    if len(reasons) != len(claims):
        raise StoreUnavailable(
            f"a transaction of {len(claims)} claims was cancelled with {len(reasons)} "
            f"reasons: {reply.error}"
        ) from reply.error
    missing = [c.request.key for c, r in zip(claims, reasons, strict=True) if _lacks_item(r)]
    found = (yield from _read_many(plans, missing)) if missing else {}
    again: list[_Claim] = []
    for claim, reason in zip(claims, reasons, strict=True):
        code = str(reason.get("Code"))
        if code == _REFUSED:
            key = claim.request.key
            item = found.get(key) if _lacks_item(reason) else reason["Item"]
            seen = plans._seen(item)
            claim.known = (seen,)
            settled = plans.refused(seen, claim.request, now)
            if isinstance(settled, ClaimResult):
                results[claim.index] = settled
            else:
                claim.watched = settled
                again.append(claim)
        elif code in _AGAIN:
            again.append(claim)
        else:
            # A reason a claim would meet on its own too (a validation error): let it say so.
            results[claim.index] = yield from plans.claim(claim.request)
    return again


def _lacks_item(reason: dict[str, Any]) -> bool:
    return reason.get("Code") == _REFUSED and not reason.get("Item")


def _put(plans: Plans, claim: _Claim, now: int) -> dict[str, Any]:
    """The conditional Put of ``claim``'s next try (the write ``Plans.claim`` would make)."""
    seen = claim.known[0]
    current = None if seen is None else seen.record
    floor = plans._last_fence + 1
    claim.outcome, record = machine.new_claim(current, claim.request, now, floor)
    claim.record, claim.version = record, new_version()
    condition = plans._claim_condition(claim.known, now, record.fence, claim.watched)
    if seen is not None:
        # The write succeeds only if the item still is, or still is not, a live lease: the
        # outcome (TOOK_OVER or CLAIMED) is then the one of the item it replaces.
        took_over = claim.outcome is ClaimOutcome.TOOK_OVER
        guard = _LIVE_LEASE if took_over else f"NOT {_LIVE_LEASE}"
        condition["ConditionExpression"] += f" AND {guard}"
        condition["ExpressionAttributeNames"] |= plans._names("#st", "#l", "#e")
        condition["ExpressionAttributeValues"] |= {
            ":ip": {"S": Status.IN_PROGRESS.value},
            ":released": {"N": str(RELEASED)},
            ":now": {"N": str(now)},
        }
    return {
        "TableName": plans.settings.table,
        "Item": plans.codec.item(record, claim.version),
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        **condition,
    }


def _read_many(plans: Plans, keys: list[str]) -> Plan[dict[str, dict[str, Any] | None]]:
    """The items of ``keys`` (at most 100), read consistently: one BatchGetItem, and one
    GetItem per key the server left unprocessed (throttling)."""
    table = plans.settings.table
    reply = yield Call(
        "batch_get_item",
        {
            "RequestItems": {
                table: {"Keys": [plans.codec.key(k) for k in keys], "ConsistentRead": True}
            }
        },
        frozenset(),
    )
    assert isinstance(reply, dict)
    found: dict[str, dict[str, Any] | None] = {}
    for item in reply.get("Responses", {}).get(table, []):
        found[plans.codec.key_of(item)] = item
    for left in reply.get("UnprocessedKeys", {}).get(table, {}).get("Keys", []):
        key = plans.codec.key_of(left)
        found[key] = yield from plans._read_item(key)
    return found
