"""redis-py clients for the two stores, and the time budget every store call runs under.

A store call sets a deadline (:func:`deadline`); the connections of the clients built here
check it before connecting or sending, and shorten each read to the time left. So one call
gives up after its budget (``Config.budget``) whatever redis-py does underneath: its own
retries, reconnects, and a Cluster's slot refresh, which otherwise asks every known node in
turn and waits one full timeout for each that is stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .config import Config

#: monotonic time by which the current store call must be done (0: no deadline)
DEADLINE: ContextVar[float] = ContextVar("idem_redis_deadline", default=0.0)

_SPENT = "the store call's time budget is spent"

if TYPE_CHECKING:
    _Base = Any
else:
    _Base = object


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound the I/O inside the block to ``seconds`` (an enclosing deadline is kept)."""
    if DEADLINE.get():
        yield
        return
    token = DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        DEADLINE.reset(token)


def _left() -> float | None:
    end = DEADLINE.get()
    return end - time.monotonic() if end else None


def _spent() -> Exception:
    from redis.exceptions import TimeoutError

    return TimeoutError(_SPENT)


class _Bounded(_Base):  # type: ignore[misc]
    """Mixed into a redis-py (sync) connection class: I/O within the call's deadline."""

    def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        left = _left()
        if left is not None and left <= 0:
            raise _spent()
        return super().connect_check_health(*args, **kwargs)

    def send_packed_command(self, command: Any, check_health: bool = True) -> Any:
        left = _left()
        if left is not None and left <= 0:
            raise _spent()
        return super().send_packed_command(command, check_health)

    def read_response(self, disable_decoding: bool = False, **kwargs: Any) -> Any:
        left = _left()
        if left is not None:
            if left <= 0:
                self.disconnect()  # a reply may still come: this connection is out of step
                raise _spent()
            own = self.socket_timeout
            if "timeout" not in kwargs and (own is None or left < own):
                kwargs["timeout"] = left
        return super().read_response(disable_decoding, **kwargs)


class _AsyncBounded(_Base):  # type: ignore[misc]
    """The ``redis.asyncio`` twin of :class:`_Bounded`."""

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        left = _left()
        if left is not None and left <= 0:
            raise _spent()
        return await super().connect_check_health(*args, **kwargs)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> Any:
        left = _left()
        if left is not None and left <= 0:
            raise _spent()
        return await super().send_packed_command(command, check_health)

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - redis-py's own signature
        **kwargs: Any,
    ) -> Any:
        left = _left()
        if left is not None:
            if left <= 0:
                await self.disconnect()
                raise _spent()
            own = self.socket_timeout
            if timeout is None and (own is None or left < own):
                # Not through ``timeout=``: redis.asyncio reads an explicit timeout as a
                # pub/sub poll and returns None when it passes.
                try:
                    async with asyncio.timeout(left):
                        return await super().read_response(disable_decoding, None, **kwargs)
                except TimeoutError:
                    await self.disconnect()
                    raise _spent() from None
        return await super().read_response(disable_decoding, timeout, **kwargs)


@functools.cache
def bounded(base: type[Any], aio: bool) -> type[Any]:
    """``base`` (a redis-py connection class) with its I/O held to the call's deadline."""
    mixin = _AsyncBounded if aio else _Bounded
    return type(f"Bounded{base.__name__}", (mixin, base), {})


def _bounded_pool_class(base: type[Any], aio: bool) -> type[Any]:
    """A connection pool class that bounds whatever connection class it is given."""

    def __init__(self: Any, connection_class: type[Any] | None = None, **kwargs: Any) -> None:
        import importlib

        default = importlib.import_module(
            "redis.asyncio.connection" if aio else "redis.connection"
        ).Connection
        chosen: type[Any] = connection_class or default
        base.__init__(self, connection_class=bounded(chosen, aio), **kwargs)  # type: ignore[arg-type]

    return type(f"Bounded{base.__name__}", (base,), {"__init__": __init__})


@functools.cache
def bounded_pool(aio: bool) -> type[Any]:
    import importlib

    base = importlib.import_module("redis.asyncio" if aio else "redis").ConnectionPool
    return _bounded_pool_class(base, aio)


def _timeouts(config: Config) -> dict[str, Any]:
    """Keyword arguments every connection gets, so no single wait exceeds its timeout."""
    kwargs: dict[str, Any] = {
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.connect_timeout,
    }
    if config.pool_size is not None:
        kwargs["max_connections"] = config.pool_size
    return kwargs


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build(config: Config, *, aio: bool) -> Any:
    """A redis-py client (``redis.asyncio`` when ``aio``) for ``config``: bounded timeouts,
    ``retries`` retries, and connections that keep to the call's deadline. Connects lazily
    (the sync cluster client asks the startup nodes for the slots when it is built)."""
    import importlib

    from redis.backoff import ExponentialWithJitterBackoff

    package = "redis.asyncio" if aio else "redis"
    client = importlib.import_module(package)
    connection = importlib.import_module(f"{package}.connection")
    retry = importlib.import_module(f"{package}.retry").Retry(
        ExponentialWithJitterBackoff(base=0.01, cap=0.1), config.retries
    )
    kwargs = {**config.kwargs, **_timeouts(config)}
    if config.kind == "standalone":
        if config.path:
            base = connection.UnixDomainSocketConnection
            kwargs["path"] = config.path
        else:
            base = connection.SSLConnection if config.tls else connection.Connection
            kwargs["host"], kwargs["port"] = config.nodes[0]
        pool = bounded_pool(aio)(connection_class=base, retry=retry, **kwargs)
        redis = client.Redis(connection_pool=pool, retry=retry)
        redis.auto_close_connection_pool = True  # the pool is the client's own
        return redis
    if config.kind == "cluster":
        cluster = importlib.import_module(f"{package}.cluster")
        if aio:
            base = connection.SSLConnection if config.tls else connection.Connection
            redis = cluster.RedisCluster(
                startup_nodes=[
                    cluster.ClusterNode(h, p, connection_class=bounded(base, True))
                    for h, p in config.nodes
                ],
                retry=retry,
                ssl=config.tls,
                **kwargs,
            )
            # Nodes discovered later are made with these arguments.
            redis.nodes_manager.connection_kwargs["connection_class"] = bounded(base, True)
            for node in redis.nodes_manager.startup_nodes.values():
                node.connection_class = bounded(base, True)
            return redis
        # The sync client builds each node's pool with ``connection_pool_class`` only for a
        # client made from a URL: the first node is given that way, the rest as nodes.
        (first_host, first_port), *rest = config.nodes
        scheme = "rediss" if config.tls else "redis"
        return cluster.RedisCluster(
            url=f"{scheme}://{_host(first_host)}:{first_port}",
            startup_nodes=[cluster.ClusterNode(h, p) for h, p in rest],
            connection_pool_class=bounded_pool(False),
            retry=retry,
            **kwargs,
        )
    sentinels = importlib.import_module(f"{package}.sentinel")
    # the sentinels' clients get our retry too: redis-py's default backs off for seconds
    own = {**config.sentinel_kwargs, **_timeouts(config), "retry": retry}
    sentinel = sentinels.Sentinel(list(config.nodes), sentinel_kwargs=own, retry=retry, **kwargs)
    for each in sentinel.sentinels:  # one client per sentinel, not connected yet
        pool = each.connection_pool
        pool.connection_class = bounded(pool.connection_class, aio)
    managed = (
        sentinels.SentinelManagedSSLConnection
        if config.tls
        else sentinels.SentinelManagedConnection
    )
    return sentinel.master_for(config.service, connection_class=bounded(managed, aio))


def connections(client: Any) -> Iterator[Any]:
    """Every connection a ``redis.asyncio`` client holds, in its pool or cluster nodes."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        yield from list(getattr(pool, "_available_connections", ()))
        yield from list(getattr(pool, "_in_use_connections", ()))
    manager = getattr(client, "nodes_manager", None)
    if manager is not None:
        nodes = {
            id(node): node
            for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]
        }
        for node in nodes.values():
            yield from list(getattr(node, "_connections", ()))


def abandon(client: Any) -> None:
    """Let go of a ``redis.asyncio`` client nobody will use again, without a word: its store
    was collected, or its event loop has closed. Nothing is awaited.

    On a loop still open, each transport is closed the usual way (the loop finishes the job on
    its next turn). A closed loop runs nothing, so there the transports cannot close
    themselves: each socket is closed at once and the transport marked done. Left alone, each
    connection, transport and the cluster client warn when collected (and the sockets stay
    open until then). This reaches into asyncio's and redis-py's private attributes, each
    looked up defensively: a version without them just gets the usual warnings.
    """
    for conn in connections(client):
        writer = getattr(conn, "_writer", None)
        if writer is None:
            continue
        transport = writer.transport
        try:
            transport.close()
        except RuntimeError:  # its loop is closed: marked closing, the rest is ours to do
            sock = getattr(transport, "_sock", None)
            if sock is not None:
                sock.close()
                with contextlib.suppress(AttributeError):
                    transport._sock = None
        conn._reader = conn._writer = None
    if hasattr(client, "nodes_manager"):
        client._initialize = True  # the cluster client: "closed", so it does not warn
