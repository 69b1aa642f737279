"""What the sync and async stores share: URL parsing, reply decoding, error translation.

Neither of the two stores restates a transition rule: the scripts return the server time and
the record they found, and the functions here hand both to :mod:`idem_core.machine`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from idem_core import machine
from idem_core.errors import ConfigurationError, CorruptRecord, StoreUnavailable
from idem_core.record import ClaimRequest, ClaimResult, Record, Status, micros

EXTRA = "redis"
DEFAULT_PREFIX = "idem:"
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 1
#: Redis accepts keys up to 512 MB; past this the caller hashes (see ``Store.max_key_length``).
MAX_KEY_LENGTH = 1024

Kind = Literal["standalone", "cluster", "sentinel"]

# Query parameters that belong to idem-core; every other one goes to redis-py as it is.
_OWN = {
    "prefix",
    "wait_replicas",
    "wait_timeout_ms",
    "timeout",
    "connect_timeout",
    "pool_size",
    "retries",
    "sentinel_password",
    "ssl",
}
_TRUE = {"1", "true", "yes", "on"}


@dataclasses.dataclass(frozen=True)
class Config:
    """A parsed store URL: how to connect, and idem-core's own options."""

    kind: Kind
    #: ``redis://``/``rediss://``/``unix://`` URL for redis-py, without idem-core's parameters
    url: str = ""
    #: (host, port) of cluster startup nodes or of the sentinels
    nodes: tuple[tuple[str, int], ...] = ()
    #: the Sentinel service (master) name
    service: str = ""
    prefix: str = DEFAULT_PREFIX
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    pool_size: int | None = None
    #: connection keyword arguments for redis-py (cluster and sentinel URLs)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    sentinel_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def cluster(self) -> bool:
        return self.kind == "cluster"


def _int(options: dict[str, str], name: str, default: int, url: str, low: int = 0) -> int:
    if name not in options:
        return default
    try:
        value = int(options[name])
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be an integer in {url!r}") from exc
    if value < low:
        raise ConfigurationError(f"{name} must be at least {low} in {url!r}")
    return value


def _float(options: dict[str, str], name: str, default: float, url: str) -> float:
    if name not in options:
        return default
    try:
        value = float(options[name])
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be a number of seconds in {url!r}") from exc
    if value <= 0:
        raise ConfigurationError(f"{name} must be positive in {url!r}")
    return value


def _hosts(netloc: str, default_port: int, url: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    """Split ``user:pw@h1:p1,h2:p2`` into its user info and host list."""
    userinfo, _, hostlist = netloc.rpartition("@")
    nodes = []
    for part in hostlist.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = part.partition(":")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError as exc:
            raise ConfigurationError(f"bad port in {url!r}") from exc
        nodes.append((host or "127.0.0.1", port))
    if not nodes:
        raise ConfigurationError(f"no host in {url!r}")
    return userinfo, tuple(nodes)


def _redis_kwargs(userinfo: str, query: dict[str, str], db: str, url: str) -> dict[str, Any]:
    """Connection keyword arguments parsed the way redis-py parses its own URLs."""
    from redis.connection import parse_url

    synthetic = urlunsplit(
        ("redis", f"{userinfo}@127.0.0.1" if userinfo else "127.0.0.1", f"/{db}", "", "")
    )
    if query:
        synthetic += "?" + urlencode(query)
    try:
        kwargs: dict[str, Any] = parse_url(synthetic)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigurationError(f"{exc} ({url!r})") from exc
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    return kwargs


def parse(url: str) -> Config:
    """Parse a ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://`` or
    ``redis+sentinel://`` URL; unknown query parameters are passed to redis-py."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    own = {k: query.pop(k) for k in list(query) if k in _OWN}
    common: dict[str, Any] = {
        "prefix": own.get("prefix", DEFAULT_PREFIX),
        "wait_replicas": _int(own, "wait_replicas", 0, url),
        "wait_timeout_ms": _int(own, "wait_timeout_ms", 1000, url),
        "timeout": _float(own, "timeout", DEFAULT_TIMEOUT, url),
        "retries": _int(own, "retries", DEFAULT_RETRIES, url),
        "pool_size": _int(own, "pool_size", 0, url, low=1) if "pool_size" in own else None,
    }
    common["connect_timeout"] = _float(own, "connect_timeout", common["timeout"], url)
    if scheme in {"redis", "rediss", "unix"}:
        if "ssl" in own:
            raise ConfigurationError(f"use rediss:// for TLS, not ?ssl= ({url!r})")
        rest = f"{parts.scheme}://{parts.netloc}{parts.path}"
        if query:
            rest += "?" + urlencode(query)
        return Config(kind="standalone", url=rest, **common)
    if scheme == "redis+cluster":
        userinfo, nodes = _hosts(parts.netloc, 6379, url)
        if parts.path.strip("/") not in {"", "0"}:
            raise ConfigurationError(f"Redis Cluster has only database 0 ({url!r})")
        kwargs = _redis_kwargs(userinfo, query, "0", url)
        kwargs.pop("db", None)
        if own.get("ssl", "").lower() in _TRUE:
            kwargs["ssl"] = True
        return Config(kind="cluster", nodes=nodes, kwargs=kwargs, **common)
    if scheme == "redis+sentinel":
        userinfo, nodes = _hosts(parts.netloc, 26379, url)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigurationError(
                f"a Sentinel URL names its service: redis+sentinel://host:26379/mymaster ({url!r})"
            )
        service = unquote(path[0])
        db = path[1] if len(path) > 1 else query.pop("db", "0")
        kwargs = _redis_kwargs(userinfo, query, db, url)
        sentinel_kwargs: dict[str, Any] = {}
        if "sentinel_password" in own:
            sentinel_kwargs["password"] = own["sentinel_password"]
        if own.get("ssl", "").lower() in _TRUE:
            kwargs["ssl"] = True
            sentinel_kwargs["ssl"] = True
        return Config(
            kind="sentinel",
            nodes=nodes,
            service=service,
            kwargs=kwargs,
            sentinel_kwargs=sentinel_kwargs,
            **common,
        )
    raise ConfigurationError(f"not a Redis URL: {url!r}")


def timeouts(config: Config) -> dict[str, Any]:
    """Keyword arguments every client we build gets, so no call blocks past its timeout."""
    kwargs: dict[str, Any] = {
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.connect_timeout,
    }
    if config.pool_size is not None:
        kwargs["max_connections"] = config.pool_size
    return kwargs


def transient() -> tuple[type[BaseException], ...]:
    """Every error a Redis client raises when the server or the path to it fails.

    ``RedisClusterException`` is not a ``RedisError``: redis-py raises it when no node of a
    Cluster answers (all down, or every slot lookup timed out), on an open client as at first
    use. Every ``except`` in the two stores that means "the server failed" uses this tuple.
    """
    from redis.exceptions import RedisClusterException, RedisError

    return (RedisError, RedisClusterException, OSError, TimeoutError)


@contextlib.contextmanager
def translate(what: str) -> Iterator[None]:
    """Driver errors become the core's errors, with the driver's error as ``__cause__``."""
    from redis.exceptions import ResponseError

    try:
        yield
    except ResponseError as exc:
        text = str(exc)
        if text.startswith(("IDEMCORRUPT", "WRONGTYPE")):
            raise CorruptRecord(f"{what}: {text}") from exc
        raise StoreUnavailable(f"{what}: Redis answered {text}") from exc
    except transient() as exc:
        raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _int_field(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(_text(value))


def decode(key: str, fields: Sequence[Any]) -> Record | None:
    """The record in a script's reply (``fields`` is the reply after ``applied, now``)."""
    if not fields or fields[0] is None or fields[0] is False:
        return None
    try:
        status = _text(fields[0])
        result = fields[8] if len(fields) > 8 else None
        if result is False:  # a Lua nil read under RESP3
            result = None
        if isinstance(result, str):
            result = result.encode()
        return Record(
            key=key,
            status=Status.IN_PROGRESS if status == "i" else Status.COMPLETED,
            fingerprint=_text(fields[1]),
            fence=_int_field(fields[2]),
            lease_expires_at=_int_field(fields[3]),
            expires_at=_int_field(fields[4]),
            attempt=_text(fields[5]),
            created_at=_int_field(fields[6]),
            updated_at=_int_field(fields[7]),
            result=result,
        )
    except (TypeError, ValueError, UnicodeDecodeError, IndexError) as exc:
        raise CorruptRecord(f"the Redis record for key {key!r} cannot be decoded: {exc}") from exc


def _split(key: str, reply: Any) -> tuple[bool, int, Record | None]:
    if not isinstance(reply, list | tuple) or len(reply) < 2:
        raise CorruptRecord(f"unexpected script reply for key {key!r}: {reply!r}")
    return bool(reply[0]), int(reply[1]), decode(key, reply[2:])


# Arguments of each script, and the interpretation of its reply.


def claim_args(request: ClaimRequest) -> tuple[str, str, int, int]:
    return (
        request.fingerprint,
        request.attempt,
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


def build_client(config: Config, *, aio: bool) -> Any:
    """A redis-py client (``redis.asyncio`` when ``aio``) for ``config``, with bounded
    timeouts and retries."""
    import importlib

    from redis.backoff import ExponentialWithJitterBackoff

    package = "redis.asyncio" if aio else "redis"
    client = importlib.import_module(package)
    retry = importlib.import_module(f"{package}.retry").Retry(
        ExponentialWithJitterBackoff(base=0.01, cap=0.1), config.retries
    )
    kwargs = timeouts(config)
    if config.kind == "standalone":
        return client.Redis.from_url(config.url, retry=retry, **kwargs)
    if config.kind == "cluster":
        cluster = importlib.import_module(f"{package}.cluster")
        return cluster.RedisCluster(
            startup_nodes=[cluster.ClusterNode(h, p) for h, p in config.nodes],
            retry=retry,
            **{**config.kwargs, **kwargs},
        )
    sentinel = importlib.import_module(f"{package}.sentinel").Sentinel(
        list(config.nodes),
        sentinel_kwargs={**config.sentinel_kwargs, **timeouts(config)},
        retry=retry,
        **{**config.kwargs, **kwargs},
    )
    return sentinel.master_for(config.service)


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
