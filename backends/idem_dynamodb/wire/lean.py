"""When a store takes the lean path, and building its clients (the stores' one hook)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..settings import Settings
from .client import Wire, WireClient
from .http import Endpoint, Pool
from .resolve import Resolved

if TYPE_CHECKING:
    from .aio_http import AsyncWireClient


def enabled(settings: Settings, given: Any, session: Any) -> bool:
    """The lean path serves stores opened from a URL. A given client or session is the
    caller's configuration (hooks, endpoint, credentials): used for everything. Retry modes
    other than botocore's standard one (adaptive's client-side rate limiting, legacy) are
    left to botocore too."""
    return settings.lean and given is None and session is None and settings.retry_mode == "standard"


def _pool_size(settings: Settings) -> int:
    return max(10, settings.pool_size * 2)  # as the boto3 client's max_pool_connections


def wire(settings: Settings, resolved: Resolved, endpoint: str, region: str) -> Wire:
    return Wire(endpoint, region, resolved.credentials, settings.max_attempts)


def sync_client(settings: Settings, resolved: Resolved, endpoint: str, region: str) -> WireClient:
    w = wire(settings, resolved, endpoint, region)
    pool = Pool(w.endpoint, settings.connect_timeout, settings.read_timeout, _pool_size(settings))
    return WireClient(w, pool)


def async_client(
    settings: Settings, resolved: Resolved, endpoint: str, region: str
) -> AsyncWireClient:
    from .aio_http import AsyncPool, AsyncWireClient  # asyncio: only in async processes

    w = wire(settings, resolved, endpoint, region)
    s = settings
    return AsyncWireClient(
        w, AsyncPool(w.endpoint, s.connect_timeout, s.read_timeout, _pool_size(s))
    )


__all__ = ["Endpoint", "async_client", "enabled", "sync_client"]
