"""The asyncio Redis store, on ``redis.asyncio``: the same scripts and rules as :mod:`.sync`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import weakref
from collections.abc import Sequence
from typing import Any

from idem_core.coalesce import AsyncBatcher
from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.record import ClaimRequest, ClaimResult, Record, micros

from . import batch, clients, common, steps
from .batch import Op
from .common import Config, translate
from .scripts import CLUSTER, STANDALONE, Script, vars_of

_POLL_MIN = 0.02
_POLL_MAX = 0.5
_RECHECK = 1.0
_SUBSCRIBED = {"subscribe", b"subscribe", "ssubscribe", b"ssubscribe"}


class _Held:
    """The client a store opened, and the event loop it serves (None until first use)."""

    __slots__ = ("client", "loop")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.loop: asyncio.AbstractEventLoop | None = None

    def drop(self) -> None:
        """Let go of the client quietly (see :func:`.clients.abandon`): run when the store is
        collected or at interpreter exit, and when its loop has closed."""
        if self.client is not None and self.loop is not None:
            clients.abandon(self.client)
        self.client = None


class AsyncRedisStore:
    """The asyncio twin of :class:`~idem_redis.sync.RedisStore`.

    A ``redis.asyncio`` client belongs to the event loop it first ran in. A store that opened
    its own client binds it to the loop of its first call; once that loop has closed, the next
    call (in a new loop) lets the old client go quietly and opens a new one, and a store
    collected after its loop closed leaves no warning behind. A call from a second loop while
    the first is still open is refused with ``ConfigurationError``: open one store per loop.
    ``redis.asyncio`` pools do not notice ``os.fork()`` either; in a child process the store
    builds a new client instead of touching the parent's sockets. A client you pass in is
    used as it is, on whatever loop you call from: binding it to a loop is yours to do.
    """

    max_key_length = common.MAX_KEY_LENGTH
    server_clock = True

    def __init__(self, config: Config, client: Any = None) -> None:
        from redis.asyncio.cluster import RedisCluster

        self.config = config
        #: bytes of encoded result the store accepts (Redis's ``proto-max-bulk-len``)
        self.max_result_size = config.max_result_size
        self._budget = config.budget
        self._owned = client is None
        if client is None:
            client = clients.build(config, aio=True)
        else:
            import redis.asyncio as aredis

            if not isinstance(client, aredis.Redis | RedisCluster):
                raise ConfigurationError(
                    f"client= must be a redis.asyncio.Redis or RedisCluster, not "
                    f"{type(client).__name__} (use open for sync clients)"
                )
            if common.decode_responses_on(client):
                raise ConfigurationError(
                    "the Redis client decodes responses; results are bytes, so give a client "
                    "made with decode_responses=False"
                )
        self._held = _Held(client)
        if self._owned:
            weakref.finalize(self, self._held.drop)
        self._pid = os.getpid()
        self.cluster = isinstance(client, RedisCluster)
        self.scripts = CLUSTER if self.cluster else STANDALONE
        self.prefix = config.prefix
        self._loaded = not self.cluster
        self._loading: asyncio.Lock | None = None
        self._batcher = self._coalescer()

    def __repr__(self) -> str:
        kind = "cluster" if self.cluster else self.config.kind
        return f"<AsyncRedisStore {kind} {self.prefix!r}>"

    @property
    def client(self) -> Any:
        """The client for the running loop (called inside a store call's ``translate``)."""
        held = self._held
        if held.loop is not asyncio.get_running_loop() or self._pid != os.getpid():
            self._rebind(asyncio.get_running_loop())
        return held.client

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        held = self._held
        old = held.loop
        held.loop = loop
        if not self._owned:
            if old is not None:
                self._batcher = self._coalescer()  # its queue belonged to the old loop
            return
        if self._pid != os.getpid():
            # The parent's sockets and event loop are not ours: start afresh, and leave the
            # old client alone (closing it could disturb the parent's connections).
            self._pid = os.getpid()
        elif old is None:
            return
        elif old.is_closed():
            clients.abandon(held.client)  # a closed loop runs no coroutine: no aclose()
        else:
            held.loop = old
            raise ConfigurationError(
                "this async Redis store is bound to another event loop that is still open; "
                "open one store per event loop (or close the other loop first)"
            )
        held.client = clients.build(self.config, aio=True)
        self._loaded = not self.cluster
        self._loading = None
        self._batcher = self._coalescer()

    async def _load_scripts(self) -> None:
        """Load every script on every primary before the first call on a cluster.

        ``redis.asyncio``'s cluster client mishandles NOSCRIPT replies on connections that
        are still being set up concurrently (it drops them mid-handshake), so a cold client
        under concurrent first calls must never see one.
        """
        from redis.asyncio.cluster import RedisCluster

        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            if self._loaded:
                return
            client = self.client
            for script in vars_of(self.scripts):
                await client.execute_command(
                    "SCRIPT LOAD", script.text, target_nodes=RedisCluster.PRIMARIES
                )
            self._loaded = True

    def _k(self, key: str) -> str:
        return self.prefix + key

    async def _run(self, script: Script, rkey: str, *args: Any) -> Any:
        """One script call, in a round trip shared with other tasks' calls that overlap it
        (:mod:`.batch`); alone, it is :meth:`_run_one`."""
        if not self._loaded:
            await self._load_scripts()
        self.client  # noqa: B018 - binds the store to the running loop (and its batcher)
        if self._batcher is None:
            return await self._run_one(script, rkey, args)
        return await self._batcher.submit(Op(script, rkey, args))

    async def _flush(self, ops: Sequence[Op]) -> list[Any]:
        if len(ops) == 1:
            op = ops[0]
            return [await self._run_one(op.script, op.rkey, op.args)]
        with batch.fresh_deadline(self._budget):
            if self.cluster:
                return await batch.aflush_cluster(self, ops)
            return await batch.aflush_pool(self.client.connection_pool, ops, self.config.retries)

    def _coalescer(self) -> AsyncBatcher[Op, Any] | None:
        """As the sync store's: a pool (or a Cluster) and no ``WAIT``; one per event loop."""
        if not self.config.coalesce or self.config.wait_replicas > 0:
            return None
        client = self._held.client
        if not self.cluster and getattr(client, "connection", None) is not None:
            return None
        return AsyncBatcher(self._flush, max_batch=common.MAX_BATCH)

    async def _run_one(self, script: Script, rkey: str, args: tuple[Any, ...]) -> Any:
        if not self._loaded:
            await self._load_scripts()
        client = self.client
        if not self.cluster and getattr(client, "connection", None) is None:
            return await self._run_direct(client.connection_pool, script, rkey, args)
        try:
            return await client.execute_command("EVALSHA", script.sha, 1, rkey, *args)
        except Exception as exc:
            if not common.is_noscript(exc):
                raise
        return await client.execute_command("EVAL", script.text, 1, rkey, *args)

    async def _run_direct(self, pool: Any, script: Script, rkey: str, args: tuple[Any, ...]) -> Any:
        """The twin of the sync store's direct path: EVALSHA (EVAL on NOSCRIPT) on a pooled
        connection, skipping redis-py's generic command path; retried as redis-py retries.
        A task cancelled mid-command leaves no reply behind: redis-py's connection
        disconnects itself on any exception while sending or reading."""
        from redis.exceptions import ConnectionError, ResponseError, TimeoutError

        attempt = 0
        while True:
            conn = await pool.get_connection()
            try:
                try:
                    await conn.send_command("EVALSHA", script.sha, 1, rkey, *args)
                    return await conn.read_response()
                except ResponseError as exc:
                    if not common.is_noscript(exc):
                        raise
                # A server that restarted or flushed its script cache: EVAL loads it again.
                await conn.send_command("EVAL", script.text, 1, rkey, *args)
                return await conn.read_response()
            except (ConnectionError, TimeoutError, OSError):
                await conn.disconnect()
                if attempt >= self.config.retries:
                    raise
            finally:
                await pool.release(conn)
            attempt += 1
            await asyncio.sleep(min(0.1, 0.01 * 2**attempt) * random.random())

    async def _run_and_wait(self, script: Script, rkey: str, *args: Any) -> Any:
        if self.config.wait_replicas <= 0:
            return await self._run(script, rkey, *args)
        if not self._loaded:
            await self._load_scripts()
        wait = ("WAIT", self.config.wait_replicas, self.config.wait_timeout_ms)
        for command in ("EVALSHA", "EVAL"):
            body = script.sha if command == "EVALSHA" else script.text
            call = (command, body, 1, rkey, *args)
            if self.cluster:
                pair = await self._on_primary(rkey, call, wait)
            else:
                pipe = self.client.pipeline(transaction=False)
                pipe.execute_command(*call)
                pipe.execute_command(*wait)
                pair = await pipe.execute(raise_on_error=False)
            reply = common.waited(pair, self.config, rkey)
            if reply is not None:
                return reply
        raise StoreUnavailable(f"the {script.name} script could not be loaded")

    async def _on_primary(self, rkey: str, *commands: tuple[Any, ...]) -> list[Any]:
        """Commands on one connection to the key's primary (``WAIT`` counts that connection's
        writes), in one round trip."""
        node = self.client.get_node_from_key(rkey)
        conn = node.acquire_connection()
        replies: list[Any] = []
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except Exception as exc:
                    from redis.exceptions import ResponseError

                    if not isinstance(exc, ResponseError):
                        raise
                    replies.append(exc)
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)
        return replies

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        with translate("claim", self._budget):
            reply = await self._run_and_wait(
                self.scripts.claim, self._k(request.key), *common.claim_args(request)
            )
        return common.claim_result(request, reply)

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        """One pipeline: one round trip per server (per cluster node holding the keys)."""
        if not requests:
            return []
        if self.config.wait_replicas > 0:
            return [await self.claim(r) for r in requests]
        script = self.scripts.claim
        ops = [Op(script, self._k(r.key), common.claim_args(r)) for r in requests]
        with translate("claim_many", self._budget):
            if not self._loaded:
                await self._load_scripts()
            replies = common.raise_any(await self._flush(ops))
        return [common.claim_result(r, reply) for r, reply in zip(requests, replies, strict=True)]

    async def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        common.refuse_with_items(with_items)
        common.check_size(key, result, self.max_result_size)
        with translate("complete", self._budget):
            reply = await self._run_and_wait(
                self.scripts.complete, self._k(key), str(fence), result, micros(ttl)
            )
        return common.complete_result(key, fence, result, ttl, reply)

    async def release(self, key: str, fence: int) -> None:
        with translate("release", self._budget):
            reply = await self._run(self.scripts.release, self._k(key), str(fence))
        common.release_result(key, fence, reply)

    async def renew(self, key: str, fence: int, lease: float) -> Record:
        with translate("renew", self._budget):
            reply = await self._run(self.scripts.renew, self._k(key), str(fence), micros(lease))
        return common.renew_result(key, fence, lease, reply)

    async def _read(self, key: str) -> tuple[Record | None, int]:
        with translate("get", self._budget):
            reply = await self._run(self.scripts.get, self._k(key))
        return common.get_result(key, reply)

    async def get(self, key: str) -> Record | None:
        return (await self._read(key))[0]

    async def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        await steps.arecord_step(self, key, fence, name, data, until)

    async def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        return await steps.aload_steps(self, key)

    async def delete(self, key: str) -> None:
        with translate("delete", self._budget):
            await self._run(self.scripts.delete, self._k(key))

    async def now(self) -> int:
        with translate("now", self._budget):
            if self.cluster:
                from redis.asyncio.cluster import RedisCluster

                reply = await self.client.time(target_nodes=RedisCluster.RANDOM)
            else:
                reply = await self.client.time()
        return common.server_micros(reply)

    async def wait_for_change(self, key: str, fence: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once ``key`` is no longer held with ``fence``, or after ``timeout``.

        Subscribe (and wait for the confirmation) first, then re-read, so a change in
        between is never missed; without pub/sub, poll with backoff.
        """
        deadline = time.monotonic() + timeout
        pubsub = await self._subscribe(self._k(key), deadline)
        delay = _POLL_MIN
        try:
            while True:
                record, now = await self._read(key)
                if not common.still_held(record, fence, now):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                assert record is not None
                until_lapse = (record.lease_expires_at - now) / 1_000_000 + 0.001
                pause = min(remaining, until_lapse, _RECHECK)
                if pubsub is not None:
                    try:
                        await self._next(pubsub, pause)
                    except common.transient():
                        await self._unsubscribe(pubsub)
                        pubsub = None
                else:
                    await asyncio.sleep(min(pause, delay))
                    delay = min(delay * 2, _POLL_MAX)
        finally:
            if pubsub is not None:
                await self._unsubscribe(pubsub)

    async def _subscribe(self, channel: str, deadline: float) -> Any:
        """A confirmed subscription, or None (then the caller polls). Connecting and
        subscribing keep to one call's budget, however long the wait."""
        pubsub: Any = None
        try:
            with clients.deadline(min(self._budget, max(0.0, deadline - time.monotonic()))):
                pubsub = self.client.pubsub()
                if self.cluster:
                    await pubsub.ssubscribe(channel)
                else:
                    await pubsub.subscribe(channel)
            while time.monotonic() < deadline:
                wait = max(0.0, min(1.0, deadline - time.monotonic()))
                message = await self._next(pubsub, wait)
                if message is not None and message.get("type") in _SUBSCRIBED:
                    return pubsub
        except StoreUnavailable:
            pass
        except common.transient():
            pass
        if pubsub is not None:
            await self._unsubscribe(pubsub)
        return None

    async def _next(self, pubsub: Any, seconds: float) -> Any:
        if self.cluster:
            return await pubsub.get_sharded_message(timeout=seconds)
        return await pubsub.get_message(timeout=seconds)

    @staticmethod
    async def _unsubscribe(pubsub: Any) -> None:
        with contextlib.suppress(*common.transient()):
            await pubsub.aclose()

    async def diagnostics(self) -> dict[str, object]:
        from redis.utils import HIREDIS_AVAILABLE

        with translate("diagnostics", self._budget):
            if self.cluster:
                from redis.asyncio.cluster import RedisCluster

                info = await self.client.info(target_nodes=RedisCluster.RANDOM)
                nodes = len(self.client.get_primaries())
            else:
                info = await self.client.info()
                nodes = 1
        return common.diagnostics(self, info, nodes, HIREDIS_AVAILABLE)

    async def close(self) -> None:
        """Close the client this store opened, in the loop it serves; one whose loop has
        closed is let go of quietly."""
        held = self._held
        if not self._owned or self._pid != os.getpid() or held.client is None:
            return
        if held.loop is None or held.loop is asyncio.get_running_loop():
            await held.client.aclose()
        elif held.loop.is_closed():
            held.drop()
