"""The lean clients: ``call(op, kwargs)`` returns what boto3's ``client.<op>(**kwargs)``
returns for the lean operations, or raises :class:`.protocol.ServiceError` (botocore's
``ClientError`` shape) or the connection's ``OSError``, after botocore's standard retries.
:class:`Wire` holds what both twins share; they only do the I/O and the waiting (the
asyncio twin is in :mod:`.aio_http`, so that a sync process never imports asyncio)."""

from __future__ import annotations

import time
from typing import Any

from .http import Endpoint, Pool, request_bytes
from .protocol import CONTENT_TYPE, OPERATIONS, TARGET, encode, reply
from .resolve import Credentials
from .retry import Retries
from .sigv4 import Frozen, Signer, amz_date

__all__ = ["OPERATIONS", "Wire", "WireClient"]


class Wire:
    """Requests to one endpoint, signed for one region, and the retry state."""

    def __init__(
        self, endpoint: str, region: str, credentials: Credentials, max_attempts: int
    ) -> None:
        self.endpoint = Endpoint.parse(endpoint)
        self.region = region
        self.credentials = credentials
        self.signer = Signer(region, path=self.endpoint.path)
        self.retries = Retries(max_attempts)
        self._base = {"host": self.endpoint.host, "content-type": CONTENT_TYPE}

    def request(self, operation: str, body: bytes, creds: Frozen, when: str) -> bytes:
        headers = {**self._base, "x-amz-target": TARGET + operation}
        return request_bytes(self.endpoint, self.signer.sign(creds, headers, body, when), body)


class WireClient:
    def __init__(self, wire: Wire, pool: Pool) -> None:
        self.wire = wire
        self.pool = pool

    def call(self, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        wire, operation, body = self.wire, OPERATIONS[op], encode(kwargs)
        attempt, failed = 1, None
        while True:
            try:
                data = wire.request(operation, body, wire.credentials.frozen(), amz_date())
                got = self.pool.send(data)
                result = reply(operation, got.status, got.headers, got.body)
            except Exception as exc:
                delay = wire.retries.delay(exc, attempt)
                if delay is None:
                    raise wire.retries.gave_up(exc, attempt) from None
                attempt, failed = attempt + 1, exc
                time.sleep(delay)
                continue
            wire.retries.succeeded(failed)
            return result

    def close(self) -> None:
        self.pool.close()
