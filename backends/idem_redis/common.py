"""What the sync and async stores share: reply decoding and sorting, error translation.

Neither of the two stores restates a transition rule: the scripts return the server time and
the record they found, and the functions here hand both to :mod:`idem_core.machine`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextvars import Token
from types import TracebackType
from typing import Any

from idem_core import machine
from idem_core.errors import (
    ConfigurationError,
    CorruptRecord,
    IdempotencyError,
    ResultNotSerializable,
    StoreUnavailable,
)
from idem_core.record import ClaimRequest, ClaimResult, Record, micros

from . import records
from .clients import DEADLINE
from .config import Config, parse

EXTRA = "redis"
#: Redis accepts keys up to 512 MB; past this the caller hashes (see ``Store.max_key_length``).
MAX_KEY_LENGTH = 1024
#: most script calls one coalesced round trip carries
MAX_BATCH = 256

__all__ = ["Config", "parse", "translate", "transient"]


def transient() -> tuple[type[BaseException], ...]:
    """Every error a Redis client raises when the server or the path to it fails.

    ``RedisClusterException`` is not a ``RedisError``: redis-py raises it when no node of a
    Cluster answers (all down, or every slot lookup timed out), on an open client as at first
    use. Every ``except`` in the two stores that means "the server failed" uses this tuple.
    """
    from redis.exceptions import RedisClusterException, RedisError

    return (RedisError, RedisClusterException, OSError, TimeoutError)


# What asyncio and redis.asyncio say when a client is used outside the event loop it was made
# in, or after that loop closed: the store's client is then unusable, not the caller's input.
_LOOP_ERRORS = ("event loop is closed", "different loop", "different event loop", "no running")


def translated(what: str, exc: BaseException) -> IdempotencyError | None:
    """The core's error for a driver error (None: not a driver error; let it through)."""
    from redis.exceptions import ResponseError

    if isinstance(exc, IdempotencyError):
        return None
    if isinstance(exc, ResponseError):
        text = str(exc)
        if text.startswith(("IDEMCORRUPT", "WRONGTYPE")):
            return CorruptRecord(f"{what}: {text}")
        return StoreUnavailable(f"{what}: Redis answered {text}")
    if isinstance(exc, transient()):
        return StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _LOOP_ERRORS):
        return StoreUnavailable(
            f"{what}: the Redis client cannot run on this event loop ({exc}); "
            "an async store serves one event loop"
        )
    return None


class translate:
    """Every store call runs inside one: driver errors become the core's errors, with the
    driver's error as ``__cause__``, and the call's I/O keeps to ``budget`` seconds (see
    :mod:`.clients`). A class, not a generator: it is on every call's path."""

    __slots__ = ("budget", "token", "what")

    def __init__(self, what: str, budget: float = 0.0) -> None:
        self.what = what
        self.budget = budget
        self.token: Token[float] | None = None

    def __enter__(self) -> None:
        if self.budget and not DEADLINE.get():
            self.token = DEADLINE.set(time.monotonic() + self.budget)

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.token is not None:
            DEADLINE.reset(self.token)
            self.token = None
        if exc is not None:
            error = translated(self.what, exc)
            if error is not None:
                raise error from exc


def check_size(key: str, result: bytes, limit: int) -> None:
    """Refuse a result the server would refuse, before anything is sent."""
    if len(result) > limit:
        raise ResultNotSerializable(
            f"the result for key {key!r} is {len(result)} bytes; this Redis store accepts at "
            f"most {limit} (max_result_size); nothing was written and the claim is unchanged"
        )


def raise_any(results: Sequence[Any]) -> Sequence[Any]:
    """The replies of a batch of calls that succeed or fail together (``claim_many``): an
    error for one fails the call, raised inside the caller's ``translate`` so that it means
    what it means for a single call."""
    for res in results:
        if isinstance(res, BaseException):
            raise res
    return results


def waited(pair: Sequence[Any], config: Config, key: str) -> Any:
    """The script's reply from a script + ``WAIT`` pair (None: the script was missing)."""
    reply, acked = pair
    if isinstance(reply, Exception):
        if is_noscript(reply):
            return None
        raise reply
    if isinstance(acked, Exception):
        raise acked
    check_wait(acked, config, key)
    return reply


def _split(key: str, reply: Any) -> tuple[bool, int, Record | None]:
    """A script's reply: whether it wrote, the server time, the record it found."""
    if not isinstance(reply, list | tuple) or len(reply) < 2:
        raise CorruptRecord(f"unexpected script reply for key {key!r}: {reply!r}")
    found = records.decode(key, reply[2]) if len(reply) > 2 else None
    return bool(reply[0]), int(reply[1]), found


# Arguments of each script, and the interpretation of its reply.


def claim_args(request: ClaimRequest) -> tuple[bytes, int, int]:
    return (
        records.ids(request.fingerprint, request.attempt),
        micros(request.lease),
        micros(max(request.lease, request.ttl)),
    )


def claim_result(request: ClaimRequest, reply: Any) -> ClaimResult:
    applied, now, found = _split(request.key, reply)
    if applied:
        # ``found`` is the record the script replaced: the machine derives the new record
        # (fence, lease, expiry) and whether it was a takeover exactly as the script wrote it.
        outcome, record = machine.new_claim(found, request, now)
        return ClaimResult(outcome, record)
    assert found is not None
    return ClaimResult(machine.classify(found, request, now), found)


def complete_result(key: str, fence: int, result: bytes, ttl: float, reply: Any) -> Record:
    applied, now, found = _split(key, reply)
    if applied:
        assert found is not None
        return machine.completed(found, result, ttl, now)
    return machine.after_failed_complete(found, key, fence, now)


def release_result(key: str, fence: int, reply: Any) -> None:
    applied, now, found = _split(key, reply)
    if not applied:
        machine.after_failed_release(found, key, fence, now)


def renew_result(key: str, fence: int, lease: float, reply: Any) -> Record:
    applied, now, found = _split(key, reply)
    if applied:
        assert found is not None
        return machine.renewed(found, lease, now)
    return machine.after_failed_renew(found, key, fence, now)


def get_result(key: str, reply: Any) -> tuple[Record | None, int]:
    """The live record (None when absent or expired) and the server time."""
    _, now, found = _split(key, reply)
    if found is not None and found.expired(now):
        return None, now
    return found, now


def still_held(record: Record | None, fence: int, now: int) -> bool:
    """Whether a waiter for ``fence`` should keep waiting: held, and the lease not lapsed."""
    return (
        record is not None and machine.holds(record, fence, now) and record.lease_expires_at > now
    )


def server_micros(reply: Any) -> int:
    seconds, micro = reply
    return int(seconds) * 1_000_000 + int(micro)


def check_wait(acked: Any, config: Config, key: str) -> None:
    if int(acked) < config.wait_replicas:
        raise StoreUnavailable(
            f"only {int(acked)} of {config.wait_replicas} replicas acknowledged the write to "
            f"key {key!r} within {config.wait_timeout_ms} ms; the write stands on the primary"
        )


def refuse_with_items(with_items: Sequence[Any] | None) -> None:
    if with_items:
        raise ConfigurationError(
            "Redis cannot commit with_items atomically with a result; write them yourself "
            "before completing"
        )


def is_noscript(exc: BaseException) -> bool:
    from redis.exceptions import NoScriptError, ResponseError

    return isinstance(exc, NoScriptError) or (
        isinstance(exc, ResponseError) and str(exc).startswith("NOSCRIPT")
    )


def decode_responses_on(client: Any) -> bool:
    """Whether a given client decodes replies to str, which would mangle binary results."""
    getter = getattr(client, "get_encoder", None)
    encoder = getter() if callable(getter) else getattr(client, "encoder", None)
    return bool(getattr(encoder, "decode_responses", False))


def diagnostics(store: Any, info: dict[str, Any], nodes: int, hiredis: bool) -> dict[str, object]:
    """Facts for ``idem check``; the CLI computes clock skew from ``now()``."""
    aof = str(info.get("aof_enabled", "?"))
    return {
        "backend": "redis",
        "kind": "cluster" if store.cluster else store.config.kind,
        "server_version": info.get("redis_version"),
        "cluster_nodes": nodes if store.cluster else None,
        "key_prefix": store.prefix,
        "hiredis": hiredis,
        "persistence": {
            "aof_enabled": aof in {"1", "True", "true"},
            "rdb_last_save_time": info.get("rdb_last_bgsave_status"),
        },
        "wait_replicas": store.config.wait_replicas,
        "connected_replicas": info.get("connected_slaves"),
        "claim_path": "one EVALSHA per transition (server clock, one key per record)",
        "purge": "not needed: Redis expires keys itself (PEXPIREAT on every write)",
    }
