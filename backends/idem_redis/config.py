"""Store URLs: parsed and checked once, when the store is opened.

Every query parameter is either idem-core's own or one of an explicit list of redis-py
connection settings; anything else (a typo, a setting that would break the store such as
``decode_responses``, or one idem-core owns under another name) is a ``ConfigurationError``
naming the parameter, before any connection is made.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from idem_core.errors import ConfigurationError

DEFAULT_PREFIX = "idem:"
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 1
#: Redis's default ``proto-max-bulk-len``: the largest argument (so result) a server accepts.
DEFAULT_MAX_RESULT_SIZE = 512 * 1024 * 1024

Kind = Literal["standalone", "cluster", "sentinel"]

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def _bool(value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(value)


def _nonneg_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


def _protocol(value: str) -> int:
    number = int(value)
    if number not in (2, 3):
        raise ValueError(value)
    return number


def _cert_reqs(value: str) -> str:
    if value.lower() not in {"none", "optional", "required"}:
        raise ValueError(value)
    return value.lower()


# redis-py connection settings a URL may carry, with how each value is checked. The list is
# explicit: redis-py itself passes unknown query parameters on as keyword arguments, which
# then fail (or are silently dropped by the cluster client) at the first connection.
PASSED: dict[str, Callable[[str], Any]] = {
    "db": _nonneg_int,
    "client_name": str,
    "username": str,
    "password": str,
    "health_check_interval": _nonneg_int,
    "socket_keepalive": _bool,
    "protocol": _protocol,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_password": str,
    "ssl_check_hostname": _bool,
}

# Settings redis-py knows that the store refuses, and why.
REFUSED = {
    "socket_timeout": "use timeout=",
    "socket_connect_timeout": "use connect_timeout=",
    "max_connections": "use pool_size=",
    "retry_on_timeout": "use retries=",
    "retry_on_error": "use retries=",
    "decode_responses": "results are bytes; the store decodes nothing",
    "encoding": "results are bytes; the store decodes nothing",
    "single_connection_client": "the store pools its connections",
    "readonly": "the store writes on primaries only",
}

# Query parameters that belong to idem-core.
OWN = {
    "prefix",
    "wait_replicas",
    "wait_timeout_ms",
    "timeout",
    "connect_timeout",
    "pool_size",
    "retries",
    "max_result_size",
    "sentinel_password",
    "ssl",
    "coalesce",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """A parsed store URL: how to connect, and idem-core's own options."""

    kind: Kind
    #: (host, port) of the server, of cluster startup nodes or of the sentinels
    nodes: tuple[tuple[str, int], ...] = ()
    #: a Unix socket path (``unix://``)
    path: str = ""
    #: TLS (``rediss://``, or ``ssl=true`` on cluster and sentinel URLs)
    tls: bool = False
    #: the Sentinel service (master) name
    service: str = ""
    prefix: str = DEFAULT_PREFIX
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    pool_size: int | None = None
    max_result_size: int = DEFAULT_MAX_RESULT_SIZE
    #: concurrent calls of one process share round trips (``coalesce=0``: each call its own)
    coalesce: bool = True
    #: connection keyword arguments for redis-py (the checked ``PASSED`` settings, ``db``)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    sentinel_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def cluster(self) -> bool:
        return self.kind == "cluster"

    @property
    def budget(self) -> float:
        """Seconds one store call may spend in I/O, all retries and slot refreshes included
        (a connect already under way may add up to ``connect_timeout``)."""
        return (self.retries + 1) * self.timeout


def _number(own: dict[str, str], name: str, default: float, url: str) -> float:
    if name not in own:
        return default
    try:
        value = float(own[name])
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be a number of seconds in {url!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive, finite number in {url!r}")
    return value


def _integer(own: dict[str, str], name: str, default: int, url: str, low: int = 0) -> int:
    if name not in own:
        return default
    try:
        value = int(own[name])
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be an integer in {url!r}") from exc
    if value < low:
        raise ConfigurationError(f"{name} must be at least {low} in {url!r}")
    return value


def _port(text: str, default: int, url: str) -> int:
    if not text:
        return default
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(f"port {text!r} is not a port number in {url!r}")
    return int(text)


def _hosts(
    netloc: str, default_port: int, url: str, local: bool = False
) -> tuple[str, tuple[tuple[str, int], ...]]:
    """Split ``user:pw@h1:p1,h2:p2`` into its user info and host list (``local``: no host
    means the local server)."""
    userinfo, _, hostlist = netloc.rpartition("@")
    nodes = []
    for part in hostlist.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ConfigurationError(f"bad host {part!r} in {url!r}")
            port_text = rest[1:]
        else:
            host, _, port_text = part.partition(":")
        nodes.append((unquote(host) or "127.0.0.1", _port(port_text, default_port, url)))
    if not nodes and local:
        nodes.append(("127.0.0.1", default_port))
    if not nodes:
        raise ConfigurationError(f"no host in {url!r}")
    return userinfo, tuple(nodes)


def _credentials(userinfo: str) -> dict[str, Any]:
    if not userinfo:
        return {}
    user, colon, password = userinfo.partition(":")
    found: dict[str, Any] = {}
    if user:
        found["username"] = unquote(user)
    if colon and password:
        found["password"] = unquote(password)
    return found


def _db(text: str, url: str) -> int:
    try:
        return _nonneg_int(text)
    except ValueError:
        raise ConfigurationError(
            f"database {text!r} is not a database number (db) in {url!r}"
        ) from None


def _passed(query: dict[str, str], url: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, value in query.items():
        if name in REFUSED:
            raise ConfigurationError(
                f"query parameter {name!r} is not accepted ({REFUSED[name]}) in {url!r}"
            )
        check = PASSED.get(name)
        if check is None:
            known = sorted(OWN | set(PASSED))
            raise ConfigurationError(
                f"unknown query parameter {name!r} in {url!r} (known: {', '.join(known)})"
            )
        try:
            kwargs[name] = check(value)
        except ValueError:
            raise ConfigurationError(f"bad value {value!r} for {name!r} in {url!r}") from None
    return kwargs


def parse(url: str) -> Config:
    """Parse a ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://`` or
    ``redis+sentinel://`` URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in {"redis", "rediss", "unix", "redis+cluster", "redis+sentinel"}:
        raise ConfigurationError(f"not a Redis URL: {url!r}")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigurationError(f"query parameter {repeated[0]!r} given twice in {url!r}")
    query = dict(pairs)
    own = {k: query.pop(k) for k in list(query) if k in OWN}
    common: dict[str, Any] = {
        "prefix": own.get("prefix", DEFAULT_PREFIX),
        "wait_replicas": _integer(own, "wait_replicas", 0, url),
        "wait_timeout_ms": _integer(own, "wait_timeout_ms", 1000, url),
        "timeout": _number(own, "timeout", DEFAULT_TIMEOUT, url),
        "retries": _integer(own, "retries", DEFAULT_RETRIES, url),
        "pool_size": _integer(own, "pool_size", 0, url, low=1) if "pool_size" in own else None,
        "max_result_size": _integer(own, "max_result_size", DEFAULT_MAX_RESULT_SIZE, url, low=1),
    }
    try:
        common["coalesce"] = _bool(own.get("coalesce", "1"))
    except ValueError:
        raise ConfigurationError(
            f"bad value {own['coalesce']!r} for 'coalesce' (1 or 0) in {url!r}"
        ) from None
    if common["max_result_size"] > DEFAULT_MAX_RESULT_SIZE:
        raise ConfigurationError(
            f"max_result_size cannot exceed Redis's {DEFAULT_MAX_RESULT_SIZE} bytes in {url!r}"
        )
    common["connect_timeout"] = _number(own, "connect_timeout", common["timeout"], url)
    kwargs = _passed(query, url)
    if "ssl" in own and scheme in {"redis", "rediss", "unix"}:
        raise ConfigurationError(f"use rediss:// for TLS, not ?ssl= ({url!r})")
    tls = scheme == "rediss"
    if "ssl" in own:
        try:
            tls = _bool(own["ssl"])
        except ValueError:
            raise ConfigurationError(f"bad value {own['ssl']!r} for 'ssl' in {url!r}") from None
    if not tls and any(name.startswith("ssl_") for name in kwargs):
        raise ConfigurationError(f"ssl_* parameters need TLS (rediss:// or ssl=true) in {url!r}")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if scheme == "unix":
        if not parts.path:
            raise ConfigurationError(f"a unix:// URL names a socket path ({url!r})")
        if "socket_keepalive" in kwargs:
            raise ConfigurationError(f"socket_keepalive is for TCP, not unix:// ({url!r})")
        kwargs = _credentials(parts.netloc.rpartition("@")[0]) | kwargs
        return Config(kind="standalone", path=unquote(parts.path), kwargs=kwargs, **common)
    if scheme in {"redis", "rediss"}:
        userinfo, nodes = _hosts(parts.netloc, 6379, url, local=True)
        if len(nodes) > 1:
            raise ConfigurationError(
                f"several hosts in {url!r}: use redis+cluster:// or redis+sentinel://"
            )
        if len(path) > 1:
            raise ConfigurationError(f"a path other than the database number in {url!r}")
        if path:
            if "db" in kwargs:
                raise ConfigurationError(f"database given twice (path and db=) in {url!r}")
            kwargs["db"] = _db(path[0], url)
        kwargs = _credentials(userinfo) | kwargs
        return Config(kind="standalone", nodes=nodes, tls=tls, kwargs=kwargs, **common)
    if scheme == "redis+cluster":
        userinfo, nodes = _hosts(parts.netloc, 6379, url)
        if "health_check_interval" in kwargs:
            raise ConfigurationError(
                f"health_check_interval is not supported by redis-py's cluster client ({url!r})"
            )
        db = path[0] if path else str(kwargs.get("db", 0))
        if len(path) > 1 or _db(db, url) != 0:
            raise ConfigurationError(f"Redis Cluster has only database 0 ({url!r})")
        kwargs.pop("db", None)
        kwargs = _credentials(userinfo) | kwargs
        return Config(kind="cluster", nodes=nodes, tls=tls, kwargs=kwargs, **common)
    userinfo, nodes = _hosts(parts.netloc, 26379, url)
    if not path:
        raise ConfigurationError(
            f"a Sentinel URL names its service: redis+sentinel://host:26379/mymaster ({url!r})"
        )
    if len(path) > 2:
        raise ConfigurationError(f"a path other than service and database in {url!r}")
    if len(path) > 1:
        if "db" in kwargs:
            raise ConfigurationError(f"database given twice (path and db=) in {url!r}")
        kwargs["db"] = _db(path[1], url)
    kwargs = _credentials(userinfo) | kwargs
    sentinel_kwargs: dict[str, Any] = {}
    if "sentinel_password" in own:
        sentinel_kwargs["password"] = own["sentinel_password"]
    if tls:
        sentinel_kwargs["ssl"] = True
    return Config(
        kind="sentinel",
        nodes=nodes,
        service=path[0],
        tls=tls,
        kwargs=kwargs,
        sentinel_kwargs=sentinel_kwargs,
        **common,
    )
