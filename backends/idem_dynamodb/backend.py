"""``dynamodb://TABLE?...``: the entry point of the DynamoDB store.

URL options (keyword options of ``open``/``open_async`` override them): ``region``,
``endpoint_url``, ``profile``, ``key_attr`` (partition key, default ``pk``), ``sort_key`` and
``namespace`` (a shared table: the partition holds ``namespace``, the sort key the idempotency
key), ``ttl_attr`` (default ``ttl``), ``connect_timeout``, ``read_timeout``, ``retry_mode``
(``standard``/``adaptive``/``legacy``), ``max_attempts``, ``skew_allowance`` (seconds,
default 300), ``compress_above`` (bytes, default 65536, ``off`` to disable), ``pool_size``,
``lean`` (default 1: the hot operations skip botocore, see :mod:`idem_dynamodb.wire`); and
as keyword only, ``clock`` (an :class:`idem_core.clock.Clock`) and ``monotonic`` (monotonic
microseconds). Every option is validated when the store is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import parse
from .store import DynamoDBStore

if TYPE_CHECKING:
    from .aio import AsyncDynamoDBStore


class DynamoDBBackend:
    extra = "dynamodb"

    def open(self, url: str, *, client: Any = None, **options: Any) -> DynamoDBStore:
        """A boto3 client or session may be given as ``client``; a given client is never closed."""
        return DynamoDBStore(parse(url, options), client)

    def open_async(self, url: str, *, client: Any = None, **options: Any) -> AsyncDynamoDBStore:
        """An aiobotocore client (entered) or an aiobotocore/aioboto3 session may be given."""
        from .aio import AsyncDynamoDBStore  # asyncio: not in a sync process's cold start

        return AsyncDynamoDBStore(parse(url, options), client)


BACKEND = DynamoDBBackend()
