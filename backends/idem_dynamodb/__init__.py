"""DynamoDB store for idem-core: ``dynamodb://TABLE?region=...``."""

from __future__ import annotations

from .aio import AsyncDynamoDBStore
from .backend import BACKEND, DynamoDBBackend
from .plans import TransactionCanceled
from .settings import Settings
from .store import DynamoDBStore

__all__ = [
    "BACKEND",
    "AsyncDynamoDBStore",
    "DynamoDBBackend",
    "DynamoDBStore",
    "Settings",
    "TransactionCanceled",
]
