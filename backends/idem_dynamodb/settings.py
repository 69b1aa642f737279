"""``dynamodb://TABLE?...``: the URL and keyword options of the DynamoDB store."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from idem_core.clock import Clock, system_clock
from idem_core.errors import ConfigurationError
from idem_core.registry import url_options

# DynamoDB table names: 3-255 of these characters.
_TABLE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
_RETRY_MODES = ("standard", "adaptive", "legacy")
# Attribute names: non-empty, at most 255 bytes (DynamoDB's limit for key attributes).
_MAX_NAME = 255


def monotonic_clock() -> int:
    """Microseconds of ``time.monotonic``: how long a claimer has watched a lease."""
    return time.monotonic_ns() // 1000


class Settings(msgspec.Struct, frozen=True):
    """Everything a URL can say, after validation. Keyword options override the URL."""

    table: str
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    #: partition key attribute; holds the idempotency key, or ``namespace`` with a sort key
    key_attr: str = "pk"
    #: sort key attribute of a shared table; the idempotency key goes there
    sort_key: str | None = None
    #: static partition value of this store's records in a shared (sort-keyed) table
    namespace: str = "idem"
    #: attribute DynamoDB's TTL deletion reads (epoch seconds)
    ttl_attr: str = "ttl"
    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    retry_mode: str = "standard"
    max_attempts: int = 4
    #: seconds past a lease's stored end after which any claimer may take it over by its wall
    #: clock alone, without having watched the lease itself (see docs: clock skew)
    skew_allowance: float = 300.0
    #: results longer than this many bytes are stored zstd-compressed; None disables
    compress_above: int | None = 64 * 1024
    #: worker threads of ``claim_many`` in the synchronous store, when it claims key by key
    pool_size: int = 8
    #: the hot operations skip botocore (see :mod:`idem_dynamodb.wire`); False: boto3 only
    lean: bool = True
    #: ``claim_many`` of at least this many distinct keys goes in transactions (``batch.py``);
    #: None (``off``): one claim per key, side by side
    batch_from: int | None = 2
    clock: Clock = system_clock
    #: microseconds of a monotonic clock (keyword only; tests share a ManualClock)
    monotonic: Callable[[], int] = monotonic_clock

    @property
    def skew_allowance_us(self) -> int:
        return math.ceil(self.skew_allowance * 1_000_000)

    @property
    def unavailable_within(self) -> float:
        """Seconds after which one request to a dead, unreachable or frozen server has raised
        ``StoreUnavailable``: every attempt may spend its connect and read timeouts, and
        botocore waits at most 1, 2, 4, ... s (full jitter) between attempts."""
        attempts = self.max_attempts
        backoff = sum(min(20.0, 2.0**i) for i in range(attempts - 1))
        return attempts * (self.connect_timeout + self.read_timeout) + backoff


_FLOATS = ("connect_timeout", "read_timeout", "skew_allowance")
_INTS = ("max_attempts", "pool_size")
_STRS = ("region", "endpoint_url", "profile", "key_attr", "sort_key", "namespace", "ttl_attr")
_CALLABLES = ("clock", "monotonic")
_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS.update({"0": False, "false": False, "no": False, "off": False})
_RENAMED = {
    "skew": "skew= was replaced by skew_allowance= (seconds, default 300): leases are now "
    "taken over after the claimer watched them unchanged for their duration, see the "
    "DynamoDB docs on clock skew",
}


def parse(url: str, options: dict[str, Any]) -> Settings:
    parts = urlsplit(url)
    if parts.scheme.lower() != "dynamodb":
        raise ConfigurationError(f"not a dynamodb:// URL: {url!r}")
    table = unquote(parts.netloc + parts.path).strip("/")
    if not _TABLE.match(table):
        raise ConfigurationError(
            f"dynamodb:// URL needs a table name (3-255 characters of A-Z a-z 0-9 _ . -): {url!r}"
        )
    raw: dict[str, Any] = dict(url_options(url))
    raw.update(options)
    for old, why in _RENAMED.items():
        if old in raw:
            raise ConfigurationError(f"dynamodb:// option {old!r}: {why}")
    known = set(Settings.__struct_fields__) - {"table"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigurationError(
            f"unknown dynamodb:// option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {"table": table}
    for name, value in raw.items():
        values[name] = _convert(name, value)
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    if s.retry_mode not in _RETRY_MODES:
        raise ConfigurationError(
            f"retry_mode must be one of {', '.join(_RETRY_MODES)}, got {s.retry_mode!r}"
        )
    for name in ("max_attempts", "pool_size"):
        if getattr(s, name) < 1:
            raise ConfigurationError(f"{name} must be at least 1, got {getattr(s, name)}")
    for name in ("connect_timeout", "read_timeout"):
        value = getattr(s, name)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigurationError(f"{name} must be a positive number of seconds, got {value}")
    if not (s.skew_allowance >= 0 and math.isfinite(s.skew_allowance)):
        raise ConfigurationError(f"skew_allowance must be >= 0 seconds, got {s.skew_allowance}")
    if s.compress_above is not None and s.compress_above < 0:
        raise ConfigurationError(f"compress_above must be >= 0 or off, got {s.compress_above}")
    if s.batch_from is not None and s.batch_from < 2:
        raise ConfigurationError(f"batch_from must be at least 2 or off, got {s.batch_from}")
    if s.endpoint_url is not None:
        _check_endpoint(s.endpoint_url)
    for name in ("key_attr", "ttl_attr", "sort_key", "namespace"):
        value = getattr(s, name)
        if value is not None and not (0 < len(value.encode()) <= _MAX_NAME):
            raise ConfigurationError(f"{name} must be 1-{_MAX_NAME} bytes, got {value!r}")
    if s.sort_key is not None and s.sort_key == s.key_attr:
        raise ConfigurationError("sort_key must differ from key_attr")
    if s.ttl_attr in {s.key_attr, s.sort_key}:
        raise ConfigurationError("ttl_attr must not be a key attribute")


def _check_endpoint(url: str) -> None:
    """An endpoint botocore can send to: http(s)://host[:port][/path]."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise ConfigurationError(f"endpoint_url {url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"endpoint_url must be an http:// or https:// URL with a host, got {url!r}"
        )
    if port == 0:
        raise ConfigurationError(f"endpoint_url {url!r} has port 0")


def _convert(name: str, value: Any) -> Any:
    if name in _CALLABLES:
        if not callable(value):
            raise ConfigurationError(f"{name} must be a callable returning microseconds")
        return value
    if name in ("compress_above", "batch_from"):
        if value is None or (isinstance(value, str) and value.lower() in {"", "none", "off"}):
            return None
        return _number(name, value, int)
    if name == "lean":
        if isinstance(value, bool):
            return value
        if str(value).lower() not in _BOOLS:
            raise ConfigurationError(f"lean must be 1/0 (true/false), got {value!r}")
        return _BOOLS[str(value).lower()]
    if name == "retry_mode":
        return str(value).lower()
    if name in _FLOATS:
        return _number(name, value, float)
    if name in _INTS:
        return _number(name, value, int)
    if name in _STRS:
        text = None if value is None else str(value)
        return text or None if name in {"region", "endpoint_url", "profile", "sort_key"} else text
    return value


def _number(name: str, value: Any, kind: type[int] | type[float]) -> int | float:
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise ConfigurationError(f"{name} must be {what}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigurationError(f"{name} must be {what}, got {value!r}") from exc
