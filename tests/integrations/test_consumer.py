"""Queue consumers: the wrapper's ack/retry contract, and a real RabbitMQ (pika) consumer that
receives duplicates and redeliveries and applies each message once."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from support import port_open, server_missing

from idem_core import (
    AlreadyInProgress,
    ConfigurationError,
    Idempotency,
    KeyMissing,
    PayloadMismatch,
)

RABBIT = ("127.0.0.1", 5672)


# -- the wrapper's contract on every store ---------------------------------------------------


def test_consumer_applies_once_and_retries_after_failure(idem: Idempotency) -> None:
    ledger: Counter[str] = Counter()
    attempts: Counter[str] = Counter()

    @idem.consumer(dedup_id=lambda m: m["id"])
    def apply(message: dict[str, Any]) -> int:
        attempts[message["id"]] += 1
        if message.get("flaky") and attempts[message["id"]] == 1:
            raise ConnectionError("downstream")
        ledger[message["account"]] += message["amount"]
        return ledger[message["account"]]

    assert apply({"id": "m1", "account": "a", "amount": 5}) == 5
    assert apply({"id": "m1", "account": "a", "amount": 5}) == 5  # replayed: ack, no effect
    with pytest.raises(ConnectionError):
        apply({"id": "m2", "account": "a", "amount": 1, "flaky": True})  # nack + requeue
    assert apply({"id": "m2", "account": "a", "amount": 1, "flaky": True}) == 6
    assert ledger == {"a": 6}


# -- contract details (memory://) ------------------------------------------------------------


def test_in_progress_and_mismatch(memory_idem: Idempotency) -> None:
    started, proceed = threading.Event(), threading.Event()

    @memory_idem.consumer(dedup_id=lambda m: m["id"], payload=lambda m: m["amount"])
    def apply(message: dict[str, Any]) -> str:
        started.set()
        proceed.wait(5)
        return "done"

    t = threading.Thread(target=apply, args=({"id": "x", "amount": 1},))
    t.start()
    started.wait(5)
    with pytest.raises(AlreadyInProgress):
        apply({"id": "x", "amount": 1})
    proceed.set()
    t.join()
    with pytest.raises(PayloadMismatch):
        apply({"id": "x", "amount": 2})


async def test_async_consumer(memory_idem: Idempotency) -> None:
    runs: list[str] = []

    @memory_idem.consumer(dedup_id=lambda m: m["id"], name="payments")
    async def apply(message: dict[str, Any]) -> str:
        runs.append(message["id"])
        await asyncio.sleep(0.05)
        return f"applied {message['id']}"

    results = await asyncio.gather(*(apply({"id": "a"}) for _ in range(5)), return_exceptions=True)
    assert runs == ["a"]
    assert results.count("applied a") >= 1
    assert all(r == "applied a" or isinstance(r, AlreadyInProgress) for r in results)
    assert await apply({"id": "a"}) == "applied a"


# -- a real RabbitMQ -------------------------------------------------------------------------


@pytest.fixture
def rabbit_queue() -> Iterator[str]:
    if not port_open(*RABBIT):
        server_missing("RabbitMQ", f"nothing listens on {RABBIT[0]}:{RABBIT[1]}")
    import pika

    name = f"idem-test-{uuid.uuid4().hex[:10]}"
    conn = pika.BlockingConnection(pika.ConnectionParameters(*RABBIT))
    conn.channel().queue_declare(name, durable=False)
    yield name
    conn.channel().queue_delete(name)
    conn.close()


def consume(
    queue: str, handle: Any, stop: threading.Event, fail_first: set[str], lock: threading.Lock
) -> None:
    """A consumer loop as one writes it with pika: ack after the idempotent handler returns,
    nack+requeue when it raises (AlreadyInProgress included), reject mismatches."""
    import pika

    conn = pika.BlockingConnection(pika.ConnectionParameters(*RABBIT))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=5)
    try:
        for method, props, body in channel.consume(queue, inactivity_timeout=0.1):
            if stop.is_set():
                break
            if method is None:
                continue
            try:
                with lock:
                    crash = props.message_id in fail_first
                    fail_first.discard(props.message_id)
                if crash:
                    raise ConnectionError("simulated failure before applying")
                handle(props, body)
            except PayloadMismatch:
                channel.basic_reject(method.delivery_tag, requeue=False)
            except Exception:
                channel.basic_nack(method.delivery_tag, requeue=True)
            else:
                channel.basic_ack(method.delivery_tag)
        channel.cancel()
    finally:
        conn.close()


def test_rabbitmq_consumers_apply_each_message_once(rabbit_queue: str, redis_url: str) -> None:
    import pika

    idem = Idempotency.from_url(redis_url, namespace=f"t{uuid.uuid4().hex[:12]}", lease=5)
    ledger: Counter[str] = Counter()
    applied: Counter[str] = Counter()
    lock = threading.Lock()

    @idem.consumer(dedup_id=lambda props: props.message_id)
    def handle(props: Any, body: bytes) -> None:
        with lock:
            applied[props.message_id] += 1
            account, amount = body.decode().split(":")
            ledger[account] += int(amount)

    conn = pika.BlockingConnection(pika.ConnectionParameters(*RABBIT))
    channel = conn.channel()
    expected: Counter[str] = Counter()
    ids = []
    for i in range(40):
        mid = f"msg-{i}"
        ids.append(mid)
        account = f"acct-{i % 4}"
        expected[account] += i
        # The producer retried: each message is published up to three times.
        for _ in range(1 + i % 3):
            channel.basic_publish(
                "",
                rabbit_queue,
                f"{account}:{i}".encode(),
                pika.BasicProperties(message_id=mid),
            )
    conn.close()

    stop = threading.Event()
    fail_first = set(ids[::5])  # these fail on first delivery and come back requeued
    workers = [
        threading.Thread(target=consume, args=(rabbit_queue, handle, stop, fail_first, lock))
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    try:
        deadline = threading.Event()
        for _ in range(300):
            with lock:
                if sum(applied.values()) >= len(ids) and not fail_first:
                    break
            deadline.wait(0.05)
        # Let the remaining duplicates drain, then stop.
        check = pika.BlockingConnection(pika.ConnectionParameters(*RABBIT))
        for _ in range(200):
            depth = check.channel().queue_declare(rabbit_queue, passive=True)
            if depth.method.message_count == 0:
                break
            deadline.wait(0.05)
        check.close()
    finally:
        stop.set()
        for w in workers:
            w.join(10)
        idem.close()
    assert applied == dict.fromkeys(ids, 1)
    assert ledger == expected


# -- messages without an id ------------------------------------------------------------------


@pytest.mark.parametrize("missing", [None, "", KeyError("id")])
def test_a_message_without_an_id_is_refused_not_keyed_none(
    memory_idem: Idempotency, missing: Any
) -> None:
    applied: list[str] = []

    def dedup(message: dict[str, Any]) -> Any:
        if isinstance(missing, Exception):
            raise missing
        return missing

    @memory_idem.consumer(dedup_id=dedup)
    def apply(message: dict[str, Any]) -> str:
        applied.append(message["body"])
        return message["body"]

    @memory_idem.consumer(dedup_id=dedup)
    async def aapply(message: dict[str, Any]) -> str:
        applied.append(message["body"])
        return message["body"]

    for body in ("first", "second"):
        with pytest.raises(KeyMissing, match="no dedup id"):
            apply({"body": body})
        with pytest.raises(KeyMissing, match="no dedup id"):
            asyncio.run(aapply({"body": body}))
    assert applied == []  # refused before the handler runs: nothing applied, nothing acked


def test_on_missing_id_run_processes_without_idempotency(memory_idem: Idempotency) -> None:
    applied: list[str] = []

    @memory_idem.consumer(dedup_id=lambda m: m.get("id"), on_missing_id="run")
    def apply(message: dict[str, Any]) -> str:
        applied.append(message["body"])
        return message["body"]

    assert [apply({"body": "a"}), apply({"body": "b"}), apply({"body": "a"})] == ["a", "b", "a"]
    assert apply({"id": "x", "body": "c"}) == apply({"id": "x", "body": "c"})
    assert applied == ["a", "b", "a", "c"]
    with pytest.raises(ConfigurationError):
        memory_idem.consumer(dedup_id=lambda m: m, on_missing_id="skip")


def test_rabbitmq_messages_without_message_id_are_never_lost(
    rabbit_queue: str, redis_url: str
) -> None:
    """pika's default ``BasicProperties`` carry no ``message_id``: before, the first such
    message was applied under the key ``"None"`` and every later one was acknowledged as its
    duplicate without running. Now each is refused (``KeyMissing``) and dead-lettered, and
    ``on_missing_id="run"`` applies every one of them."""
    import pika

    idem = Idempotency.from_url(redis_url, namespace=f"t{uuid.uuid4().hex[:12]}", lease=5)
    dead = f"{rabbit_queue}-dead"
    conn = pika.BlockingConnection(pika.ConnectionParameters(*RABBIT))
    channel = conn.channel()
    channel.queue_declare(dead, durable=False)
    work = f"{rabbit_queue}-work"
    channel.queue_declare(
        work,
        durable=False,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead},
    )
    try:
        for mode in ("raise", "run"):
            applied: list[bytes] = []

            options = {} if mode == "raise" else {"on_missing_id": "run"}  # default: raise

            @idem.consumer(dedup_id=lambda props: props.message_id, **options)
            def handle(props: Any, body: bytes, applied: list[bytes] = applied) -> None:
                applied.append(body)

            bodies = [f"{mode}-{i}".encode() for i in range(3)]
            for body in bodies:
                channel.basic_publish("", work, body)  # no message_id, as pika sends by default
            acked: list[bytes] = []
            for _ in range(len(bodies)):
                method, props, body = _get(channel, work)
                try:
                    handle(props, body)
                except KeyMissing:
                    # Never succeeds on redelivery: dead-letter it, don't loop on it.
                    channel.basic_reject(method.delivery_tag, requeue=False)
                else:
                    channel.basic_ack(method.delivery_tag)
                    acked.append(body)
            if mode == "raise":
                # Before: [b"raise-0"] applied, all three acked: two messages lost.
                assert applied == [] and acked == []
                dead_bodies = [_get(channel, dead, ack=True)[2] for _ in bodies]
                assert sorted(dead_bodies) == bodies  # every one kept for a human to look at
            else:
                assert applied == bodies and acked == bodies
    finally:
        channel.queue_delete(work)
        channel.queue_delete(dead)
        conn.close()
        idem.close()


def _get(channel: Any, queue: str, ack: bool = False) -> tuple[Any, Any, bytes]:
    for _ in range(100):
        method, props, body = channel.basic_get(queue, auto_ack=ack)
        if method is not None:
            return method, props, body
        time.sleep(0.05)
    raise AssertionError(f"nothing arrived on {queue}")
