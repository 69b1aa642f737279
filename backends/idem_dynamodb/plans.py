"""Every store operation once, as a generator of DynamoDB calls, shared by sync and async.

A plan yields :class:`Call` objects; the driver (``store.py`` or ``aio.py``) performs each
call and sends back the response dict, or a :class:`Failed` when the call failed with one of
the error codes the call expects (a failed condition). Other driver errors never reach the
plan: the driver raises ``StoreUnavailable``. The plan returns the operation's result.

The write conditions are the translation of :func:`idem_core.machine.holds` and of
:func:`idem_core.machine.takeable`, with one deliberate difference: with no shared clock, a
live-looking lease is taken over only by a store that watched it lapse (``Plans.watched``),
or by the wall clock once it ended ``skew_allowance`` ago. Whatever comes back is
interpreted by the machine.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Generator, Sequence
from typing import Any, TypeVar

import msgspec

from idem_core import machine
from idem_core.errors import ConfigurationError, IdempotencyError, StoreUnavailable
from idem_core.record import RELEASED, ClaimRequest, ClaimResult, Record, Status

from .codec import Codec
from .settings import Settings

T = TypeVar("T")

CONDITION_FAILED = "ConditionalCheckFailedException"
TX_CANCELED = "TransactionCanceledException"
NOT_FOUND = "ResourceNotFoundException"
_CONDITIONAL = frozenset({CONDITION_FAILED})
_TRANSACTION = frozenset({TX_CANCELED})
_MISSING = frozenset({NOT_FOUND})
_SLEEP = "__sleep__"
# A claim races only with other claims of the same key, each of which makes progress.
_CLAIM_TRIES = 16
_RENEW_TRIES = 4
_PROBE_KEY = "__idem_probe__"
_CACHE_SIZE = 4096
# Leases being watched per store; forgetting one only delays its takeover.
_WATCH_SIZE = 65536

# When a claim may overwrite the stored item by the wall clock alone: absent; COMPLETED and
# expired by our clock (the replay window is a wall-clock promise); IN_PROGRESS and released,
# or its lease ended more than the skew allowance ago (``:far`` is our clock minus it). A live
# lease is otherwise taken over only by a claimer that watched it (see ``Plans.watched``).
TAKEABLE = (
    "(attribute_not_exists(#k) OR (#st <> :ip AND #e <= :now)"
    " OR (#st = :ip AND (#l = :released OR #l <= :far)))"
)
# A takeover of a lease this store watched for a whole lease: nobody changed it meanwhile.
WATCHED = "(#st = :ip AND #f = :prev AND #v = :ver)"
WATCHED_LEGACY = "(#st = :ip AND #f = :prev AND attribute_not_exists(#v) AND #l = :plapse)"
HOLDS = "(#st = :ip AND #f = :fence AND #l <> :released AND #e > :now)"


class Call(msgspec.Struct):
    op: str
    kwargs: dict[str, Any]
    #: error codes handed back to the plan as ``Failed`` instead of raising StoreUnavailable
    expect: frozenset[str] = _CONDITIONAL


class Failed(msgspec.Struct):
    code: str
    response: dict[str, Any]
    error: BaseException


Reply = dict[str, Any] | Failed
Plan = Generator[Call, Reply, T]


class Seen(msgspec.Struct, frozen=True):
    """A stored record and its lease version."""

    record: Record
    version: str


def new_version() -> str:
    return secrets.token_hex(8)


class TransactionCanceled(IdempotencyError):
    """One of the caller's own ``with_items`` failed its condition: nothing was written.

    ``reasons`` are DynamoDB's cancellation reasons, one per item (ours first); the record
    is still held by the caller, who may release it or retry.
    """

    def __init__(self, key: str, reasons: list[dict[str, Any]]) -> None:
        codes = ", ".join(str(r.get("Code")) for r in reasons)
        super().__init__(
            f"the transaction completing key {key!r} was canceled by the caller's items "
            f"[{codes}]; nothing was written and the claim is still held"
        )
        self.key = key
        self.reasons = reasons


class Plans:
    """The operations of one store: settings, codec, clock and what it learnt of the server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codec(settings)
        self.clock = settings.clock
        self.monotonic = settings.monotonic
        #: whether failed conditions return the old item; None until a claim shows it
        self.returns_old: bool | None = None
        #: items per TransactWriteItems of ``claim_many`` (``batch.py``): DynamoDB's limit,
        #: lowered when a server states a smaller one
        self.transaction_items = 100
        self._last_fence = 0
        # Records this store claimed, so a transactional completion (which cannot return the
        # old item) still builds its result record with the machine without another read.
        self._claimed: dict[tuple[str, int], Record] = {}
        # key -> (lease version, monotonic microseconds when this store first saw it)
        self._watch: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    # -- helpers --------------------------------------------------------------------------

    def _base(self, key: str) -> dict[str, Any]:
        return {"TableName": self.settings.table, "Key": self.codec.key(key)}

    def _names(self, *placeholders: str) -> dict[str, str]:
        names = self.codec.names
        return {p: names[p] for p in placeholders}

    def _remember(self, record: Record) -> None:
        with self._lock:
            self._last_fence = max(self._last_fence, record.fence)
            if len(self._claimed) >= _CACHE_SIZE:
                self._claimed.pop(next(iter(self._claimed)))
            self._claimed[(record.key, record.fence)] = record

    def _forget(self, key: str, fence: int) -> Record | None:
        with self._lock:
            return self._claimed.pop((key, fence), None)

    def _read_item(self, key: str, *, projection: bool = False) -> Plan[dict[str, Any] | None]:
        kwargs: dict[str, Any] = {**self._base(key), "ConsistentRead": True}
        if projection:
            # Everything but the (possibly large) result.
            kwargs["ProjectionExpression"] = "#k, #st, #fp, #f, #l, #e, #a, #c, #u"
            kwargs["ExpressionAttributeNames"] = self._names(
                "#k", "#st", "#fp", "#f", "#l", "#e", "#a", "#c", "#u"
            )
            if self.settings.sort_key is not None:
                kwargs["ProjectionExpression"] += ", #sk"
                kwargs["ExpressionAttributeNames"]["#sk"] = self.settings.sort_key
        reply = yield Call("get_item", kwargs, frozenset())
        assert isinstance(reply, dict)
        item: dict[str, Any] | None = reply.get("Item")
        return item

    def _read(self, key: str, *, projection: bool = False) -> Plan[Record | None]:
        item = yield from self._read_item(key, projection=projection)
        return self.codec.record(item)

    def _seen(self, item: dict[str, Any] | None) -> Seen | None:
        record = self.codec.record(item)
        if record is None or item is None:
            return None
        return Seen(record, self.codec.version(item, record))

    def _old_seen(self, failed: Failed, key: str, *, must_exist: bool = False) -> Plan[Seen | None]:
        """The item a failed condition saw: from the failure itself, or one consistent read.

        ``must_exist`` says the condition could only fail on an existing item, so a failure
        without it shows that the server does not return old items.
        """
        item = failed.response.get("Item")
        if item is None and failed.code == TX_CANCELED:
            reasons = failed.response.get("CancellationReasons") or [{}]
            item = reasons[0].get("Item")
        if item is not None:
            self.returns_old = True
            return self._seen(item)
        if must_exist:
            self.returns_old = False
        if self.returns_old:
            return None
        item = yield from self._read_item(key)
        return self._seen(item)

    def _old(self, failed: Failed, key: str, *, must_exist: bool = False) -> Plan[Record | None]:
        seen = yield from self._old_seen(failed, key, must_exist=must_exist)
        return None if seen is None else seen.record

    # -- watching leases ------------------------------------------------------------------

    def watched(self, seen: Seen) -> bool:
        """Whether this store has seen ``seen``'s lease version, unchanged, for at least the
        lease's duration on its own monotonic clock: its holder has stopped renewing.

        The duration is the holder's (its lease end minus the time of its write, both from
        its clock), and the watch starts when a reply showed us the version, after the
        holder's write: so the holder's lease, by the holder's own clock rate, has ended. No
        comparison between two machines' wall clocks is involved.
        """
        record = seen.record
        now = self.monotonic()
        key = record.key
        with self._lock:
            first = self._watch.get(key)
            if first is None or first[0] != seen.version:
                self._watch.pop(key, None)
                if len(self._watch) >= _WATCH_SIZE:
                    self._watch.pop(next(iter(self._watch)))
                self._watch[key] = (seen.version, now)
                first = (seen.version, now)
        return now - first[1] >= record.lease_expires_at - record.updated_at

    def _wrote(self, key: str, version: str) -> None:
        """Our own claim or renewal: watched from now (after its reply), like anyone's."""
        now = self.monotonic()
        with self._lock:
            self._watch.pop(key, None)
            if len(self._watch) >= _WATCH_SIZE:
                self._watch.pop(next(iter(self._watch)))
            self._watch[key] = (version, now)

    def _unwatch(self, key: str) -> None:
        with self._lock:
            self._watch.pop(key, None)

    def wall_takeable(self, record: Record, now: int) -> bool:
        """The Python twin of TAKEABLE."""
        if record.status is not Status.IN_PROGRESS:
            return record.expires_at <= now
        lease = record.lease_expires_at
        return lease == RELEASED or lease <= now - self.settings.skew_allowance_us

    # -- claim ----------------------------------------------------------------------------

    def claim(self, request: ClaimRequest) -> Plan[ClaimResult]:
        now = self.clock()
        key = request.key
        # None: no idea what is stored; the first try assumes our clock is past the stored
        # fence. Afterwards, exactly what a failed try found.
        known: tuple[Seen | None] | None = None
        watched = False
        for _ in range(_CLAIM_TRIES):
            floor = self._last_fence + 1
            current = None if known is None or known[0] is None else known[0].record
            _, record = machine.new_claim(current, request, now, floor)
            version = new_version()
            kwargs: dict[str, Any] = {
                "TableName": self.settings.table,
                "Item": self.codec.item(record, version),
                "ReturnValues": "ALL_OLD",
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
            kwargs.update(self._claim_condition(known, now, record.fence, watched))
            reply = yield Call("put_item", kwargs)
            if isinstance(reply, Failed):
                seen = yield from self._old_seen(reply, key, must_exist=known is None)
                known = (seen,)
                settled = self.refused(seen, request, now)
                if isinstance(settled, ClaimResult):
                    return settled
                watched = settled
                continue
            try:
                previous = self.codec.record(reply.get("Attributes"))
            except IdempotencyError:
                previous = None  # a corrupt item the condition let us replace
            outcome, _ = machine.new_claim(previous, request, now, floor)
            self._remember(record)
            self._wrote(key, version)
            return ClaimResult(outcome, record)
        raise StoreUnavailable(
            f"claim of key {key!r} kept losing races after {_CLAIM_TRIES} conditional writes"
        )

    def refused(self, seen: Seen | None, request: ClaimRequest, now: int) -> ClaimResult | bool:
        """What a claim whose write was refused makes of the item it then saw: its result, or
        whether to try again with the watched-takeover condition (True) or on exactly what is
        there (False). Shared by ``claim`` and the batched claims (``batch.py``)."""
        if seen is None:
            return False  # gone meanwhile: claim an absent key
        old = seen.record
        if self.wall_takeable(old, now):
            # Takeable yet refused: the stored fence is ahead of our clock, or the item
            # changed in between. Try again on exactly what is there now.
            return False
        if old.status is Status.IN_PROGRESS and self.watched(seen):
            return True
        if old.status is not Status.IN_PROGRESS:
            self._unwatch(request.key)
        return ClaimResult(machine.classify(old, request, now), old)

    def _claim_condition(
        self, known: tuple[Seen | None] | None, now: int, fence: int, watched: bool
    ) -> dict[str, Any]:
        """The condition of a claim's write, given what the previous try found."""
        if known is not None and known[0] is None:
            return {
                "ConditionExpression": "attribute_not_exists(#k)",
                "ExpressionAttributeNames": self._names("#k"),
            }
        ip = {"S": Status.IN_PROGRESS.value}
        if known is None:
            return {
                "ConditionExpression": f"{TAKEABLE} AND (attribute_not_exists(#f) OR #f < :fence)",
                "ExpressionAttributeNames": self._names("#k", "#e", "#st", "#l", "#f"),
                "ExpressionAttributeValues": self._takeable_values(now)
                | {":fence": {"N": str(fence)}},
            }
        seen = known[0]
        assert seen is not None
        prev = {"N": str(seen.record.fence)}
        if not watched:
            return {
                "ConditionExpression": f"{TAKEABLE} AND #f = :prev",
                "ExpressionAttributeNames": self._names("#k", "#e", "#st", "#l", "#f"),
                "ExpressionAttributeValues": self._takeable_values(now) | {":prev": prev},
            }
        if seen.version.startswith("~"):  # an item from before lease versions
            return {
                "ConditionExpression": WATCHED_LEGACY,
                "ExpressionAttributeNames": self._names("#st", "#f", "#v", "#l"),
                "ExpressionAttributeValues": {
                    ":ip": ip,
                    ":prev": prev,
                    ":plapse": {"N": str(seen.record.lease_expires_at)},
                },
            }
        return {
            "ConditionExpression": WATCHED,
            "ExpressionAttributeNames": self._names("#st", "#f", "#v"),
            "ExpressionAttributeValues": {":ip": ip, ":prev": prev, ":ver": {"S": seen.version}},
        }

    def _takeable_values(self, now: int) -> dict[str, Any]:
        return {
            ":now": {"N": str(now)},
            ":far": {"N": str(now - self.settings.skew_allowance_us)},
            ":released": {"N": str(RELEASED)},
            ":ip": {"S": Status.IN_PROGRESS.value},
        }

    # -- complete -------------------------------------------------------------------------

    def _holds_values(self, fence: int, now: int) -> dict[str, Any]:
        return {
            ":ip": {"S": Status.IN_PROGRESS.value},
            ":fence": {"N": str(fence)},
            ":released": {"N": str(RELEASED)},
            ":now": {"N": str(now)},
        }

    def _template(self, key: str, fence: int, now: int) -> Record:
        """A stand-in for the held record, to read the machine's write values from."""
        return Record(
            key=key,
            status=Status.IN_PROGRESS,
            fingerprint="",
            fence=fence,
            lease_expires_at=now,
            expires_at=now,
            attempt="",
            created_at=now,
            updated_at=now,
        )

    def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        with_items: Sequence[Any] | None,
    ) -> Plan[Record]:
        if not isinstance(result, bytes | bytearray | memoryview):
            raise TypeError("result must be bytes")
        result = bytes(result)
        items = _transact_items(with_items)
        stored, encoding = self.codec.pack(result)
        self.codec.check_size(key, result, stored)
        now = self.clock()
        known = self._claimed.get((key, fence))  # one dict read: atomic without the lock
        target = machine.completed(self._template(key, fence, now), result, ttl, now)
        # Only what is written is named: the item in progress was written whole by a claim
        # (``PutItem``) without a result or its encoding, so there is nothing to REMOVE.
        names = self._names(
            "#st",
            "#f",
            "#l",
            "#e",
            "#t",
            "#u",
            *(("#r",) if stored else ()),
            *(("#z",) if encoding else ()),
        )
        values = self._holds_values(fence, now)
        values.update(
            {
                ":done": {"S": target.status.value},
                ":exp": {"N": str(target.expires_at)},
                ":ttl": {"N": str(self.codec.ttl_seconds(target.expires_at))},
                ":upd": {"N": str(target.updated_at)},
            }
        )
        update = "SET #st = :done, #e = :exp, #t = :ttl, #u = :upd"
        if stored:
            update += ", #r = :r"
            values[":r"] = {"B": stored}
        if encoding:
            update += ", #z = :z"
            values[":z"] = {"S": encoding}
        op: dict[str, Any] = {
            **self._base(key),
            "UpdateExpression": update,
            "ConditionExpression": HOLDS,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
        if items:
            reply = yield Call(
                "transact_write_items",
                {"TransactItems": [{"Update": op}, *items]},
                _TRANSACTION,
            )
        elif known is not None:
            # What the server would send back (ALL_OLD) is the claim's record, at hand (and
            # moto takes longer to serialise it than to write the update).
            reply = yield Call("update_item", op)
        else:
            reply = yield Call("update_item", {**op, "ReturnValues": "ALL_OLD"})
        if isinstance(reply, Failed):
            if reply.code == TX_CANCELED:
                reasons = list(reply.response.get("CancellationReasons") or [])
                ours = reasons[0].get("Code") if reasons else None
                if ours != "ConditionalCheckFailed":
                    if any(r.get("Code") == "ConditionalCheckFailed" for r in reasons[1:]):
                        raise TransactionCanceled(key, reasons) from reply.error
                    raise StoreUnavailable(
                        f"the transaction completing key {key!r} was canceled: "
                        + ", ".join(str(r.get("Code")) for r in reasons)
                    ) from reply.error
            old = yield from self._old(reply, key)
            return machine.after_failed_complete(old, key, fence, now)
        held = self._forget(key, fence) or known
        self._unwatch(key)
        if not items:
            held = self.codec.record(reply.get("Attributes")) or held
        if held is None:
            # A transaction returns nothing: read back what the record holds besides the
            # result we just wrote.
            written = yield from self._read(key, projection=True)
            if written is not None and written.fence == fence:
                return self.codec.with_result(written, result)
            held = self._template(key, fence, now)
        return machine.completed(held, result, ttl, now)

    # -- release, renew -------------------------------------------------------------------

    def release(self, key: str, fence: int) -> Plan[None]:
        now = self.clock()
        target = machine.released(self._template(key, fence, now), now)
        values = self._holds_values(fence, now)
        values[":upd"] = {"N": str(target.updated_at)}
        reply = yield Call(
            "update_item",
            {
                **self._base(key),
                "UpdateExpression": "SET #l = :released, #u = :upd",
                "ConditionExpression": HOLDS,
                "ExpressionAttributeNames": self._names("#st", "#f", "#l", "#e", "#u"),
                "ExpressionAttributeValues": values,
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            },
        )
        self._forget(key, fence)
        self._unwatch(key)
        if isinstance(reply, Failed):
            old = yield from self._old(reply, key)
            machine.after_failed_release(old, key, fence, now)

    def renew(self, key: str, fence: int, lease: float) -> Plan[Record]:
        now = self.clock()
        lease_end = machine.renewed(self._template(key, fence, now), lease, now).lease_expires_at
        # First try: the record already lives past the new lease end (the usual case, ttl is
        # longer than a lease), so only the lease moves and the expiry condition says so.
        expected: Record | None = None
        for _ in range(_RENEW_TRIES):
            # A new lease version: whoever watches this lease starts over.
            version = new_version()
            values = self._holds_values(fence, now)
            values[":lend"] = {"N": str(lease_end)}
            values[":upd"] = {"N": str(now)}
            values[":ver"] = {"S": version}
            names = self._names("#st", "#f", "#l", "#e", "#u", "#v")
            if expected is None:
                condition = f"{HOLDS} AND #e >= :lend"
                update = "SET #l = :lend, #u = :upd, #v = :ver"
            else:
                target = machine.renewed(expected, lease, now)
                condition = f"{HOLDS} AND #e = :old_exp"
                update = "SET #l = :lend, #u = :upd, #v = :ver, #e = :exp, #t = :ttl"
                names["#t"] = self.settings.ttl_attr
                values[":old_exp"] = {"N": str(expected.expires_at)}
                values[":exp"] = {"N": str(target.expires_at)}
                values[":ttl"] = {"N": str(self.codec.ttl_seconds(target.expires_at))}
            reply = yield Call(
                "update_item",
                {
                    **self._base(key),
                    "UpdateExpression": update,
                    "ConditionExpression": condition,
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": values,
                    "ReturnValues": "ALL_OLD",
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                },
            )
            if isinstance(reply, Failed):
                old = yield from self._old(reply, key)
                if machine.holds(old, fence, now):
                    expected = old
                    continue
                return machine.after_failed_renew(old, key, fence, now)
            old = self.codec.record(reply.get("Attributes"))
            assert old is not None
            record = machine.renewed(old, lease, now)
            self._remember(record)
            self._wrote(key, version)
            return record
        raise StoreUnavailable(f"renew of key {key!r} kept losing races")

    # -- reads and administration ---------------------------------------------------------

    def get(self, key: str) -> Plan[Record | None]:
        record = yield from self._read(key)
        if record is None or record.expired(self.clock()):
            return None
        return record

    def delete(self, key: str) -> Plan[None]:
        yield Call("delete_item", self._base(key), frozenset())

    def _key_schema(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        s = self.settings
        schema = [{"AttributeName": s.key_attr, "KeyType": "HASH"}]
        attrs = [{"AttributeName": s.key_attr, "AttributeType": "S"}]
        if s.sort_key is not None:
            schema.append({"AttributeName": s.sort_key, "KeyType": "RANGE"})
            attrs.append({"AttributeName": s.sort_key, "AttributeType": "S"})
        return schema, attrs

    def _describe(self) -> Plan[dict[str, Any] | None]:
        reply = yield Call("describe_table", {"TableName": self.settings.table}, _MISSING)
        if isinstance(reply, Failed):
            return None
        table: dict[str, Any] = reply["Table"]
        return table

    def _schema_problem(self, table: dict[str, Any]) -> str | None:
        want, _ = self._key_schema()
        have = [
            {"AttributeName": k["AttributeName"], "KeyType": k["KeyType"]}
            for k in table.get("KeySchema", [])
        ]
        types = {d["AttributeName"]: d["AttributeType"] for d in table["AttributeDefinitions"]}
        if have != want or any(types.get(k["AttributeName"]) != "S" for k in want):
            return f"key schema is {have}, expected string keys {want}"
        return None

    def setup(self) -> Plan[str]:
        s = self.settings
        done: list[str] = []
        table = yield from self._describe()
        if table is None:
            schema, attrs = self._key_schema()
            yield Call(
                "create_table",
                {
                    "TableName": s.table,
                    "KeySchema": schema,
                    "AttributeDefinitions": attrs,
                    "BillingMode": "PAY_PER_REQUEST",
                },
                frozenset({"ResourceInUseException"}),
            )
            keys = " + ".join(k["AttributeName"] for k in schema)
            done.append(f"created table {s.table!r} (on-demand, key {keys})")
            for _ in range(120):
                table = yield from self._describe()
                if table is not None and table.get("TableStatus") == "ACTIVE":
                    break
                yield Call(_SLEEP, {"seconds": 0.5})
            else:
                raise StoreUnavailable(f"table {s.table!r} did not become ACTIVE in 60 s")
        else:
            problem = self._schema_problem(table)
            if problem is not None:
                raise ConfigurationError(f"table {s.table!r} exists but its {problem}")
            done.append(f"table {s.table!r} already exists")
        ttl = yield from self._ttl()
        status, attr = ttl
        if status in {"ENABLED", "ENABLING"} and attr == s.ttl_attr:
            done.append(f"TTL already on {attr!r}")
        elif status in {"ENABLED", "ENABLING"}:
            raise ConfigurationError(
                f"table {s.table!r} has TTL on {attr!r}; this store writes {s.ttl_attr!r}: "
                f"open it with ttl_attr={attr} or change the table's TTL attribute"
            )
        else:
            yield Call(
                "update_time_to_live",
                {
                    "TableName": s.table,
                    "TimeToLiveSpecification": {"Enabled": True, "AttributeName": s.ttl_attr},
                },
                frozenset(),
            )
            done.append(f"enabled TTL on {s.ttl_attr!r}")
        return "; ".join(done)

    def _ttl(self) -> Plan[tuple[str, str | None]]:
        reply = yield Call("describe_time_to_live", {"TableName": self.settings.table}, frozenset())
        assert isinstance(reply, dict)
        desc = reply.get("TimeToLiveDescription", {})
        return str(desc.get("TimeToLiveStatus", "DISABLED")), desc.get("AttributeName")

    def diagnostics(self) -> Plan[dict[str, object]]:
        s = self.settings
        facts: dict[str, object] = {
            "table": s.table,
            "endpoint_url": s.endpoint_url,
            "server_clock": False,
            "skew_allowance_s": s.skew_allowance,
            "takeover": "after watching a lease unchanged for its duration (monotonic clock)",
            "compress_above": s.compress_above,
        }
        table = yield from self._describe()
        if table is None:
            facts["table_exists"] = False
            facts["problems"] = [f"table {s.table!r} does not exist: run `idem setup`"]
            return facts
        problems: list[str] = []
        facts["table_exists"] = True
        facts["key_schema"] = table.get("KeySchema")
        facts["billing_mode"] = table.get("BillingModeSummary", {}).get(
            "BillingMode", "PROVISIONED"
        )
        problem = self._schema_problem(table)
        facts["key_schema_ok"] = problem is None
        if problem:
            problems.append(problem)
        status, attr = yield from self._ttl()
        facts["ttl_status"] = status
        facts["ttl_attribute"] = attr
        facts["ttl_ok"] = status in {"ENABLED", "ENABLING"} and attr == s.ttl_attr
        if not facts["ttl_ok"]:
            problems.append(f"TTL is {status} on {attr!r}, expected ENABLED on {s.ttl_attr!r}")
        if problem is None:
            facts["returns_old_item"] = yield from self._probe()
            facts["claim_path"] = (
                "conditional write returns the existing record (1 request)"
                if facts["returns_old_item"]
                else "conditional write + consistent GetItem fallback (2 requests)"
            )
        facts["problems"] = problems
        return facts

    def _probe(self) -> Plan[bool]:
        """Whether a failed condition returns the old item, from a throwaway item."""
        item = self.codec.key(_PROBE_KEY)
        item[self.settings.ttl_attr] = {"N": str(self.clock() // 1_000_000 + 60)}
        yield Call("put_item", {"TableName": self.settings.table, "Item": item}, frozenset())
        reply = yield Call(
            "put_item",
            {
                "TableName": self.settings.table,
                "Item": item,
                "ConditionExpression": "attribute_not_exists(#k)",
                "ExpressionAttributeNames": self._names("#k"),
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            },
        )
        yield Call("delete_item", self._base(_PROBE_KEY), frozenset())
        returns = isinstance(reply, Failed) and reply.response.get("Item") is not None
        self.returns_old = returns
        return returns


def _transact_items(with_items: Sequence[Any] | None) -> list[dict[str, Any]]:
    if not with_items:
        return []
    items = list(with_items)
    if len(items) > 99:
        raise ConfigurationError("DynamoDB transactions take at most 100 items (99 of yours)")
    allowed = {"Put", "Update", "Delete", "ConditionCheck"}
    for item in items:
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in allowed:
            raise ConfigurationError(
                "with_items entries are TransactWriteItems entries of the low-level client, "
                "e.g. {'Put': {'TableName': ..., 'Item': {...}}}; got " + repr(item)[:200]
            )
    return items


def sleep_seconds(call: Call) -> float | None:
    """How long the driver sleeps for a pseudo-call, or None for a real DynamoDB call."""
    if call.op == _SLEEP:
        return float(call.kwargs["seconds"])
    return None
