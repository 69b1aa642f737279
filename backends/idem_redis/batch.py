"""Many script calls in one round trip: the flushes of coalescing, and ``claim_many``.

A store hands its script calls to an :mod:`idem_core.coalesce` batcher; calls that overlap
(threads of one process, tasks of one loop) go together in the next flush. A flush of one
call is the store's usual single path. A flush of several sends them as one pipeline per
server (per Cluster primary: all pipelines sent, then all read), answers each call with its
reply or its own error reply, and then:

* ``NOSCRIPT`` (a server that restarted or flushed its scripts): those calls are sent again
  with ``EVAL`` in a second pipeline;
* a connection lost mid-pipeline (standalone): the calls whose replies were read keep them,
  the others are sent again on a fresh connection, up to ``retries`` times, as a single call
  is; then each gets the error. Every script is safe to repeat (a claim carries its attempt
  id, a repeated complete or release is recognised), so a resent call never runs twice;
* on a Cluster, a call redirected (``MOVED``, ``ASK``, ``TRYAGAIN``) or whose node failed is
  run alone through the cluster client, which follows the redirection or the new topology.

This module holds the decisions (:class:`Round`) and the two twins' I/O, nothing else.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import common
from .clients import DEADLINE
from .scripts import Script


class Op(NamedTuple):
    script: Script
    rkey: str
    args: tuple[Any, ...]


def _redirections() -> tuple[type[BaseException], ...]:
    from redis.exceptions import AskError, MovedError, TryAgainError

    return (MovedError, AskError, TryAgainError)


def _transport() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError, TimeoutError

    return (ConnectionError, TimeoutError, OSError)


def pause(attempt: int) -> float:
    """The backoff before resending (redis-py's retry pace: short, jittered)."""
    return float(min(0.1, 0.01 * 2**attempt) * random.random())


class Round:
    """The bookkeeping of one flush: one outcome per call, and which calls go again."""

    __slots__ = ("alone", "evals", "ops", "results")

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = ops
        self.results: list[Any] = [None] * len(ops)
        self.evals: set[int] = set()
        #: calls to run alone through the cluster client
        self.alone: list[int] = []

    def commands(self, indices: Sequence[int]) -> list[tuple[Any, ...]]:
        out = []
        for i in indices:
            op = self.ops[i]
            if i in self.evals:
                out.append(("EVAL", op.script.text, 1, op.rkey, *op.args))
            else:
                out.append(("EVALSHA", op.script.sha, 1, op.rkey, *op.args))
        return out

    def sort(self, indices: Sequence[int], replies: Sequence[Any], cluster: bool) -> list[int]:
        """Keep each reply in its place; return the calls to send again with EVAL."""
        again = []
        for i, reply in zip(indices, replies, strict=False):
            if isinstance(reply, Exception):
                if common.is_noscript(reply) and i not in self.evals:
                    self.evals.add(i)
                    again.append(i)
                    continue
                if cluster and isinstance(reply, _redirections()):
                    self.alone.append(i)
                    continue
            self.results[i] = reply
        return again

    def groups(self, client: Any) -> list[tuple[Any, list[int]]]:
        """The calls by Cluster node: (node, indices)."""
        found: dict[str, tuple[Any, list[int]]] = {}
        for i, op in enumerate(self.ops):
            node = client.get_node_from_key(op.rkey)
            found.setdefault(node.name, (node, []))[1].append(i)
        return list(found.values())


class fresh_deadline:
    """A flush of several calls gets a budget of its own: its leader may have waited for the
    flush before, and an async flush runs in a task that inherited an older call's deadline."""

    __slots__ = ("budget", "token")

    def __init__(self, budget: float) -> None:
        self.budget = budget

    def __enter__(self) -> None:
        self.token = DEADLINE.set(time.monotonic() + self.budget)

    def __exit__(self, *exc: object) -> None:
        DEADLINE.reset(self.token)


# -- sync ----------------------------------------------------------------------------------------


def _read(conn: Any, n: int, replies: list[Any]) -> None:
    from redis.exceptions import ResponseError

    for _ in range(n):
        try:
            replies.append(conn.read_response())
        except ResponseError as exc:
            replies.append(exc)


def flush_pool(pool: Any, ops: Sequence[Op], retries: int) -> list[Any]:
    """The calls on one standalone server, through a pooled connection."""
    rnd = Round(ops)
    todo = list(range(len(ops)))
    attempt = 0
    while todo:
        replies: list[Any] = []
        failure: BaseException | None = None
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands(rnd.commands(todo)))
            _read(conn, len(todo), replies)
        except _transport() as exc:
            conn.disconnect()
            failure = exc
        finally:
            pool.release(conn)
        again = rnd.sort(todo, replies, cluster=False)
        todo = sorted(again + todo[len(replies) :])
        if failure is not None:
            if attempt >= retries:
                for i in todo:
                    rnd.results[i] = failure
                break
            attempt += 1
            time.sleep(pause(attempt))
    return rnd.results


def flush_cluster(store: Any, ops: Sequence[Op]) -> list[Any]:
    """The calls on a Cluster: one pipeline per primary, all sent before any is read."""
    client = store.client
    rnd = Round(ops)
    pending = [
        (client.get_redis_connection(node).connection_pool, idx) for node, idx in rnd.groups(client)
    ]
    while pending:
        sent = []
        for pool, idx in pending:
            conn = pool.get_connection()
            try:
                conn.send_packed_command(conn.pack_commands(rnd.commands(idx)))
            except _transport():
                conn.disconnect()
                pool.release(conn)
                rnd.alone.extend(idx)
                continue
            sent.append((pool, conn, idx))
        pending = []
        for pool, conn, idx in sent:
            replies: list[Any] = []
            try:
                _read(conn, len(idx), replies)
            except _transport():
                conn.disconnect()
                rnd.alone.extend(idx[len(replies) :])
            finally:
                pool.release(conn)
            again = rnd.sort(idx, replies, cluster=True)
            if again:
                pending.append((pool, again))
    for i in rnd.alone:
        op = ops[i]
        try:
            rnd.results[i] = store._run_one(op.script, op.rkey, op.args)
        except Exception as exc:
            rnd.results[i] = exc
    return rnd.results


# -- async ---------------------------------------------------------------------------------------


async def _aread(conn: Any, n: int, replies: list[Any]) -> None:
    from redis.exceptions import ResponseError

    for _ in range(n):
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)


async def aflush_pool(pool: Any, ops: Sequence[Op], retries: int) -> list[Any]:
    """The twin of :func:`flush_pool`. A flush interrupted (cancelled) mid-pipeline drops
    its connection, which is then out of step."""
    rnd = Round(ops)
    todo = list(range(len(ops)))
    attempt = 0
    while todo:
        replies: list[Any] = []
        failure: BaseException | None = None
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_commands(rnd.commands(todo)))
            await _aread(conn, len(todo), replies)
        except _transport() as exc:
            await conn.disconnect()
            failure = exc
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        again = rnd.sort(todo, replies, cluster=False)
        todo = sorted(again + todo[len(replies) :])
        if failure is not None:
            if attempt >= retries:
                for i in todo:
                    rnd.results[i] = failure
                break
            attempt += 1
            await asyncio.sleep(pause(attempt))
    return rnd.results


async def _anode(rnd: Round, node: Any, idx: list[int]) -> None:
    """One Cluster node's share of a flush: its pipeline, then EVAL for NOSCRIPT."""
    while idx:
        replies: list[Any] = []
        conn = node.acquire_connection()
        try:
            await conn.send_packed_command(conn.pack_commands(rnd.commands(idx)))
            await _aread(conn, len(idx), replies)
        except _transport():
            await conn.disconnect()
            rnd.alone.extend(idx[len(replies) :])
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)
        idx = rnd.sort(idx, replies, cluster=True)


async def aflush_cluster(store: Any, ops: Sequence[Op]) -> list[Any]:
    """The twin of :func:`flush_cluster`: the nodes' pipelines run concurrently."""
    client = store.client
    rnd = Round(ops)
    await asyncio.gather(*(_anode(rnd, node, idx) for node, idx in rnd.groups(client)))
    for i in rnd.alone:
        op = ops[i]
        try:
            rnd.results[i] = await store._run_one(op.script, op.rkey, op.args)
        except Exception as exc:
            rnd.results[i] = exc
    return rnd.results
