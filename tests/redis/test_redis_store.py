"""Redis-specific behaviour: round trips counted by the server, waking waiters, fork safety,
URLs, corrupt values, WAIT for replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from idem_redis.common import parse
from idem_redis.scripts import vars_of
from redis_servers import RedisCluster, RedisServer, with_params

from idem_core import ClaimOutcome, ClaimRequest, CorruptRecord
from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.registry import open_async_store, open_store


def req(key: str, attempt: str | None = None, lease: float = 30.0) -> ClaimRequest:
    return ClaimRequest(
        key=key, fingerprint="f" * 32, attempt=attempt or uuid.uuid4().hex, lease=lease, ttl=60
    )


# Commands the scripts run inside the server: INFO counts them too, but they cost no trip.
_IN_SCRIPTS = {"time", "get", "set", "append", "type", "hgetall", "del", "publish"}
_IN_SCRIPTS |= {"spublish", "info"}


class Counter:
    """Commands that clients sent to servers only this test talks to, from INFO commandstats."""

    def __init__(self, ports: list[int]) -> None:
        self.admins = [redis.Redis(port=p, protocol=2) for p in ports]
        for a in self.admins:
            a.ping()  # connect now, so the handshake is not counted

    def _sent(self) -> int:
        total = 0
        for a in self.admins:
            for name, stats in a.info("commandstats").items():
                command = name.removeprefix("cmdstat_").split("|")[0]
                if command not in _IN_SCRIPTS:
                    total += int(stats["calls"])
        return total

    def commands(self, fn: Any) -> int:
        before = self._sent()
        fn()
        return self._sent() - before

    def close(self) -> None:
        for a in self.admins:
            a.close()


@pytest.fixture(params=["standalone", "cluster"])
def counted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("cluster")
        yield cluster.url + "?prefix=rt:", cluster.ports
        return
    server: RedisServer = request.getfixturevalue("own_server")
    yield server.url + "?prefix=rt:", [server.port]


def test_round_trips_counted_by_the_server(counted: tuple[str, list[int]]) -> None:
    url, ports = counted
    store = open_store(url)
    counter = Counter(ports)
    for admin in counter.admins:  # as after the first call on each server
        for script in vars_of(store.scripts):
            admin.script_load(script.text)
    store.claim_many([req(uuid.uuid4().hex) for _ in range(20)])  # connects to every node
    warm = store.claim(req("warm-" + uuid.uuid4().hex))
    store.complete(warm.record.key, warm.fence, b"x", 60)
    try:
        key = uuid.uuid4().hex
        state: dict[str, Any] = {}

        def first_call() -> None:
            res = store.claim(req(key))
            assert res.outcome is ClaimOutcome.CLAIMED
            state["done"] = store.complete(key, res.fence, b"result", 60)

        def replay() -> None:
            res = store.claim(req(key))
            assert res.outcome is ClaimOutcome.COMPLETED
            assert res.record.result == b"result"

        held = uuid.uuid4().hex
        store.claim(req(held))

        def conflict() -> None:
            assert store.claim(req(held)).outcome is ClaimOutcome.IN_PROGRESS

        assert counter.commands(first_call) == 2
        assert counter.commands(replay) == 1
        assert counter.commands(conflict) == 1
        keys = [uuid.uuid4().hex for _ in range(20)]
        many = counter.commands(lambda: store.claim_many([req(k) for k in keys]))
        assert many == 20  # one EVALSHA each, sent as one pipeline per server
    finally:
        counter.close()
        store.close()


def test_claim_many_outcomes_and_order(redis_url: str, cluster_url: str) -> None:
    for url in (redis_url, cluster_url):
        store = open_store(url)
        try:
            keys = [uuid.uuid4().hex for _ in range(30)]
            done = store.claim(req(keys[3]))
            store.complete(keys[3], done.fence, b"r", 60)
            store.claim(req(keys[5]))
            results = store.claim_many([req(k) for k in keys])
            assert [r.record.key for r in results] == keys
            assert results[3].outcome is ClaimOutcome.COMPLETED
            assert results[5].outcome is ClaimOutcome.IN_PROGRESS
            assert sum(r.outcome is ClaimOutcome.CLAIMED for r in results) == 28
        finally:
            store.close()


@pytest.mark.parametrize("how", ["complete", "release"])
@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_wait_for_change_wakes_promptly(
    how: str, where: str, redis_url: str, cluster_url: str
) -> None:
    store = open_store(redis_url if where == "standalone" else cluster_url)
    try:
        key = uuid.uuid4().hex
        res = store.claim(req(key, lease=30))

        def change() -> None:
            time.sleep(0.3)
            if how == "complete":
                store.complete(key, res.fence, b"r", 60)
            else:
                store.release(key, res.fence)

        t = threading.Thread(target=change)
        start = time.monotonic()
        t.start()
        store.wait_for_change(key, res.fence, 10)
        waited = time.monotonic() - start
        t.join()
        # woken by the message, not by the once-a-second re-read nor the timeout
        assert 0.25 <= waited < 0.9, waited
        start = time.monotonic()
        store.wait_for_change(key, res.fence, 10)  # no longer held: returns at once
        assert time.monotonic() - start < 0.5
    finally:
        store.close()


@pytest.mark.parametrize("where", ["standalone", "cluster"])
async def test_async_wait_for_change_wakes_promptly(
    where: str, redis_url: str, cluster_url: str
) -> None:
    store = open_async_store(redis_url if where == "standalone" else cluster_url)
    try:
        key = uuid.uuid4().hex
        res = await store.claim(req(key, lease=30))

        async def change() -> None:
            await asyncio.sleep(0.3)
            await store.complete(key, res.fence, b"r", 60)

        start = time.monotonic()
        task = asyncio.create_task(change())
        await store.wait_for_change(key, res.fence, 10)
        waited = time.monotonic() - start
        await task
        assert 0.25 <= waited < 0.9, waited
    finally:
        await store.close()


def test_wait_for_change_returns_when_the_lease_lapses(redis_url: str) -> None:
    store = open_store(redis_url)
    try:
        key = uuid.uuid4().hex
        res = store.claim(req(key, lease=0.4))
        start = time.monotonic()
        store.wait_for_change(key, res.fence, 10)
        assert 0.3 <= time.monotonic() - start < 1.0
    finally:
        store.close()


def _child_claims(url: str, store: Any, key: str) -> int:
    """In a forked child: the inherited store must work on its own connections."""
    try:
        if asyncio.iscoroutinefunction(store.claim):

            async def run() -> bool:
                ok = (await store.claim(req(key))).outcome is ClaimOutcome.CLAIMED
                await store.close()
                return ok

            return 0 if asyncio.run(run()) else 1
        return 0 if store.claim(req(key)).outcome is ClaimOutcome.CLAIMED else 1
    except BaseException:
        return 2


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_fork_child_opens_its_own_connections(where: str, redis_url: str, cluster_url: str) -> None:
    url = redis_url if where == "standalone" else cluster_url
    store = open_store(url)
    astore = open_async_store(url)

    async def use_async(key: str) -> None:
        await astore.claim(req(key))

    try:
        store.get("warm")  # the parent holds a pooled connection
        loop = asyncio.new_event_loop()
        loop.run_until_complete(use_async(uuid.uuid4().hex))
        for s in (store, astore):
            key = uuid.uuid4().hex
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child exits at once
                os._exit(_child_claims(url, s, key))
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            # the parent's connections were not disturbed by the child
            assert store.get(key) is not None
        loop.run_until_complete(use_async(uuid.uuid4().hex))
        loop.run_until_complete(astore.close())
        loop.close()
    finally:
        store.close()


def test_urls() -> None:
    c = parse("redis://:pw@localhost:6380/3?prefix=app:&timeout=0.5&pool_size=7&retries=0")
    assert (c.kind, c.prefix, c.timeout, c.connect_timeout, c.pool_size, c.retries) == (
        "standalone",
        "app:",
        0.5,
        0.5,
        7,
        0,
    )
    assert c.nodes == (("localhost", 6380),) and c.kwargs == {"password": "pw", "db": 3}
    c = parse("redis+cluster://a:7000,b:7001?prefix=x:&wait_replicas=1&wait_timeout_ms=50")
    assert c.kind == "cluster" and c.nodes == (("a", 7000), ("b", 7001))
    assert (c.wait_replicas, c.wait_timeout_ms) == (1, 50)
    c = parse("redis+sentinel://:secret@s1:26379,s2/mymaster/2?sentinel_password=sp")
    assert c.kind == "sentinel" and c.service == "mymaster"
    assert c.nodes == (("s1", 26379), ("s2", 26379))
    assert c.kwargs["db"] == 2 and c.kwargs["password"] == "secret"
    assert c.sentinel_kwargs == {"password": "sp"}
    c = parse("unix:///tmp/redis.sock?db=1")
    assert (c.path, c.kwargs) == ("/tmp/redis.sock", {"db": 1})
    for bad in (
        "redis+sentinel://s1:26379",
        "redis+cluster://a:7000/2",
        "redis://h?timeout=-1",
        "redis://h?pool_size=zero",
        "redis://h?ssl=true",
    ):
        with pytest.raises(ConfigurationError):
            parse(bad)


def test_given_client_is_used_and_not_closed(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url.split("?")[0])
    prefix = f"given-{uuid.uuid4().hex}:"
    store = open_store(f"redis://ignored?prefix={prefix}", client=client)
    key = uuid.uuid4().hex
    store.claim(req(key))
    assert client.exists(prefix + key) == 1
    store.close()
    assert client.ping()
    client.delete(prefix + key)
    with pytest.raises(ConfigurationError):
        open_store("redis://", client=redis.Redis(decode_responses=True))
    with pytest.raises(ConfigurationError):
        open_store("redis://", client=object())
    client.close()


def test_corrupt_values_raise_corrupt_record(redis_url: str) -> None:
    store = open_store(redis_url)
    raw = redis.Redis.from_url(redis_url.split("?")[0])
    try:
        key = uuid.uuid4().hex
        full = store.prefix + key
        raw.set(full, b"not a hash")
        with pytest.raises(CorruptRecord):
            store.claim(req(key))
        raw.delete(full)
        raw.hset(full, mapping={"s": "i", "f": "12", "l": "soon", "e": "later"})
        with pytest.raises(CorruptRecord):
            store.get(key)
        raw.hset(full, mapping={"s": "?"})
        with pytest.raises(CorruptRecord):
            store.complete(key, 12, b"", 60)
        assert raw.exists(full) == 1  # left untouched
        raw.delete(full)
    finally:
        raw.close()
        store.close()


def test_unreachable_server_is_store_unavailable() -> None:
    store = open_store("redis://127.0.0.1:1/0?timeout=0.5&retries=0")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.claim(req("k"))
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    assert time.monotonic() - start < 2
    store.close()


def test_diagnostics(redis_url: str, cluster_url: str) -> None:
    for url, kind in ((redis_url, "standalone"), (cluster_url, "cluster")):
        store = open_store(url)
        try:
            facts = store.diagnostics()
            assert facts["kind"] == kind
            assert str(facts["server_version"]).split(".")[0] >= "7"
            assert abs(store.now() - time.time_ns() // 1000) < 5_000_000
            assert not hasattr(store, "purge_expired")  # Redis expires keys itself
        finally:
            store.close()


def test_wait_replicas(tmp_path: Path, own_server: RedisServer) -> None:
    replica = RedisServer(
        tmp_path / "replica", None, "--replicaof", "127.0.0.1", str(own_server.port)
    )
    replica.start()
    try:
        admin = redis.Redis(port=replica.port)
        deadline = time.monotonic() + 10
        while admin.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.1)
        admin.close()
        store = open_store(with_params(own_server.url, wait_replicas=1, wait_timeout_ms=2000))
        key = uuid.uuid4().hex
        res = store.claim(req(key))
        store.complete(key, res.fence, b"r", 60)
        copy = open_store(replica.url)
        assert copy.get(key) is not None  # on the replica before complete returned
        copy.close()
        store.close()
        strict = open_store(with_params(own_server.url, wait_replicas=2, wait_timeout_ms=100))
        with pytest.raises(StoreUnavailable, match="replicas"):
            strict.claim(req(uuid.uuid4().hex))
        strict.close()
    finally:
        replica.stop()


async def test_cancelled_calls_leave_no_connection_out_of_step(redis_url: str) -> None:
    """A task cancelled while its script is in flight must not leave the reply on a pooled
    connection for the next call to read."""
    store = open_async_store(f"{redis_url}?prefix=cancel-{uuid.uuid4().hex}:")
    try:
        for i in range(200):
            task = asyncio.ensure_future(store.claim(req(f"victim-{i}")))
            for _ in range(i % 4):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            key = f"check-{i}"
            res = await store.claim(req(key))
            assert res.record.key == key
            assert res.outcome is ClaimOutcome.CLAIMED
    finally:
        await store.close()
