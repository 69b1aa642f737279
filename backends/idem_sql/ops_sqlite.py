"""SQLite's statements (see :mod:`idem_sql.ops` for what a program is).

SQLite (3.35+: ``RETURNING`` and upserts; 3.33+: ``UPDATE ... FROM``) has no
data-modifying CTEs, so a claim is a short sequence of statements, and a batch of claims the
same sequence with every statement multi-row: a fixed number of statements, whatever the
batch's size.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import TextClause

from idem_core.record import ClaimOutcome, ClaimRequest, ClaimResult, Record

from .ops import (  # the dialect-independent parts
    _BATCH,
    _IN_PROGRESS,
    _MAX_RACES,
    _PARAM_TYPES,
    SQL,
    Program,
    _claim_params,
    _found,
    _written,
    decode,
)

_CLAIM_NAMES = ("key", "fingerprint", "attempt", "lease", "life")
_TAKE_NAMES = (*_CLAIM_NAMES, "old_fence", "old_status", "old_lease", "old_expires")


class _FenceFloor:
    """Fences for records this process creates, strictly increasing.

    A new record's fence is the time of its claim, so that it exceeds whatever fence the key
    had before the record was deleted (the row, and with it ``fence + 1``, is gone). SQLite's
    clock ticks in milliseconds, slower than a delete and a claim on a local file, so its
    ``now`` alone could hand a new holder the fence of one from before ``idem forget``. The
    claim takes the greater of that clock and this microsecond one, never the same twice in
    a process; another process on the same file has taken its own fence at least one
    database write (microseconds) earlier.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._last = max(time.time_ns() // 1000, self._last + 1)
            return self._last


_fence_floor = _FenceFloor()


def _take_params(request: ClaimRequest, old: Record) -> dict[str, Any]:
    return {
        **_claim_params(request),
        "old_fence": old.fence,
        "old_status": old.status.value,
        "old_lease": old.lease_expires_at,
        "old_expires": old.expires_at,
    }


def _numbered(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Parameters of a multi-row statement: ``name_i`` for row ``i``."""
    return {f"{name}_{i}": value for i, row in enumerate(rows) for name, value in row.items()}


class SQLiteSQL(SQL):
    """SQLite has no data-modifying CTEs, so a claim is a short sequence of statements.

    1. Insert, or overwrite an expired or released record (both are plain CLAIMED): one
       statement for a first claim.
    2. Nothing written: read the record. Not takeable: that is the answer (a replay writes
       nothing).
    3. Takeable (a lapsed lease): overwrite it only if it is still the version just read.
    """

    def now_sql(self) -> str:
        return "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)"

    def greatest(self, a: str, b: str) -> str:
        return f"max({a}, {b})"

    def __init__(self, dialect: Dialect, table: str) -> None:
        super().__init__(dialect, table)
        c, t, now = self.c, self.t, self.now
        values = (
            f"(:key, '{_IN_PROGRESS}', :fingerprint, max({now}, :floor), {now} + :lease, "
            f"{now} + :life, :attempt, {now}, {now}, NULL)"
        )
        self._batches: dict[tuple[str, int], TextClause] = {}
        self._claim_sql = (
            f"INSERT INTO {t} ({self.cols}) VALUES :values "
            f"ON CONFLICT ({c['key']}) DO UPDATE SET status = excluded.status, "
            "fingerprint = excluded.fingerprint, fence = max(excluded.fence, fence + 1), "
            "lease_expires_at = excluded.lease_expires_at, expires_at = excluded.expires_at, "
            "attempt = excluded.attempt, created_at = excluded.created_at, "
            "updated_at = excluded.updated_at, result = NULL "
            f"WHERE expires_at <= excluded.created_at OR "
            f"(status = '{_IN_PROGRESS}' AND lease_expires_at = 0) RETURNING {self.cols}"
        )
        self.stmt_claim = self._text(self._claim_sql.replace(":values", values))
        self.stmt_take = self._text(
            f"UPDATE {t} SET status = '{_IN_PROGRESS}', fingerprint = :fingerprint, "
            f"fence = max({now}, fence + 1), lease_expires_at = {now} + :lease, "
            f"expires_at = {now} + :life, attempt = :attempt, created_at = {now}, "
            f"updated_at = {now}, result = NULL WHERE {c['key']} = :key "
            "AND fence = :old_fence AND status = :old_status "
            "AND lease_expires_at = :old_lease AND expires_at = :old_expires "
            f"AND (expires_at <= {now} OR (status = '{_IN_PROGRESS}' "
            f"AND lease_expires_at <= {now})) RETURNING {self.cols}"
        )

    def _many(self, kind: str, n: int) -> TextClause:
        """A multi-row statement for ``n`` requests, built once per size: ``upsert`` (the
        claim's first statement), ``read`` or ``take`` (``key_0``, ``key_1``, ...)."""
        found = self._batches.get((kind, n))
        if found is not None:
            return found
        c, t, now = self.c, self.t, self.now
        if kind == "upsert":
            names: tuple[str, ...] = (*_CLAIM_NAMES, "floor")
            sql = self._claim_sql.replace(
                ":values",
                ", ".join(
                    f"(:key_{i}, '{_IN_PROGRESS}', :fingerprint_{i}, max({now}, :floor_{i}), "
                    f"{now} + :lease_{i}, {now} + :life_{i}, :attempt_{i}, {now}, {now}, NULL)"
                    for i in range(n)
                ),
            )
        elif kind == "read":
            names = ("key",)
            keys = ", ".join(f":key_{i}" for i in range(n))
            sql = f"SELECT {self.cols}, {now} FROM {t} WHERE {c['key']} IN ({keys})"
        else:
            # Each row overwritten only if it is still the version read, and takeable.
            names = _TAKE_NAMES
            rows = ", ".join(
                "(" + ", ".join(f":{name}_{i}" for name in names) + ")" for i in range(n)
            )
            sql = (
                f"WITH q({', '.join(names)}) AS (VALUES {rows}) "
                f"UPDATE {t} SET status = '{_IN_PROGRESS}', fingerprint = q.fingerprint, "
                f"fence = max({now}, {t}.fence + 1), lease_expires_at = {now} + q.lease, "
                f"expires_at = {now} + q.life, attempt = q.attempt, created_at = {now}, "
                f"updated_at = {now}, result = NULL FROM q WHERE {t}.{c['key']} = q.key "
                f"AND {t}.fence = q.old_fence AND {t}.status = q.old_status "
                f"AND {t}.lease_expires_at = q.old_lease AND {t}.expires_at = q.old_expires "
                f"AND ({t}.expires_at <= {now} OR ({t}.status = '{_IN_PROGRESS}' "
                f"AND {t}.lease_expires_at <= {now})) RETURNING {self.cols}"
            )
        stmt = text(sql).bindparams(
            *(
                bindparam(f"{name}_{i}", type_=_PARAM_TYPES[name])
                for i in range(n)
                for name in names
            )
        )
        self._batches[(kind, n)] = stmt
        return stmt

    def claim_many(self, requests: Sequence[ClaimRequest]) -> Program[list[ClaimResult]]:
        results: list[ClaimResult] = []
        for start in range(0, len(requests), _BATCH):
            results += yield from self._claim_chunk(requests[start : start + _BATCH])
        return results

    def _claim_chunk(self, chunk: Sequence[ClaimRequest]) -> Program[list[ClaimResult]]:
        """A claim's statements, each for the whole chunk at once: upsert; read what the
        upsert did not write; overwrite the takeable ones. A request that lost a race (or
        repeats a key another request of the chunk just took) goes round again."""
        answers: list[ClaimResult | None] = [None] * len(chunk)
        insert = list(range(len(chunk)))
        for _ in range(_MAX_RACES):
            if insert:
                # A key twice: the first request inserts, the second finds it next round.
                floor = _fence_floor()
                params = _numbered([_claim_params(chunk[i]) | {"floor": floor} for i in insert])
                rows = (yield self._many("upsert", len(insert)), params).rows
                won = {(r.key, r.attempt): r for r in map(decode, rows)}
                for i in insert:
                    if (record := won.pop((chunk[i].key, chunk[i].attempt), None)) is not None:
                        answers[i] = ClaimResult(ClaimOutcome.CLAIMED, record)
            pending = [i for i, answer in enumerate(answers) if answer is None]
            if not pending:
                return [answer for answer in answers if answer is not None]
            keys = list(dict.fromkeys(chunk[i].key for i in pending))
            rows = (yield self._many("read", len(keys)), _numbered([{"key": k} for k in keys])).rows
            current: dict[str, tuple[Record, int]] = {}
            for row in rows:
                record = decode(row[:10])
                current[record.key] = (record, int(row[10]))
            insert, take, taking = [], [], set[str]()
            for i in pending:
                request = chunk[i]
                if (seen := current.get(request.key)) is None:
                    if request.key not in taking:  # gone since the upsert: insert it
                        taking.add(request.key)
                        insert.append(i)
                elif (found := _found(request, *seen)) is not None:
                    answers[i] = found
                elif request.key not in taking:
                    taking.add(request.key)
                    take.append((i, seen[0]))
            if take:
                params = _numbered([_take_params(chunk[i], old) for i, old in take])
                rows = (yield self._many("take", len(take)), params).rows
                won = {(r.key, r.attempt): r for r in map(decode, rows)}
                for i, old in take:
                    if (record := won.get((chunk[i].key, chunk[i].attempt))) is not None:
                        answers[i] = _written(chunk[i], record, old)
        raise self._gave_up(chunk[0].key)

    def claim(self, request: ClaimRequest, *, autocommit: bool = False) -> Program[ClaimResult]:
        read_first = self._read_first(request.key, autocommit)
        return (yield from self._claim(request, inserted=not read_first))

    def _claim(self, request: ClaimRequest, *, inserted: bool) -> Program[ClaimResult]:
        params = _claim_params(request)
        for _ in range(_MAX_RACES):
            if inserted:
                rows = (yield self.stmt_claim, params | {"floor": _fence_floor()}).rows
                if rows:
                    return ClaimResult(ClaimOutcome.CLAIMED, decode(rows[0]))
            inserted = True
            current, now = yield from self.read(request.key)
            if current is None:
                continue
            if (found := _found(request, current, now)) is not None:
                return found
            taken = (
                yield (
                    self.stmt_take,
                    {
                        **params,
                        "old_fence": current.fence,
                        "old_status": current.status.value,
                        "old_lease": current.lease_expires_at,
                        "old_expires": current.expires_at,
                    },
                )
            ).rows
            if taken:
                return _written(request, decode(taken[0]), current)
        raise self._gave_up(request.key)
