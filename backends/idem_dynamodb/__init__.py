"""DynamoDB store for idem-core: ``dynamodb://TABLE?region=...``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backend import BACKEND, DynamoDBBackend
from .plans import TransactionCanceled
from .settings import Settings
from .store import DynamoDBStore

if TYPE_CHECKING:
    from .aio import AsyncDynamoDBStore

__all__ = [
    "BACKEND",
    "AsyncDynamoDBStore",
    "DynamoDBBackend",
    "DynamoDBStore",
    "Settings",
    "TransactionCanceled",
]


def __getattr__(name: str) -> Any:
    # The async store imports asyncio (tens of ms of a cold start): only when asked for.
    if name == "AsyncDynamoDBStore":
        from .aio import AsyncDynamoDBStore

        return AsyncDynamoDBStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
