"""Coalescing on PostgreSQL (psycopg 3): concurrent operations of one store share round trips.

The hot operations (claim, complete, release, renew, get) of a store on an engine go through
:class:`~idem_core.coalesce.Batcher` (threads) or :class:`~idem_core.coalesce.AsyncBatcher`
(one event loop). An operation issued while another is in flight waits for it to end; then
everything that queued meanwhile runs in one flush: the programs of :mod:`idem_sql.ops` in
lockstep on one connection in psycopg's pipeline mode. Each *round* sends the next statement
of every unfinished program, then one Sync: one round trip for all of them (a first call's
claim, or its completion, is one statement, so a flush is usually one round). An operation
alone (concurrency 1) takes the plain path, with no pipeline.

Claims of distinct keys in a round share one multi-row statement, and so do completions
(:class:`_Lockstep`): the server runs two statements, not one per operation.

A round is one implicit transaction on the server (statements up to a Sync): one commit, so
one WAL flush, for the whole round, which is where most of the gain is. Two consequences:

* A round's statements go sorted by key, so two rounds on two connections (another process,
  say) mostly take their row locks in the same order. Where they cannot (two shared
  statements crossing each other's keys), PostgreSQL detects the deadlock and aborts one
  round, which is then handled as below: a second's delay (``deadlock_timeout``), no error.
* A statement that fails aborts the round (PostgreSQL skips the rest until the Sync, and
  rolls back what ran). The round is then sent again one statement at a time, each its own
  transaction, so each operation gets its own outcome: a failure of its own stays its own.

A connection-level failure (the connection dropped, the read timeout expired: the connection
is closed and invalidated, never pooled again) fails every operation of the flush with the
same ``DBAPIError``; each caller's store translates it at its one translation point
(``_run``, :mod:`idem_sql.errors`), as if it had run alone. Like any lost reply, statements
already sent may have taken effect; every program is safe to run again.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import BigInteger, LargeBinary, String, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import TextClause

from idem_core.coalesce import AsyncBatcher, Batcher

from .caches import AsyncConnectionCache, ConnectionCache, _Entry, _shielded
from .ops import SQL, Program, Rows

T = TypeVar("T")

#: operations per flush; more wait for the next one
MAX_BATCH = 256
#: flushes in flight at once per store (each on its own connection)
FLIGHTS = 1

_CURSORS = "idem_sql.coalesce.cursors"


class _Shared(NamedTuple):
    """A multi-row statement that answers many operations' single-row statement at once."""

    stmt: TextClause
    #: (array parameter, the single statement's parameter) pairs
    arrays: tuple[tuple[str, str], ...]
    #: where a returned row holds its key (how rows go back to operations)
    key_at: int


def _shared(sql: SQL) -> dict[TextClause, _Shared]:
    """The statements that several operations of a round may share, for this table."""
    found = _SHARED.get(sql)
    if found is not None:
        return found
    found = {}
    many = getattr(sql, "stmt_claim_many", None)
    if many is not None:
        claims = (
            ("keys", "key"),
            ("fingerprints", "fingerprint"),
            ("attempts", "attempt"),
            ("leases", "lease"),
            ("lives", "life"),
        )
        found[sql.stmt_claim] = _Shared(many, claims, 1)  # type: ignore[attr-defined]
        completes = (("keys", "key"), ("fences", "fence"), ("results", "result"), ("ttls", "ttl"))
        found[sql.stmt_complete] = _Shared(_complete_many(sql), completes, 0)
    _SHARED[sql] = found
    return found


def _complete_many(sql: SQL) -> TextClause:
    """``stmt_complete`` (:mod:`idem_sql.ops`) for many keys: the same condition (the
    caller's fence holds the record) and the same writes, per row of the arrays."""
    c, t = sql.c, sql.t
    holds = sql.holds.replace(":key", "q.k").replace(":fence", "q.f")
    returning = ", ".join(f"{t}.{col}" for col in c.values())
    return text(
        f"UPDATE {t} SET {sql.completes('q.res', 'q.ttl')} "
        "FROM unnest(CAST(:keys AS VARCHAR[]), CAST(:fences AS BIGINT[]), "
        "CAST(:results AS BYTEA[]), CAST(:ttls AS BIGINT[])) AS q(k, f, res, ttl) "
        f"WHERE {holds} RETURNING {returning}"
    ).bindparams(
        bindparam("keys", type_=ARRAY(String())),
        bindparam("fences", type_=ARRAY(BigInteger())),
        bindparam("results", type_=ARRAY(LargeBinary())),
        bindparam("ttls", type_=ARRAY(BigInteger())),
    )


_SHARED: weakref.WeakKeyDictionary[SQL, dict[TextClause, _Shared]] = weakref.WeakKeyDictionary()


def coalesces(sql: SQL) -> bool:
    """Whether a store on an engine with this SQL coalesces: psycopg 3 whose libpq has
    pipeline mode (14 or later) only; other drivers keep one round trip per statement."""
    dialect = sql.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        return False
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


class _Sent(NamedTuple):
    """One statement of a round and the operations it answers."""

    ops: list[int]
    #: for a statement shared by several operations: each one's key (rows go by key)
    keys: list[str] | None
    #: where a returned row holds its key
    key_at: int
    sql: str
    args: Any
    returns_rows: bool


class _Lockstep:
    """N programs advanced side by side (the decisions both flushes share; no I/O).

    Claims of distinct keys in a round share one statement, the store's multi-row claim
    (``stmt_claim_many``): its rows say, per key, what the single claim would have said, and
    a key without a row (a race lost to a concurrent insert) makes that claim run again, as
    its own program does when the single statement returns nothing. Completions of distinct
    keys share one ``UPDATE ... FROM unnest(...)`` likewise: a key without a row reads the
    record and decides, as after a single completion that wrote nothing.
    """

    def __init__(self, programs: Sequence[Program[Any]], sql: SQL) -> None:
        self._programs = programs
        self._compiled = sql.compiled
        self._shared = _shared(sql)
        self.outcomes: list[Any] = [None] * len(programs)
        self._pending: list[tuple[int, Any]] = []
        for i in range(len(programs)):
            self._advance(i, None)

    def _advance(self, i: int, rows: Rows | None) -> None:
        program = self._programs[i]
        try:
            step = next(program) if rows is None else program.send(rows)
        except StopIteration as stop:
            self.outcomes[i] = stop.value
        except Exception as exc:  # the operation's own answer (LeaseLost, CorruptRecord...)
            self.outcomes[i] = exc
        else:
            self._pending.append((i, step))

    def round(self) -> list[_Sent]:
        """The next statement of every unfinished program, sorted by key (lock order);
        statements of a kind several programs can share (distinct keys), shared."""
        pending, self._pending = self._pending, []
        pending.sort(key=lambda item: str(item[1][1].get("key", "")))
        sent: list[_Sent] = []
        groups: dict[TextClause, dict[str, tuple[int, dict[str, Any]]]] = {}
        for i, (stmt, params) in pending:
            if stmt in self._shared:
                group = groups.setdefault(stmt, {})
                if params["key"] not in group:
                    group[params["key"]] = (i, params)
                    continue
            sent.append(self._single(i, stmt, params))
        shared: list[_Sent] = []
        for stmt, group in groups.items():
            if len(group) == 1:
                ((i, params),) = group.values()
                shared.append(self._single(i, stmt, params))
                continue
            spec = self._shared[stmt]
            sql, layout, returns_rows = self._compiled(spec.stmt)
            rows = list(group.values())
            arrays = {name: [params[field] for _, params in rows] for name, field in spec.arrays}
            ops = [i for i, _ in rows]
            shared.append(_Sent(ops, list(group), spec.key_at, sql, layout(arrays), returns_rows))
        return shared + sent

    def _single(self, i: int, stmt: TextClause, params: dict[str, Any]) -> _Sent:
        sql, layout, returns_rows = self._compiled(stmt)
        return _Sent([i], None, 0, sql, layout(params), returns_rows)

    def answer(self, sent: list[_Sent], outcomes: Sequence[Rows | Exception]) -> None:
        """Each statement's rows to its programs, or its failure as their outcome."""
        for item, outcome in zip(sent, outcomes, strict=True):
            if isinstance(outcome, Exception):
                for i in item.ops:
                    self.outcomes[i] = outcome
                    self._programs[i].close()
            elif item.keys is None:
                self._advance(item.ops[0], outcome)
            else:
                by_key = {row[item.key_at]: row for row in outcome.rows}
                for i, key in zip(item.ops, item.keys, strict=True):
                    row = by_key.get(key)
                    self._advance(i, Rows([row], 1) if row is not None else Rows([], 0))


def _cursors(entry: _Entry, n: int) -> list[Any]:
    """At least ``n`` cursors of the entry's connection, one per statement of a round. They
    live in the pool's record of the connection (``info``), which forgets them with it."""
    record = entry[0]
    cursors: list[Any] = record.info.setdefault(_CURSORS, [])
    while len(cursors) < n:
        cursors.append(_driver(entry).cursor())
    return cursors


class Coalescer:
    """The sync store's hot operations, coalesced over its :class:`ConnectionCache`."""

    def __init__(
        self, cache: ConnectionCache, *, max_batch: int = MAX_BATCH, flights: int = FLIGHTS
    ) -> None:
        self._cache = cache
        self._batcher: Batcher[Program[Any], Any] = Batcher(
            self._flush, max_batch=max_batch, flights=flights
        )
        #: flushes that carried more than one operation (diagnostics, tests)
        self.batches = 0

    def run(self, program: Program[T]) -> T:
        result: T = self._batcher.submit(program)
        return result

    def _flush(self, programs: Sequence[Program[Any]]) -> list[Any]:
        cache = self._cache
        if len(programs) == 1:
            # Alone: the plain path (no pipeline), as without coalescing.
            return [cache.run(programs[0])]
        self.batches += 1
        lockstep = _Lockstep(programs, cache.sql)
        entry = cache.checkout()
        in_driver = False
        sent: list[_Sent] = []
        try:
            while sent := lockstep.round():
                in_driver = True
                outcomes = self._send(entry, sent)
                in_driver = False
                lockstep.answer(sent, outcomes)
        except cache.dbapi_error as exc:
            raise self._lost(entry, exc, sent) from exc
        except BaseException:
            if in_driver:
                entry[0].invalidate()  # interrupted inside the driver: state unknown
            else:
                cache._put_back(entry)
            raise
        cache._put_back(entry)
        return lockstep.outcomes

    def _send(self, entry: _Entry, sent: list[_Sent]) -> list[Rows | Exception]:
        """One round in one round trip; a round a statement aborted, one by one."""
        conn = _driver(entry)
        cursors = _cursors(entry, len(sent))
        try:
            with conn.pipeline():
                for cursor, item in zip(cursors, sent, strict=False):
                    cursor.execute(item.sql, item.args)
            return [
                Rows(cursor.fetchall() if item.returns_rows else [], cursor.rowcount)
                for cursor, item in zip(cursors, sent, strict=False)
            ]
        except self._cache.dbapi_error as exc:
            if self._cache._error(entry, exc, "", None).connection_invalidated:
                raise
        return [self._alone(entry, item) for item in sent]

    def _alone(self, entry: _Entry, item: _Sent) -> Rows | Exception:
        cursor = entry[1]
        try:
            cursor.execute(item.sql, item.args)
            return Rows(cursor.fetchall() if item.returns_rows else [], cursor.rowcount)
        except self._cache.dbapi_error as exc:
            error = self._cache._error(entry, exc, item.sql, item.args)
            if error.connection_invalidated:
                raise
            error.__cause__ = exc
            return error

    def _lost(self, entry: _Entry, exc: Exception, sent: list[_Sent]) -> Exception:
        """The connection failed under the flush: every operation of it fails alike."""
        sql = sent[0].sql if sent else ""
        error = self._cache._error(entry, exc, f"pipeline of {len(sent)}: {sql}", None)
        if error.connection_invalidated:
            self._cache._invalidate(entry, exc)
        else:
            self._cache._put_back(entry)
        return error


class AsyncCoalescer:
    """The twin of :class:`Coalescer`, on an :class:`AsyncConnectionCache`."""

    def __init__(
        self, cache: AsyncConnectionCache, *, max_batch: int = MAX_BATCH, flights: int = FLIGHTS
    ) -> None:
        self._cache = cache
        self._batcher: AsyncBatcher[Program[Any], Any] = AsyncBatcher(
            self._flush, max_batch=max_batch, flights=flights
        )
        self.batches = 0

    async def run(self, program: Program[T]) -> T:
        result: T = await self._batcher.submit(program)
        return result

    async def _flush(self, programs: Sequence[Program[Any]]) -> list[Any]:
        cache = self._cache
        if len(programs) == 1:
            return [await cache.run(programs[0])]
        self.batches += 1
        lockstep = _Lockstep(programs, cache.sql)
        entry = await cache.checkout()
        in_driver = False
        sent: list[_Sent] = []
        try:
            while sent := lockstep.round():
                in_driver = True
                outcomes = await self._send(entry, sent)
                in_driver = False
                lockstep.answer(sent, outcomes)
        except cache.dbapi_error as exc:
            raise await self._lost(entry, exc, sent) from exc
        except BaseException:
            if in_driver:
                await _shielded(_greenlet_invalidate(entry))
            else:
                await cache._put_back(entry)
            raise
        await cache._put_back(entry)
        return lockstep.outcomes

    async def _send(self, entry: _Entry, sent: list[_Sent]) -> list[Rows | Exception]:
        conn = _driver(entry)
        cursors = _cursors(entry, len(sent))
        try:
            async with conn.pipeline():
                for cursor, item in zip(cursors, sent, strict=False):
                    await cursor.execute(item.sql, item.args)
            return [
                Rows(await cursor.fetchall() if item.returns_rows else [], cursor.rowcount)
                for cursor, item in zip(cursors, sent, strict=False)
            ]
        except self._cache.dbapi_error as exc:
            if self._cache._error(entry, exc, "", None).connection_invalidated:
                raise
        return [await self._alone(entry, item) for item in sent]

    async def _alone(self, entry: _Entry, item: _Sent) -> Rows | Exception:
        cursor = entry[1]
        try:
            await cursor.execute(item.sql, item.args)
            return Rows(await cursor.fetchall() if item.returns_rows else [], cursor.rowcount)
        except self._cache.dbapi_error as exc:
            error = self._cache._error(entry, exc, item.sql, item.args)
            if error.connection_invalidated:
                raise
            error.__cause__ = exc
            return error

    async def _lost(self, entry: _Entry, exc: Exception, sent: list[_Sent]) -> Exception:
        sql = sent[0].sql if sent else ""
        error = self._cache._error(entry, exc, f"pipeline of {len(sent)}: {sql}", None)
        if error.connection_invalidated:
            await self._cache._invalidate(entry, exc)
        else:
            await self._cache._put_back(entry)
        return error


def _driver(entry: _Entry) -> Any:
    """The psycopg connection under the pool's proxy."""
    return entry[0].driver_connection


async def _greenlet_invalidate(entry: _Entry) -> None:
    from sqlalchemy.util import greenlet_spawn

    await greenlet_spawn(entry[0].invalidate)
