"""The ``idem_core.stores`` entry point for ``redis://``, ``rediss://``, ``unix://``,
``redis+cluster://`` and ``redis+sentinel://``."""

from __future__ import annotations

from typing import Any

from idem_core.errors import ConfigurationError
from idem_core.registry import import_driver

from . import common


class RedisBackend:
    """Opens :class:`~idem_redis.sync.RedisStore` and :class:`~idem_redis.aio.AsyncRedisStore`.

    The same URL opens both. ``client=`` takes a ready redis-py client (``redis.Redis`` or
    ``redis.RedisCluster`` for ``open``, their ``redis.asyncio`` twins for ``open_async``),
    which the store uses as is and never closes; the URL then supplies only idem-core's own
    parameters (``prefix``, ``wait_replicas``, ``wait_timeout_ms``).
    """

    extra = common.EXTRA

    def _config(self, url: str, options: dict[str, Any]) -> common.Config:
        import_driver("redis", self.extra)
        config = common.parse(url)
        if options:
            known = {"prefix", "wait_replicas", "wait_timeout_ms", "coalesce"}
            unknown = set(options) - known
            if unknown:
                raise ConfigurationError(
                    f"unknown Redis store options {sorted(unknown)}; "
                    f"pass connection settings in the URL (known options: {sorted(known)})"
                )
            import dataclasses

            config = dataclasses.replace(config, **options)
        return config

    def open(self, url: str, *, client: Any = None, **options: Any) -> Any:
        from .sync import RedisStore

        return RedisStore(self._config(url, options), client)

    def open_async(self, url: str, *, client: Any = None, **options: Any) -> Any:
        from .aio import AsyncRedisStore

        return AsyncRedisStore(self._config(url, options), client)


BACKEND = RedisBackend()
