"""``dynamodb://TABLE?...``: the URL and keyword options of the DynamoDB store."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from idem_core.clock import Clock, system_clock
from idem_core.errors import ConfigurationError
from idem_core.registry import url_options

# DynamoDB table names: 3-255 of these characters.
_TABLE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
_RETRY_MODES = ("standard", "adaptive", "legacy")


@dataclasses.dataclass(frozen=True)
class Settings:
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
    #: seconds another worker's clock may run ahead of ours: takeovers wait this much longer
    skew: float = 1.0
    #: results longer than this many bytes are stored zstd-compressed; None disables
    compress_above: int | None = 64 * 1024
    #: worker threads of ``claim_many`` in the synchronous store
    pool_size: int = 8
    clock: Clock = system_clock

    @property
    def skew_us(self) -> int:
        return math.ceil(self.skew * 1_000_000)


_FLOATS = ("connect_timeout", "read_timeout", "skew")
_INTS = ("max_attempts", "pool_size")
_STRS = ("region", "endpoint_url", "profile", "key_attr", "sort_key", "namespace", "ttl_attr")


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
    known = {f.name for f in dataclasses.fields(Settings)} - {"table"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigurationError(
            f"unknown dynamodb:// option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {"table": table}
    for name, value in raw.items():
        values[name] = _convert(name, value)
    settings = Settings(**values)
    if settings.retry_mode not in _RETRY_MODES:
        raise ConfigurationError(f"retry_mode must be one of {', '.join(_RETRY_MODES)}")
    if settings.max_attempts < 1 or settings.pool_size < 1:
        raise ConfigurationError("max_attempts and pool_size must be at least 1")
    if settings.skew < 0 or settings.connect_timeout <= 0 or settings.read_timeout <= 0:
        raise ConfigurationError("skew must be >= 0 and timeouts > 0")
    if settings.sort_key is not None and settings.sort_key == settings.key_attr:
        raise ConfigurationError("sort_key must differ from key_attr")
    if settings.ttl_attr in {settings.key_attr, settings.sort_key}:
        raise ConfigurationError("ttl_attr must not be a key attribute")
    return settings


def _convert(name: str, value: Any) -> Any:
    if name == "clock":
        if not callable(value):
            raise ConfigurationError("clock must be a callable returning epoch microseconds")
        return value
    if name == "compress_above":
        if value is None or (isinstance(value, str) and value.lower() in {"", "none", "off"}):
            return None
        return _number(name, value, int)
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
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{name} must be a number, got {value!r}") from exc
