"""The synchronous Redis store, on redis-py (hiredis parses replies when it is installed)."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

from idem_core.coalesce import Batcher
from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.record import ClaimRequest, ClaimResult, Record, micros
from idem_core.scanning import DEFAULT_PAGE, ScanFilter

from . import batch, clients, common, steps
from .batch import Op
from .common import Config, translate
from .scan import NOTE as SCAN_NOTE
from .scan import scan_pages
from .scripts import CLUSTER, STANDALONE, Script

_POLL_MIN = 0.02
_POLL_MAX = 0.5
# Re-read the record at least this often while subscribed, in case a message was lost
# (a reconnect drops the subscription until it is renewed).
_RECHECK = 1.0


def is_cluster(client: Any) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


class RedisStore:
    """Records in Redis hashes, one key each, changed only by the scripts in :mod:`.scripts`."""

    max_key_length = common.MAX_KEY_LENGTH
    server_clock = True

    def __init__(self, config: Config, client: Any = None) -> None:
        self.config = config
        #: bytes of encoded result the store accepts (Redis's ``proto-max-bulk-len``)
        self.max_result_size = config.max_result_size
        self._budget = config.budget
        self._owned = client is None
        if client is None:
            if config.cluster:
                # redis-py's cluster client asks for the slots as it is built: that happens
                # on first use, inside a call, so a cluster that is down is StoreUnavailable.
                self._client: Any = None
                self.cluster = True
                self.scripts = CLUSTER
                self.prefix = config.prefix
                self._pool = None
                self._batcher = self._coalescer()
                return
            client = clients.build(config, aio=False)
        else:
            import redis

            if not isinstance(client, redis.Redis | redis.RedisCluster):
                raise ConfigurationError(
                    f"client= must be a redis.Redis or redis.RedisCluster, not "
                    f"{type(client).__name__} (use open_async for redis.asyncio clients)"
                )
            if common.decode_responses_on(client):
                raise ConfigurationError(
                    "the Redis client decodes responses; results are bytes, so give a client "
                    "made with decode_responses=False"
                )
        self._client = client
        self.cluster = is_cluster(client)
        self.scripts = CLUSTER if self.cluster else STANDALONE
        self.prefix = config.prefix
        # A pooled standalone (or Sentinel) client: scripts go straight to a pooled
        # connection, skipping redis-py's generic command path (~15 us a call here).
        self._pool = None if self.cluster or client.connection else client.connection_pool
        self._batcher = self._coalescer()

    def _coalescer(self) -> Batcher[Op, Any] | None:
        """Coalescing needs a pool (or a Cluster) and no ``WAIT`` (which counts one
        connection's writes)."""
        if not self.config.coalesce or self.config.wait_replicas > 0:
            return None
        if not self.cluster and self._pool is None:
            return None  # a given single-connection client: nothing to share
        return Batcher(self._flush, max_batch=common.MAX_BATCH)

    def __repr__(self) -> str:
        return f"<RedisStore {'cluster' if self.cluster else self.config.kind} {self.prefix!r}>"

    @property
    def client(self) -> Any:
        if self._client is None:
            with translate("connect", self._budget):
                self._client = clients.build(self.config, aio=False)
        return self._client

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _run(self, script: Script, rkey: str, *args: Any) -> Any:
        """One script call, in a round trip shared with other threads' calls that overlap
        it (:mod:`.batch`); alone, it is :meth:`_run_one`."""
        if self._batcher is None:
            return self._run_one(script, rkey, args)
        return self._batcher.submit(Op(script, rkey, args))

    def _flush(self, ops: Sequence[Op]) -> list[Any]:
        if len(ops) == 1:
            op = ops[0]
            return [self._run_one(op.script, op.rkey, op.args)]
        with batch.fresh_deadline(self._budget):
            if self.cluster:
                return batch.flush_cluster(self, ops)
            return batch.flush_pool(self._pool, ops, self.config.retries)

    def _run_one(self, script: Script, rkey: str, args: tuple[Any, ...]) -> Any:
        if self._pool is not None:
            return self._run_direct(script, rkey, args)
        try:
            return self.client.execute_command("EVALSHA", script.sha, 1, rkey, *args)
        except Exception as exc:
            if not common.is_noscript(exc):
                raise
        # A server that restarted or flushed its script cache: EVAL loads the script again.
        return self.client.execute_command("EVAL", script.text, 1, rkey, *args)

    def _run_direct(self, script: Script, rkey: str, args: tuple[Any, ...]) -> Any:
        """EVALSHA (EVAL on NOSCRIPT) on a pooled connection. A dropped connection is
        retried like redis-py's own retry: every script is safe to repeat (claims carry
        their attempt id; the core recognises a repeated complete or release)."""
        from redis.exceptions import ConnectionError, ResponseError, TimeoutError

        pool = self._pool
        assert pool is not None
        attempt = 0
        while True:
            conn = pool.get_connection()
            try:
                try:
                    conn.send_command("EVALSHA", script.sha, 1, rkey, *args)
                    return conn.read_response()
                except ResponseError as exc:
                    if not common.is_noscript(exc):
                        raise
                # A server that restarted or flushed its script cache: EVAL loads it again.
                conn.send_command("EVAL", script.text, 1, rkey, *args)
                return conn.read_response()
            except (ConnectionError, TimeoutError, OSError):
                conn.disconnect()
                if attempt >= self.config.retries:
                    raise
            finally:
                pool.release(conn)
            attempt += 1
            time.sleep(min(0.1, 0.01 * 2**attempt) * random.random())

    def _run_and_wait(self, script: Script, rkey: str, *args: Any) -> Any:
        """The script and ``WAIT`` on the same connection, in one round trip."""
        if self.config.wait_replicas <= 0:
            return self._run(script, rkey, *args)
        target = self.client
        if self.cluster:
            # WAIT counts the writes of its own connection: send it to the key's primary.
            target = self.client.get_redis_connection(self.client.get_node_from_key(rkey))
        wait = ("WAIT", self.config.wait_replicas, self.config.wait_timeout_ms)
        for command in ("EVALSHA", "EVAL"):
            pipe = target.pipeline(transaction=False)
            body = script.sha if command == "EVALSHA" else script.text
            pipe.execute_command(command, body, 1, rkey, *args)
            pipe.execute_command(*wait)
            reply = common.waited(pipe.execute(raise_on_error=False), self.config, rkey)
            if reply is not None:
                return reply
        raise StoreUnavailable(f"the {script.name} script could not be loaded")

    def claim(self, request: ClaimRequest) -> ClaimResult:
        with translate("claim", self._budget):
            reply = self._run_and_wait(
                self.scripts.claim, self._k(request.key), *common.claim_args(request)
            )
        return common.claim_result(request, reply)

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        """One pipeline: one round trip per server (per cluster node holding the keys)."""
        if not requests:
            return []
        if self.config.wait_replicas > 0:
            return [self.claim(r) for r in requests]
        script = self.scripts.claim
        ops = [Op(script, self._k(r.key), common.claim_args(r)) for r in requests]
        with translate("claim_many", self._budget):
            replies = common.raise_any(self._flush(ops))
        return [common.claim_result(r, reply) for r, reply in zip(requests, replies, strict=True)]

    def complete(
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
            reply = self._run_and_wait(
                self.scripts.complete, self._k(key), str(fence), result, micros(ttl)
            )
        return common.complete_result(key, fence, result, ttl, reply)

    def release(self, key: str, fence: int) -> None:
        with translate("release", self._budget):
            reply = self._run(self.scripts.release, self._k(key), str(fence))
        common.release_result(key, fence, reply)

    def renew(self, key: str, fence: int, lease: float) -> Record:
        with translate("renew", self._budget):
            reply = self._run(self.scripts.renew, self._k(key), str(fence), micros(lease))
        return common.renew_result(key, fence, lease, reply)

    def _read(self, key: str) -> tuple[Record | None, int]:
        with translate("get", self._budget):
            reply = self._run(self.scripts.get, self._k(key))
        return common.get_result(key, reply)

    def get(self, key: str) -> Record | None:
        return self._read(key)[0]

    def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        steps.record_step(self, key, fence, name, data, until)

    def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        return steps.load_steps(self, key)

    def delete(self, key: str) -> None:
        with translate("delete", self._budget):
            self._run(self.scripts.delete, self._k(key))

    def now(self) -> int:
        with translate("now", self._budget):
            if self.cluster:
                from redis.cluster import RedisCluster

                reply = self.client.time(target_nodes=RedisCluster.RANDOM)
            else:
                reply = self.client.time()
        return common.server_micros(reply)

    def wait_for_change(self, key: str, fence: int, timeout: float) -> None:
        """Return once ``key`` is no longer held with ``fence``, or after ``timeout``.

        Subscribes to the key's channel (the scripts publish on complete, release and
        delete), waits for the subscription to be confirmed, then re-reads, so a change
        between the read and the wait is never missed. Without pub/sub it polls.
        """
        deadline = time.monotonic() + timeout
        pubsub = self._subscribe(self._k(key), deadline)
        delay = _POLL_MIN
        try:
            while True:
                record, now = self._read(key)
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
                        self._next(pubsub, pause)
                    except common.transient():
                        self._unsubscribe(pubsub)
                        pubsub = None
                else:
                    time.sleep(min(pause, delay))
                    delay = min(delay * 2, _POLL_MAX)
        finally:
            if pubsub is not None:
                self._unsubscribe(pubsub)

    def _subscribe(self, channel: str, deadline: float) -> Any:
        """A confirmed subscription, or None (then the caller polls). Connecting and
        subscribing keep to one call's budget, however long the wait."""
        pubsub: Any = None
        try:
            with clients.deadline(min(self._budget, max(0.0, deadline - time.monotonic()))):
                pubsub = self.client.pubsub()
                if self.cluster:
                    pubsub.ssubscribe(channel)
                else:
                    pubsub.subscribe(channel)
            while time.monotonic() < deadline:
                message = self._next(pubsub, max(0.0, min(1.0, deadline - time.monotonic())))
                if message is not None and message.get("type") in {
                    "subscribe",
                    b"subscribe",
                    "ssubscribe",
                    b"ssubscribe",
                }:
                    return pubsub
        except StoreUnavailable:
            pass
        except common.transient():
            pass
        if pubsub is not None:
            self._unsubscribe(pubsub)
        return None

    def _next(self, pubsub: Any, timeout: float) -> Any:
        if self.cluster:
            return pubsub.get_sharded_message(timeout=timeout)
        return pubsub.get_message(timeout=timeout)

    @staticmethod
    def _unsubscribe(pubsub: Any) -> None:
        with contextlib.suppress(*common.transient()):
            pubsub.close()

    #: what ``idem ls`` says about listing this store (:mod:`.scan`)
    scan_note = SCAN_NOTE

    def scan(self, where: ScanFilter, page_size: int = DEFAULT_PAGE) -> Iterator[list[Record]]:
        """Pages of the records ``where`` selects, by ``SCAN`` (:mod:`idem_redis.scan`)."""
        return scan_pages(self, where, page_size)

    def diagnostics(self) -> dict[str, object]:
        from redis.utils import HIREDIS_AVAILABLE

        with translate("diagnostics", self._budget):
            if self.cluster:
                from redis.cluster import RedisCluster

                info = self.client.info(target_nodes=RedisCluster.RANDOM)
                nodes = len(self.client.get_primaries())
            else:
                info = self.client.info()
                nodes = 1
        return common.diagnostics(self, info, nodes, HIREDIS_AVAILABLE)

    def close(self) -> None:
        if self._owned and self._client is not None:
            self._client.close()
