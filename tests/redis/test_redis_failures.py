"""Failures and limits, the same for both twins: a Cluster with every node down or stalled,
an error reply for one item of a pipeline, checked URLs, the result size limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from idem_redis.common import parse
from redis_servers import RedisCluster, RedisServer, redis_binaries, with_params
from support import server_missing

from idem_core import ClaimOutcome, ClaimRequest, Status
from idem_core.errors import ConfigurationError, ResultNotSerializable, StoreUnavailable
from idem_core.registry import open_async_store, open_store

TIMEOUT = 0.5


def req(key: str, attempt: str | None = None) -> ClaimRequest:
    return ClaimRequest(
        key=key, fingerprint="f" * 32, attempt=attempt or uuid.uuid4().hex, lease=30, ttl=60
    )


class Twins:
    """A sync and an async store on one URL, the async one driven on a loop of its own, so
    a test states each step once and runs it on both."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.sync = open_store(url)
        self.aio = open_async_store(url)

    def each(self, op: Callable[[Any], Any]) -> Iterator[tuple[str, Callable[[], Any]]]:
        """(name, call) for the sync store, then the async one."""
        yield "sync", lambda: op(self.sync)

        def run_async() -> Any:
            async def go() -> Any:
                return await op(self.aio)

            return self.loop.run_until_complete(go())

        yield "async", run_async

    def close(self) -> None:
        self.sync.close()
        self.loop.run_until_complete(self.aio.close())
        self.loop.close()


def timed_unavailable(call: Callable[[], Any]) -> tuple[StoreUnavailable, float]:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        call()
    return info.value, time.monotonic() - start


def assert_driver_cause(error: StoreUnavailable) -> None:
    cause = error.__cause__
    assert isinstance(cause, redis.exceptions.RedisError | redis.exceptions.RedisClusterException)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A three-master Cluster only this test uses: it stops or freezes every node."""
    missing = redis_binaries()
    if missing:
        server_missing("Redis Cluster", missing)
    nodes = RedisCluster(tmp_path / "cluster")
    try:
        nodes.start()
    except Exception as exc:
        nodes.stop()
        server_missing("Redis Cluster", f"could not be started: {exc}")
    yield nodes
    for server in nodes.servers:
        if server.proc is not None:
            server.resume()
    nodes.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["stalled", "down"])
def test_cluster_with_every_node_out_is_store_unavailable_in_bounded_time(
    fault: str, own_cluster: RedisCluster
) -> None:
    """Every node frozen (SIGSTOP: connections open, no reply) or stopped: each call, on an
    open store and on a store's first use, sync and async, is StoreUnavailable within the
    call's budget. Frozen, redis-py alone waits one timeout for the command and one more per
    node while it refreshes the slots (4 x timeout here, more with more nodes)."""
    url = with_params(own_cluster.url, prefix=f"down-{uuid.uuid4().hex}:", timeout=TIMEOUT)
    url = with_params(url, retries=0)  # budget: one timeout
    open_twins = Twins(url)
    try:
        for _, call in open_twins.each(lambda s: s.claim(req("warm"))):
            call()
        for server in own_cluster.servers:
            if fault == "stalled":
                server.pause()
            else:
                server.kill()
        fresh = Twins(url)
        operations: list[tuple[str, Twins, Callable[[Any], Any]]] = [
            ("claim", open_twins, lambda s: s.claim(req("k"))),
            ("claim_many", open_twins, lambda s: s.claim_many([req("a"), req("b")])),
            ("complete", open_twins, lambda s: s.complete("warm", 1, b"r", 60)),
            ("get", open_twins, lambda s: s.get("warm")),
            ("first use", fresh, lambda s: s.claim(req("k"))),
        ]
        for name, twins, op in operations:
            for twin, call in twins.each(op):
                error, elapsed = timed_unavailable(call)
                assert_driver_cause(error)
                # one timeout of budget, and slack for the machine (2 CPUs, shared)
                assert elapsed < 2 * TIMEOUT + 0.5, (name, twin, elapsed)
        for twin, call in open_twins.each(lambda s: s.wait_for_change("k", 1, 30)):
            error, elapsed = timed_unavailable(call)
            assert_driver_cause(error)
            # subscribing and the first read each have one budget
            assert elapsed < 3 * TIMEOUT + 0.5, ("wait_for_change", twin, elapsed)
        fresh.close()
        if fault == "stalled":
            for server in own_cluster.servers:
                server.resume()
            for _, call in open_twins.each(lambda s: s.get("warm")):
                deadline = time.monotonic() + 20
                while True:  # the client finds the nodes again on its own
                    try:
                        assert call() is not None
                        break
                    except StoreUnavailable:
                        assert time.monotonic() < deadline
                        time.sleep(0.1)
    finally:
        open_twins.close()


def test_pipeline_item_error_is_store_unavailable_in_both_twins(own_server: RedisServer) -> None:
    """A server turned replica answers each write with READONLY. One item of claim_many failing
    so is the same StoreUnavailable as a single claim failing so, in both twins (the sync one
    used to decode the error reply as a record: CorruptRecord)."""
    twins = Twins(with_params(own_server.url, prefix="ro:"))
    admin = redis.Redis(port=own_server.port)
    try:
        fresh = [req(uuid.uuid4().hex) for _ in range(4)]
        for _, call in twins.each(
            lambda s: s.claim_many(fresh[:2] if s is twins.sync else fresh[2:])
        ):
            assert all(r.outcome is ClaimOutcome.CLAIMED for r in call())
        admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # a primary that is not there
        for op in (
            lambda s: s.claim_many([req("x2"), req("y2")]),
            lambda s: s.claim(req("z")),
        ):
            for twin, call in twins.each(op):
                with pytest.raises(StoreUnavailable, match="read only replica") as info:
                    call()
                assert isinstance(info.value.__cause__, redis.exceptions.ResponseError), twin
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")
        admin.close()
        twins.close()


BAD_URLS = [
    ("redis://127.0.0.1:6379/0?colour=blue", "colour"),
    ("redis://127.0.0.1:6379/0?decode_responses=true", "decode_responses"),
    ("redis://127.0.0.1:6379/0?socket_timeout=1", "socket_timeout"),
    ("redis://127.0.0.1:6379/0?max_connections=3", "max_connections"),
    ("redis://127.0.0.1:notaport/0", "port"),
    ("redis://127.0.0.1:99999/0", "port"),
    ("redis://127.0.0.1/notadb", "database"),
    ("redis://127.0.0.1/-1", "database"),
    ("redis://127.0.0.1/0/extra", "path"),
    ("redis://127.0.0.1/1?db=2", "database"),
    ("redis://127.0.0.1?timeout=-1", "timeout"),
    ("redis://127.0.0.1?timeout=nan", "timeout"),
    ("redis://127.0.0.1?timeout=inf", "timeout"),
    ("redis://127.0.0.1?connect_timeout=0", "connect_timeout"),
    ("redis://127.0.0.1?pool_size=0", "pool_size"),
    ("redis://127.0.0.1?pool_size=many", "pool_size"),
    ("redis://127.0.0.1?retries=-1", "retries"),
    ("redis://127.0.0.1?max_result_size=0", "max_result_size"),
    ("redis://127.0.0.1?max_result_size=999999999999", "max_result_size"),
    ("redis://127.0.0.1?protocol=4", "protocol"),
    ("redis://127.0.0.1?health_check_interval=soon", "health_check_interval"),
    ("redis://127.0.0.1?timeout=1&timeout=2", "timeout"),
    ("redis://127.0.0.1?ssl_ca_certs=/x.pem", "ssl_"),
    ("redis://a:1,b:2/0", "several hosts"),
    ("unix:///tmp/r.sock?socket_keepalive=true", "socket_keepalive"),
    ("redis+cluster://a:7000,b:x", "port"),
    ("redis+cluster://a:7000?colour=blue", "colour"),
    ("redis+cluster://a:7000?health_check_interval=5", "health_check_interval"),
    ("redis+cluster://a:7000?db=3", "database 0"),
    ("redis+sentinel://s1:26379/mymaster/notadb", "database"),
    ("redis+sentinel://s1:26379/mymaster?ssl=maybe", "ssl"),
]


@pytest.mark.parametrize(("url", "named"), BAD_URLS)
def test_bad_urls_are_configuration_errors_naming_the_parameter(url: str, named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        parse(url)
    with pytest.raises(ConfigurationError, match=named):
        open_store(url)  # at construction, before any connection
    with pytest.raises(ConfigurationError, match=named):
        open_async_store(url)


def test_known_connection_settings_reach_redis_py(redis_url: str) -> None:
    name = f"idem{uuid.uuid4().hex[:8]}"
    url = with_params(
        redis_url,
        client_name=name,
        health_check_interval=10,
        socket_keepalive="true",
        protocol=3,
    )
    twins = Twins(url)
    admin = redis.Redis.from_url(redis_url.split("?")[0])
    try:
        for _, call in twins.each(lambda s: s.claim(req(uuid.uuid4().hex))):
            assert call().outcome is ClaimOutcome.CLAIMED
        clients = [c for c in admin.client_list() if c.get("name") == name]
        assert clients and all(c.get("resp") == "3" for c in clients)
    finally:
        admin.close()
        twins.close()


def test_results_over_max_result_size_are_refused_before_anything_is_written(
    redis_url: str,
) -> None:
    twins = Twins(with_params(redis_url, max_result_size=100))
    try:
        assert twins.sync.max_result_size == twins.aio.max_result_size == 100
        for twin, call in twins.each(lambda s: _oversize(s)):
            record = call()
            assert record.status is Status.COMPLETED and record.result == b"r" * 100, twin
    finally:
        twins.close()
    default = open_store(redis_url)
    try:
        assert default.max_result_size == 512 * 1024 * 1024
    finally:
        default.close()


def _oversize(store: Any) -> Any:
    """Complete with 101 bytes (refused, record untouched), then with 100 (stored)."""
    if asyncio.iscoroutinefunction(store.claim):
        return _aoversize(store)
    key = uuid.uuid4().hex
    res = store.claim(req(key))
    with pytest.raises(ResultNotSerializable, match="max_result_size"):
        store.complete(key, res.fence, b"r" * 101, 60)
    held = store.get(key)
    assert held is not None and held.status is Status.IN_PROGRESS and held.fence == res.fence
    return store.complete(key, res.fence, b"r" * 100, 60)


async def _aoversize(store: Any) -> Any:
    key = uuid.uuid4().hex
    res = await store.claim(req(key))
    with pytest.raises(ResultNotSerializable, match="max_result_size"):
        await store.complete(key, res.fence, b"r" * 101, 60)
    held = await store.get(key)
    assert held is not None and held.status is Status.IN_PROGRESS and held.fence == res.fence
    return await store.complete(key, res.fence, b"r" * 100, 60)


def test_default_max_result_size_is_the_servers_bulk_limit(own_server: RedisServer) -> None:
    """The store's documented limit is Redis's default proto-max-bulk-len."""
    admin = redis.Redis(port=own_server.port)
    store = open_store(own_server.url)
    try:
        limit = int(admin.config_get("proto-max-bulk-len")["proto-max-bulk-len"])
        assert store.max_result_size == limit
    finally:
        admin.close()
        store.close()


class Sentinel(RedisServer):
    """One sentinel watching ``master`` as service ``mymaster`` (quorum 1, no failover soon)."""

    def __init__(self, workdir: Path, master: RedisServer) -> None:
        super().__init__(workdir)
        conf = workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 60000\n"
        )
        self.conf = conf

    def start(self, timeout: float = 10.0) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            ["redis-server", str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5) as probe:
                    if probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"):
                        return
            except redis.exceptions.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the sentinel did not start")


@pytest.mark.slow
def test_sentinel_calls_keep_to_the_budget(own_server: RedisServer, tmp_path: Path) -> None:
    """Through a sentinel, a frozen master is StoreUnavailable within the budget, sync and
    async, as is a frozen sentinel for a store on its first call."""
    sentinel = Sentinel(tmp_path / "sentinel", own_server)
    try:
        sentinel.start()
    except Exception as exc:
        sentinel.stop()
        server_missing("redis-sentinel", f"could not be started: {exc}")
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster?timeout={TIMEOUT}&retries=1"
    twins = Twins(with_params(url, prefix=f"sentinel-{uuid.uuid4().hex}:"))
    budget = 2 * TIMEOUT
    try:
        for _, call in twins.each(lambda s: s.claim(req(uuid.uuid4().hex))):
            assert call().outcome is ClaimOutcome.CLAIMED
        own_server.pause()
        try:
            for twin, call in twins.each(lambda s: s.claim(req("k"))):
                error, elapsed = timed_unavailable(call)
                assert_driver_cause(error)
                assert elapsed < budget + TIMEOUT + 0.5, (twin, elapsed, repr(error.__cause__))
        finally:
            own_server.resume()
        sentinel.pause()
        try:
            fresh = Twins(url)
            for twin, call in fresh.each(lambda s: s.claim(req("k"))):
                error, elapsed = timed_unavailable(call)
                assert_driver_cause(error)
                assert elapsed < budget + TIMEOUT + 0.5, (twin, elapsed, repr(error.__cause__))
            fresh.close()
        finally:
            sentinel.resume()
    finally:
        twins.close()
        sentinel.stop()
