"""MySQL's and MariaDB's statements (see :mod:`idem_sql.ops` for what a program is).

A claim is an upsert, ``INSERT ... ON DUPLICATE KEY UPDATE``, whose assignments overwrite
the row only when it is takeable and note in session variables what they replaced:
``@idem_take`` is 2 when the row was inserted, 1 when a takeable row was overwritten, 0
when nothing was written; ``@idem_old`` holds the overwritten row's status, fence, lease
and expiry. Session variables belong to the connection, so they describe this claim's
upsert whatever other sessions do.

MariaDB 10.5+ has ``INSERT ... RETURNING``: the upsert hands back the row as it left it,
and those variables, in the same round trip; a claim is one statement, whatever its
outcome, and a batch of claims one multi-row upsert. As on the other dialects, a claim of a
key this store claimed before (likely a replay) reads it first, without the upsert's lock.
Completing and renewing use the same form (``UPDATE`` has no ``RETURNING`` there): an
upsert whose assignments apply only while the caller holds the fence, so the answer comes
back with the write. MySQL 8 has no ``RETURNING``: there a claim reads the row and the
variables in a second statement, and a completion re-reads the row it updated. Which of
the two a server gets is learnt once, from the version the dialect read when it connected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import TextClause

from idem_core import machine
from idem_core.record import ClaimOutcome, ClaimRequest, ClaimResult, Record, Status, micros

from .ops import (
    _BATCH,
    _COMPLETED,
    _IN_PROGRESS,
    _MAX_RACES,
    _PARAM_TYPES,
    SQL,
    Program,
    _claim_params,
    _found,
    _previous,
    _written,
    decode,
)
from .schema import COLUMNS

# The row a completion or a renewal inserts when the key has no row at all (an upsert
# cannot update without being able to insert): expired, released, fence 0 (a real fence is
# a time in microseconds). Every reader treats it as absent; the program deletes it at once.
_PLACEHOLDER = f"(:key, '{_IN_PROGRESS}', '', 0, 0, 0, '', 0, 0, NULL)"
_CLAIM_NAMES = ("key", "fingerprint", "attempt", "lease", "life")
#: defines the claim's session variables, keeping their values if they exist (run when a
#: store's own connection opens, and before a batch of claims)
DEFINE = "SET @idem_take = COALESCE(@idem_take, 0), @idem_old = COALESCE(@idem_old, '')"


def _placeholder(record: Record) -> bool:
    return record.fence == 0 and record.expires_at == 0 and record.attempt == ""


class MySQL(SQL):
    """MySQL and MariaDB (the module's docstring says how a claim works)."""

    # UPDATE has no RETURNING on either server; the base class's fallbacks re-read.
    returning = False

    def now_sql(self) -> str:
        return "CAST(ROUND(@@timestamp * 1000000) AS SIGNED)"

    def result_sql(self) -> str:
        # aiomysql 0.3 cannot escape bytes with PyMySQL >= 1.1 (it imports a placeholder
        # from pymysql.converters); hex text goes through every driver.
        return "UNHEX(:result_hex)" if self.dialect.driver == "aiomysql" else ":result"

    def result_param(self, result: bytes) -> dict[str, Any]:
        if self.dialect.driver == "aiomysql":
            return {"result_hex": result.hex()}
        return {"result": result}

    def purge_sql(self) -> str:
        return (
            f"DELETE FROM {self.t} WHERE expires_at <= {self.now} ORDER BY expires_at LIMIT :batch"
        )

    def __init__(self, dialect: Dialect, table: str) -> None:
        super().__init__(dialect, table)
        c, t, now = self.c, self.t, self.now
        take = (
            "(expires_at <= VALUES(created_at) OR "
            f"(status = '{_IN_PROGRESS}' AND lease_expires_at <= VALUES(created_at)))"
        )
        # Assignments run left to right and see earlier ones, so fence goes first: it is
        # the one that reads the old status, lease and expiry.
        sets = [
            "fence = IF((@idem_old := CONCAT_WS(',', status, fence, lease_expires_at, "
            f"expires_at)) IS NOT NULL AND (@idem_take := {take}), "
            "GREATEST(VALUES(fence), fence + 1), fence)"
        ]
        for name in COLUMNS[1:]:
            if name != "fence":
                col = c[name]
                sets.append(f"{col} = IF(@idem_take, VALUES({col}), {col})")
        self._upsert = (
            f"INSERT INTO {t} ({self.cols}) VALUES :values "
            f"ON DUPLICATE KEY UPDATE {', '.join(sets)}"
        )
        self._row = (
            f"(:key, IF((@idem_take := 2) = 0, NULL, '{_IN_PROGRESS}'), :fingerprint, {now}, "
            f"{now} + :lease, {now} + :life, :attempt, {now}, {now}, NULL)"
        )
        self._returned = f" RETURNING @idem_take, @idem_old, {self.cols}, {now}"
        self._batches: dict[int, TextClause] = {}
        self._has_returning: bool | None = None
        # MySQL 8: the upsert, then the row and the variables.
        self.stmt_claim = self._text(self._upsert.replace(":values", self._row))
        self.stmt_claimed = self._text(
            f"SELECT @idem_take, @idem_old, {self.cols}, {now} FROM {t} WHERE {c['key']} = :key"
        )
        # MariaDB: one statement.
        self.stmt_claim_returning = self._text(
            self._upsert.replace(":values", self._row) + self._returned
        )
        self.stmt_variables = self._text("SELECT @idem_take, @idem_old")
        self.stmt_define = self._text(DEFINE)
        # @idem_ok: whether the caller holds the fence, read before any assignment changes
        # the columns it depends on.
        holds = (
            f"@idem_ok := (status = '{_IN_PROGRESS}' AND fence = :fence "
            f"AND lease_expires_at <> 0 AND expires_at > {now})"
        )
        self.stmt_complete_returning = self._text(
            f"INSERT INTO {t} ({self.cols}) VALUES {_PLACEHOLDER} ON DUPLICATE KEY UPDATE "
            f"status = IF({holds}, '{_COMPLETED}', status), "
            f"result = IF(@idem_ok, {self.result_sql()}, result), "
            f"expires_at = IF(@idem_ok, {now} + :ttl, expires_at), "
            f"updated_at = IF(@idem_ok, {now}, updated_at) RETURNING {self.cols}, {now}"
        )
        self.stmt_renew_returning = self._text(
            f"INSERT INTO {t} ({self.cols}) VALUES {_PLACEHOLDER} ON DUPLICATE KEY UPDATE "
            f"lease_expires_at = IF({holds}, {now} + :lease, lease_expires_at), "
            f"expires_at = IF(@idem_ok, GREATEST(expires_at, {now} + :lease), expires_at), "
            f"updated_at = IF(@idem_ok, {now}, updated_at) RETURNING {self.cols}, {now}"
        )
        self.stmt_drop_placeholder = self._text(
            f"DELETE FROM {t} WHERE {c['key']} = :key AND fence = 0 AND expires_at = 0 "
            "AND attempt = ''"
        )

    def insert_returning(self) -> bool:
        """Whether the server has ``INSERT ... RETURNING`` (MariaDB 10.5+). Asked when a
        program starts, on a connected dialect; remembered once the version is known."""
        known = self._has_returning
        if known is None:
            version = self.dialect.server_version_info
            if not version:
                return False  # not connected yet: the portable statements, this time
            mariadb = bool(getattr(self.dialect, "is_mariadb", False))
            known = self._has_returning = mariadb and tuple(version[:2]) >= (10, 5)
        return known

    def _batch_claim(self, n: int) -> TextClause:
        """The upsert for ``n`` requests (``key_0``, ``fingerprint_0``, ... parameters)."""
        if (stmt := self._batches.get(n)) is not None:
            return stmt
        rows = ", ".join(
            self._row.replace(":key", f":key_{i}")
            .replace(":fingerprint", f":fingerprint_{i}")
            .replace(":attempt", f":attempt_{i}")
            .replace(":lease", f":lease_{i}")
            .replace(":life", f":life_{i}")
            for i in range(n)
        )
        stmt = text(self._upsert.replace(":values", rows) + self._returned).bindparams(
            *(
                bindparam(f"{name}_{i}", type_=_PARAM_TYPES[name])
                for i in range(n)
                for name in _CLAIM_NAMES
            )
        )
        self._batches[n] = stmt
        return stmt

    # -- programs ------------------------------------------------------------------------

    def claim(self, request: ClaimRequest, *, autocommit: bool = False) -> Program[ClaimResult]:
        if self._read_first(request.key, autocommit):
            # Likely a replay: a plain read takes no row lock (the upsert would, even when
            # it writes nothing), so concurrent replays of one key do not queue.
            found = yield from self._found_first(request)
            if found is not None:
                return found
        params = _claim_params(request)
        returning = self.insert_returning()
        for _ in range(_MAX_RACES):
            if returning:
                rows = (yield self.stmt_claim_returning, params).rows
            else:
                yield self.stmt_claim, params
                rows = (yield self.stmt_claimed, {"key": request.key}).rows
            if rows:
                result = yield from self._settle(request, rows[0], single=True)
                if result is not None:
                    return result
        raise self._gave_up(request.key)

    def _settle(
        self, request: ClaimRequest, row: Sequence[Any], *, single: bool
    ) -> Program[ClaimResult | None]:
        """The claim's answer from its upsert's row and variables, or None: retry."""
        take, old, *columns = row
        record, now = decode(columns[:10]), int(columns[10])
        if record.attempt == request.attempt and record.status is Status.IN_PROGRESS:
            if take is None and single:
                # A variable RETURNING reads is NULL when it did not exist as the statement
                # was prepared (this connection's first claim): it does now.
                take, old = (yield self.stmt_variables, {}).rows[0]
            if take is not None and int(take) == 2:
                return ClaimResult(ClaimOutcome.CLAIMED, record)
            if take is not None and int(take) == 1:
                if isinstance(old, bytes | bytearray):
                    old = bytes(old).decode()
                return _written(request, record, _previous(record, *str(old).split(",")))
        return _found(request, record, now)

    def claim_many(self, requests: Sequence[ClaimRequest]) -> Program[list[ClaimResult]]:
        if len(requests) < 2 or not self.insert_returning():
            return (yield from super().claim_many(requests))
        # Every row's variables must exist before the upsert is prepared (see _settle), and
        # a batch cannot ask for each row's afterwards: define them first.
        yield self.stmt_define, {}
        # Rows are locked in the order of VALUES: in key order (the column's byte order), two
        # batches over the same keys wait for each other instead of deadlocking. The sort is
        # stable, so a key's requests keep their order.
        order = sorted(range(len(requests)), key=lambda i: requests[i].key.encode())
        ordered = [requests[i] for i in order]
        results: list[ClaimResult] = []
        for start in range(0, len(ordered), _BATCH):
            chunk = ordered[start : start + _BATCH]
            params = {
                f"{name}_{i}": value
                for i, request in enumerate(chunk)
                for name, value in _claim_params(request).items()
            }
            rows = (yield self._batch_claim(len(chunk)), params).rows
            # One row per request, in the order of VALUES (a key twice in a batch: the
            # second upsert finds the first one's claim, as a second call would).
            settled = len(rows) == len(chunk)
            for i, request in enumerate(chunk):
                result = None
                if settled:
                    result = yield from self._settle(request, rows[i], single=False)
                if result is None:
                    result = yield from self.claim(request)
                results.append(result)
        answers: list[ClaimResult] = [results[0]] * len(requests)
        for position, index in enumerate(order):
            answers[index] = results[position]
        return answers

    def complete(self, key: str, fence: int, result: bytes, ttl: float) -> Program[Record]:
        if not self.insert_returning():
            return (yield from super().complete(key, fence, result, ttl))
        params = {"key": key, "fence": fence, "ttl": micros(ttl), **self.result_param(result)}
        record, now = yield from self._held(self.stmt_complete_returning, params)
        written = record is not None and record.fence == fence and record.updated_at == now
        if written and record is not None and record.status is Status.COMPLETED:
            return record  # by this statement
        return machine.after_failed_complete(record, key, fence, now)

    def renew(self, key: str, fence: int, lease: float) -> Program[Record]:
        if not self.insert_returning():
            return (yield from super().renew(key, fence, lease))
        lease_us = micros(lease)
        params = {"key": key, "fence": fence, "lease": lease_us}
        record, now = yield from self._held(self.stmt_renew_returning, params)
        written = record is not None and record.fence == fence and record.updated_at == now
        if written and record is not None and record.lease_expires_at == now + lease_us:
            return record  # by this statement
        return machine.after_failed_renew(record, key, fence, now)

    def _held(self, stmt: TextClause, params: dict[str, Any]) -> Program[tuple[Record | None, int]]:
        """The row a holder's upsert left (None: there was none) and the statement's time."""
        row = (yield stmt, params).rows[0]
        record, now = decode(row[:10]), int(row[10])
        if _placeholder(record):
            yield self.stmt_drop_placeholder, {"key": params["key"]}
            return None, now
        return record, now
