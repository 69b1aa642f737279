"""The SQL of each transition, per dialect, as driver-independent *programs*.

This module holds what every dialect shares and PostgreSQL's statements; SQLite's are in
:mod:`idem_sql.ops_sqlite`, MySQL's and MariaDB's in :mod:`idem_sql.ops_mysql`.

A program is a generator that yields ``(statement, parameters)`` and is sent back the
:class:`Rows` each statement produced; its return value is the operation's result. The sync
and async stores run the same programs, so the SQL and its interpretation are written once.

Only the write conditions (``takeable``, ``holds``) are translated into SQL; whatever a
statement reads back is handed to :mod:`idem_core.machine` to interpret.

Every statement reads the database's clock exactly once per statement: PostgreSQL's
``statement_timestamp()``, SQLite's ``julianday('now')`` and MySQL's ``@@timestamp`` are all
fixed for the duration of one statement.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec.structs
from sqlalchemy import BigInteger, LargeBinary, String, Text, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import TextClause

from idem_core import machine
from idem_core.errors import CorruptRecord, StoreUnavailable
from idem_core.record import ClaimRequest, ClaimResult, Record, Status, micros

from .schema import COLUMNS, check_identifier

T = TypeVar("T")


class Rows(NamedTuple):
    rows: list[Sequence[Any]]
    rowcount: int


Step = tuple[TextClause, dict[str, Any]]
Program = Generator[Step, Rows, T]
#: a statement as the driver takes it: its SQL text, what turns a program's parameter dict
#: into the driver's parameters (a tuple for positional paramstyles, a mapping else), and
#: whether it returns rows (asking the cursor's description costs psycopg a Column object
#: per column, per call)
Compiled = tuple[str, Callable[[dict[str, Any]], Any], bool]

# A claim that loses a race re-reads and decides again; more than this means something is
# rewriting the key in a tight loop.
_MAX_RACES = 16
# Requests per multi-row claim statement (SQLite allows 32766 parameters, 5 per request;
# MySQL's max_allowed_packet is at least 4 MiB, and a request is a few hundred bytes).
_BATCH = 500
# Keys a SQLite store remembers having claimed (a hint only: forgetting costs a statement).
_SEEN = 4096
_IN_PROGRESS = Status.IN_PROGRESS.value
_COMPLETED = Status.COMPLETED.value


def decode(row: Sequence[Any]) -> Record:
    """A Record from the ten columns of :data:`COLUMNS`, or ``CorruptRecord``."""
    try:
        key, status, fingerprint, fence, lease, expires, attempt, created, updated, result = row
        if isinstance(key, bytes | bytearray):
            key = bytes(key).decode()
        if not (isinstance(key, str) and isinstance(fingerprint, str) and isinstance(attempt, str)):
            raise TypeError("key, fingerprint and attempt must be text")
        if result is not None:
            result = bytes(result)
        return Record(
            key=key,
            status=Status(status),
            fingerprint=fingerprint,
            fence=int(fence),
            lease_expires_at=int(lease),
            expires_at=int(expires),
            attempt=attempt,
            created_at=int(created),
            updated_at=int(updated),
            result=result,
        )
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        key_text = row[0] if row else None
        raise CorruptRecord(f"record {key_text!r} cannot be decoded: {exc}") from exc


def _claim_params(request: ClaimRequest) -> dict[str, Any]:
    return {
        "key": request.key,
        "fingerprint": request.fingerprint,
        "attempt": request.attempt,
        "lease": micros(request.lease),
        "life": micros(max(request.lease, request.ttl)),
    }


def _previous(record: Record, status: Any, fence: Any, lease: Any, expires: Any) -> Record:
    """The record a claim replaced, as far as the takeover rule needs it."""
    return msgspec.structs.replace(
        record,
        status=Status(status),
        fence=int(fence),
        lease_expires_at=int(lease),
        expires_at=int(expires),
    )


def _written(request: ClaimRequest, record: Record, previous: Record | None) -> ClaimResult:
    outcome, _ = machine.new_claim(previous, request, record.created_at)
    return ClaimResult(outcome, record)


def _found(request: ClaimRequest, current: Record, now: int) -> ClaimResult | None:
    """The result of a claim that wrote nothing, or None when it lost a race and must retry."""
    if machine.takeable(current, now):
        return None
    return ClaimResult(machine.classify(current, request, now), current)


class SQL:
    """The statements of one table on one dialect."""

    returning = True

    def __init__(self, dialect: Dialect, table: str) -> None:
        self.dialect = dialect
        self.table = check_identifier(table)
        quote = dialect.identifier_preparer.quote
        self.t = quote(table)
        self.c = {name: quote(name) for name in COLUMNS}
        self.cols = ", ".join(self.c.values())
        self.now = self.now_sql()
        c, t, now = self.c, self.t, self.now
        self.holds = (
            f"{c['key']} = :key AND status = '{_IN_PROGRESS}' AND fence = :fence "
            f"AND lease_expires_at <> 0 AND expires_at > {now}"
        )
        self.stmt_read = self._text(f"SELECT {self.cols}, {now} FROM {t} WHERE {c['key']} = :key")
        self.stmt_get = self._text(
            f"SELECT {self.cols} FROM {t} WHERE {c['key']} = :key AND expires_at > {now}"
        )
        self.stmt_delete = self._text(f"DELETE FROM {t} WHERE {c['key']} = :key")
        self.stmt_now = self._text(f"SELECT {now}")
        self.stmt_packet = self._text("SELECT @@max_allowed_packet")
        ret = f" RETURNING {self.cols}" if self.returning else ""
        self.stmt_complete = self._text(
            f"UPDATE {t} SET {self.completes(self.result_sql(), ':ttl')} WHERE {self.holds}{ret}"
        )
        self.stmt_release = self._text(
            f"UPDATE {t} SET lease_expires_at = 0, updated_at = {now} WHERE {self.holds}"
        )
        self.stmt_renew = self._text(
            f"UPDATE {t} SET lease_expires_at = {now} + :lease, "
            f"expires_at = {self.greatest('expires_at', f'{now} + :lease')}, "
            f"updated_at = {now} WHERE {self.holds}{ret}"
        )
        self.stmt_purge = self._text(self.purge_sql())
        self._compiled: dict[TextClause, Compiled] = {}
        self._seen: dict[str, None] = {}

    def compiled(self, stmt: TextClause) -> Compiled:
        """``stmt`` compiled once for this dialect, to run on a DBAPI cursor directly."""
        found = self._compiled.get(stmt)
        if found is None:
            found = self._compiled[stmt] = compile_for(stmt, self.dialect)
        return found

    # -- dialect hooks -------------------------------------------------------------------

    def now_sql(self) -> str:
        raise NotImplementedError

    def completes(self, result: str, ttl: str) -> str:
        """A completion's writes (an ``UPDATE``'s ``SET`` list), for the single statement
        and PostgreSQL's coalesced one alike."""
        return (
            f"status = '{_COMPLETED}', result = {result}, expires_at = {self.now} + {ttl}, "
            f"updated_at = {self.now}"
        )

    def greatest(self, a: str, b: str) -> str:
        return f"GREATEST({a}, {b})"

    def result_sql(self) -> str:
        return ":result"

    def result_param(self, result: bytes) -> dict[str, Any]:
        return {"result": result}

    def purge_sql(self) -> str:
        c, t, now = self.c, self.t, self.now
        return (
            f"DELETE FROM {t} WHERE {c['key']} IN (SELECT {c['key']} FROM {t} "
            f"WHERE expires_at <= {now} LIMIT :batch) AND expires_at <= {now}"
        )

    def _text(self, sql: str) -> TextClause:
        return text(sql).bindparams(
            *(
                bindparam(name, type_=type_)
                for name, type_ in _PARAM_TYPES.items()
                if f":{name}" in _bind_names(sql)
            )
        )

    # -- programs ------------------------------------------------------------------------

    def _read_first(self, key: str, autocommit: bool) -> bool:
        """Whether a claim should read before it writes: only for a key this store claimed
        before (likely a replay, which then costs one read-only statement), and only
        outside a caller's transaction (there SQLite cannot turn a read into a write once
        another connection has written, and PostgreSQL must wait on the row lock)."""
        seen = self._seen
        if key in seen:
            return autocommit
        if len(seen) >= _SEEN:
            seen.clear()
        seen[key] = None
        return False

    def _found_first(self, request: ClaimRequest) -> Program[ClaimResult | None]:
        """The answer when the record is there and not takeable, else None (write then)."""
        rows = (yield self.stmt_read, {"key": request.key}).rows
        if not rows:
            return None
        return _found(request, decode(rows[0][:10]), int(rows[0][10]))

    def claim(self, request: ClaimRequest, *, autocommit: bool = False) -> Program[ClaimResult]:
        """``autocommit``: every statement is a transaction of its own (not the caller's)."""
        raise NotImplementedError

    def claim_many(self, requests: Sequence[ClaimRequest]) -> Program[list[ClaimResult]]:
        results = []
        for request in requests:
            results.append((yield from self.claim(request)))
        return results

    def read(self, key: str) -> Program[tuple[Record | None, int]]:
        rows = (yield self.stmt_read, {"key": key}).rows
        if rows:
            return decode(rows[0][:10]), int(rows[0][10])
        now = (yield self.stmt_now, {}).rows[0][0]
        return None, int(now)

    def complete(self, key: str, fence: int, result: bytes, ttl: float) -> Program[Record]:
        params = {"key": key, "fence": fence, "ttl": micros(ttl), **self.result_param(result)}
        done = yield self.stmt_complete, params
        if self.returning and done.rows:
            return decode(done.rows[0])
        if not self.returning and done.rowcount == 1:
            record, now = yield from self.read(key)
            if record is not None and record.fence == fence:
                return record
        current, now = yield from self.read(key)
        return machine.after_failed_complete(current, key, fence, now)

    def release(self, key: str, fence: int) -> Program[None]:
        done = yield self.stmt_release, {"key": key, "fence": fence}
        if done.rowcount == 1:
            return
        current, now = yield from self.read(key)
        machine.after_failed_release(current, key, fence, now)

    def renew(self, key: str, fence: int, lease: float) -> Program[Record]:
        done = yield self.stmt_renew, {"key": key, "fence": fence, "lease": micros(lease)}
        if self.returning and done.rows:
            return decode(done.rows[0])
        if not self.returning and done.rowcount == 1:
            record, _ = yield from self.read(key)
            if record is not None and record.fence == fence:
                return record
        current, now = yield from self.read(key)
        return machine.after_failed_renew(current, key, fence, now)

    def get(self, key: str) -> Program[Record | None]:
        rows = (yield self.stmt_get, {"key": key}).rows
        return decode(rows[0]) if rows else None

    def delete(self, key: str) -> Program[None]:
        yield self.stmt_delete, {"key": key}

    def now_program(self) -> Program[int]:
        rows = (yield self.stmt_now, {}).rows
        return int(rows[0][0])

    def packet_program(self) -> Program[int | None]:
        """The largest statement the server takes, in bytes (MySQL/MariaDB only)."""
        rows = (yield self.stmt_packet, {}).rows
        return int(rows[0][0])

    def purge(self, batch: int) -> Program[int]:
        total = 0
        while True:
            done = yield self.stmt_purge, {"batch": batch}
            total += max(done.rowcount, 0)
            if done.rowcount < batch:
                return total

    def _gave_up(self, key: str) -> StoreUnavailable:
        return StoreUnavailable(f"claim on {key!r} lost {_MAX_RACES} races in a row")


_PARAM_TYPES: dict[str, Any] = {
    "key": String(),
    "fingerprint": Text(),
    "attempt": Text(),
    "lease": BigInteger(),
    "life": BigInteger(),
    "fence": BigInteger(),
    "floor": BigInteger(),
    "ttl": BigInteger(),
    "batch": BigInteger(),
    "result": LargeBinary(),
    "result_hex": Text(),
    "old_fence": BigInteger(),
    "old_status": String(),
    "old_lease": BigInteger(),
    "old_expires": BigInteger(),
    "keys": ARRAY(String()),
    "fingerprints": ARRAY(Text()),
    "attempts": ARRAY(Text()),
    "leases": ARRAY(BigInteger()),
    "lives": ARRAY(BigInteger()),
}


def compile_for(stmt: TextClause, dialect: Dialect) -> Compiled:
    """The driver's SQL string for ``stmt`` and its parameter layout.

    Values go through the same bind processors SQLAlchemy would apply (only the binary
    and array types have one); every other value is passed to the driver as it is.
    """
    compiled = stmt.compile(dialect=dialect)
    sql = compiled.string
    rows = bool(_RETURNS_ROWS.match(sql)) or " RETURNING " in sql
    procs: dict[str, Callable[[Any], Any]] = {}
    for name, bind in compiled.binds.items():
        proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if proc is not None:
            procs[name] = proc
    if dialect.positional:
        names = tuple(compiled.positiontup or ())
        if procs:

            def positional(params: dict[str, Any]) -> Any:
                return tuple(procs[n](params[n]) if n in procs else params[n] for n in names)

            return sql, positional, rows
        if not names:
            return sql, lambda _params: (), rows
        if len(names) == 1:
            only = names[0]
            return sql, lambda params: (params[only],), rows
        return sql, operator.itemgetter(*names), rows
    if procs:

        def named(params: dict[str, Any]) -> Any:
            return {**params, **{n: p(params[n]) for n, p in procs.items() if n in params}}

        return sql, named, rows
    # pyformat drivers look parameters up by name and ignore the rest: pass the dict as is.
    return sql, _same, rows


_RETURNS_ROWS = re.compile(r"\s*(SELECT|WITH)\b", re.IGNORECASE)


def _same(params: dict[str, Any]) -> Any:
    return params


def _bind_names(sql: str) -> set[str]:
    return {f":{m}" for m in re.findall(r"(?<![:\w]):(\w+)", sql)}


class PostgresSQL(SQL):
    """One statement per claim: the snapshot row, the upsert and the answer, in one CTE.

    The upsert takes the row only if it is takeable *and* still the version the snapshot
    read, so the snapshot row is exactly what was replaced (and tells CLAIMED from
    TOOK_OVER). A replay writes nothing: the conflict's WHERE is false, no tuple is touched.
    When a concurrent writer changed the row after the snapshot, nothing is written and
    nothing takeable comes back; the claim runs again (the one case that costs a second).
    """

    def now_sql(self) -> str:
        return "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000000 AS BIGINT)"

    def __init__(self, dialect: Dialect, table: str) -> None:
        super().__init__(dialect, table)
        c, t, now = self.c, self.t, self.now
        r_cols = ", ".join(f"r.{name}" for name in self.c.values())
        take = (
            "(r.expires_at <= excluded.created_at OR "
            f"(r.status = '{_IN_PROGRESS}' AND r.lease_expires_at <= excluded.created_at))"
        )
        on_conflict = (
            f"ON CONFLICT ({c['key']}) DO UPDATE SET status = excluded.status, "
            "fingerprint = excluded.fingerprint, fence = GREATEST(excluded.fence, r.fence + 1), "
            "lease_expires_at = excluded.lease_expires_at, expires_at = excluded.expires_at, "
            "attempt = excluded.attempt, created_at = excluded.created_at, "
            "updated_at = excluded.updated_at, result = NULL "
            f"WHERE {take} AND (r.fence, r.status, r.lease_expires_at, r.expires_at) = "
        )
        answer = (
            f"SELECT true, ins.*, {now}, c.status, c.fence, c.lease_expires_at, c.expires_at "
            "FROM ins LEFT JOIN cur c ON {join} "
            f"UNION ALL SELECT false, cur.*, {now}, NULL, NULL, NULL, NULL FROM cur "
            "WHERE NOT EXISTS (SELECT 1 FROM ins {where})"
        )
        # A live record the snapshot shows as not takeable is not even offered to the
        # INSERT: ON CONFLICT would lock its row (and dirty its page) before its WHERE.
        untakeable = (
            f"SELECT 1 FROM cur WHERE NOT (cur.expires_at <= {now} OR "
            f"(cur.status = '{_IN_PROGRESS}' AND cur.lease_expires_at <= {now}))"
        )
        self.stmt_claim = self._text(
            f"WITH cur AS (SELECT {self.cols} FROM {t} WHERE {c['key']} = :key), "
            f"ins AS (INSERT INTO {t} AS r ({self.cols}) SELECT CAST(:key AS VARCHAR), "
            f"'{_IN_PROGRESS}', CAST(:fingerprint AS TEXT), {now}, {now} + CAST(:lease AS BIGINT), "
            f"{now} + CAST(:life AS BIGINT), CAST(:attempt AS TEXT), {now}, {now}, NULL "
            f"WHERE NOT EXISTS ({untakeable}) "
            f"{on_conflict}(SELECT fence, status, lease_expires_at, expires_at FROM cur) "
            f"RETURNING {r_cols}) " + answer.format(join="true", where="")
        )
        self.stmt_claim_many = self._text(
            "WITH req AS (SELECT * FROM unnest(CAST(:keys AS VARCHAR[]), "
            "CAST(:fingerprints AS TEXT[]), CAST(:attempts AS TEXT[]), "
            "CAST(:leases AS BIGINT[]), CAST(:lives AS BIGINT[])) AS q(k, fp, att, lease, life)), "
            f"cur AS (SELECT {', '.join(f't.{n}' for n in self.c.values())} FROM {t} t "
            f"JOIN req ON t.{c['key']} = req.k), "
            f"ins AS (INSERT INTO {t} AS r ({self.cols}) SELECT k, '{_IN_PROGRESS}', fp, {now}, "
            f"{now} + lease, {now} + life, att, {now}, {now}, NULL FROM req "
            f"WHERE NOT EXISTS ({untakeable} AND cur.{c['key']} = req.k) "
            f"{on_conflict}(SELECT fence, status, lease_expires_at, expires_at FROM cur "
            f"WHERE cur.{c['key']} = r.{c['key']}) RETURNING {r_cols}) "
            + answer.format(
                join=f"c.{c['key']} = ins.{c['key']}",
                where=f"WHERE ins.{c['key']} = cur.{c['key']}",
            )
        )

    def _interpret(self, request: ClaimRequest, row: Sequence[Any]) -> ClaimResult | None:
        record = decode(row[1:11])
        if row[0]:
            previous = None if row[12] is None else _previous(record, *row[12:16])
            return _written(request, record, previous)
        return _found(request, record, int(row[11]))

    def claim(self, request: ClaimRequest, *, autocommit: bool = False) -> Program[ClaimResult]:
        if self._read_first(request.key, autocommit):
            found = yield from self._found_first(request)
            if found is not None:
                return found
        params = _claim_params(request)
        for _ in range(_MAX_RACES):
            rows = (yield self.stmt_claim, params).rows
            if rows and (result := self._interpret(request, rows[0])) is not None:
                return result
        raise self._gave_up(request.key)

    def claim_many(self, requests: Sequence[ClaimRequest]) -> Program[list[ClaimResult]]:
        """One multi-row statement for the whole batch, whatever its keys.

        ON CONFLICT cannot touch one row twice in a statement, so each round sends the
        first unsettled request of every key. A key the batch repeats is settled from the
        same rows: the record its first request left, at that statement's time, is what a
        claim right after it finds (not takeable: it was just written or found live). Only
        a lost race, or a record already takeable again (a lease of 0), needs another round.
        """
        if len(requests) < 2:
            return (yield from super().claim_many(requests))
        answers: list[ClaimResult | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        for _ in range(_MAX_RACES):
            firsts: dict[str, int] = {}
            for i in pending:
                firsts.setdefault(requests[i].key, i)
            # Sorted by key: concurrent batches take their row locks in the same order.
            params = [_claim_params(requests[firsts[key]]) for key in sorted(firsts)]
            rows = (
                yield (
                    self.stmt_claim_many,
                    {
                        "keys": [p["key"] for p in params],
                        "fingerprints": [p["fingerprint"] for p in params],
                        "attempts": [p["attempt"] for p in params],
                        "leases": [p["lease"] for p in params],
                        "lives": [p["life"] for p in params],
                    },
                )
            ).rows
            by_key = {decode(row[1:11]).key: row for row in rows}
            settled: dict[str, tuple[Record, int]] = {}
            unsettled = []
            for i in pending:
                request = requests[i]
                result: ClaimResult | None = None
                if firsts[request.key] == i:
                    if (row := by_key.get(request.key)) is not None:
                        result = self._interpret(request, row)
                        if result is not None:
                            settled[request.key] = (result.record, int(row[11]))
                elif (seen := settled.get(request.key)) is not None:
                    result = _found(request, *seen)
                if result is None:
                    # This key's later requests wait too: they must see what this one leaves.
                    settled.pop(request.key, None)
                    unsettled.append(i)
                else:
                    answers[i] = result
            pending = unsettled
            if not pending:
                return [answer for answer in answers if answer is not None]
        raise self._gave_up(requests[pending[0]].key)


def sql_for(dialect: Dialect, table: str) -> SQL:
    name = dialect.name
    if name == "postgresql":
        return PostgresSQL(dialect, table)
    # The other dialects live in modules of their own, which build on this one.
    if name == "sqlite":
        from .ops_sqlite import SQLiteSQL

        return SQLiteSQL(dialect, table)
    if name in ("mysql", "mariadb"):
        from .ops_mysql import MySQL

        return MySQL(dialect, table)
    raise StoreUnavailable(f"idem_sql does not support the {name!r} dialect")
