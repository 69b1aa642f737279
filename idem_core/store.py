"""The store contract: what every backend implements, sync and async.

The lease and fence rules are those of :mod:`idem_core.machine`; each method below is one
atomic operation on the store, judged by the store's own clock where it has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .record import ClaimRequest, ClaimResult, Record


@runtime_checkable
class Store(Protocol):
    """A synchronous store of idempotency records.

    Rules every implementation keeps (see :mod:`idem_core.machine` for the full table):

    * ``claim`` creates or takes over a record and hands out a *fence*, a 64-bit integer that
      grows strictly on every claim and takeover of a key, across expiry and deletion too.
      A claim whose ``attempt`` matches the live record's is a retry of an applied claim and
      returns the same fence. Otherwise it returns the existing record unchanged (in progress,
      completed, or a fingerprint mismatch) in the same round trip.
    * ``complete``, ``release`` and ``renew`` act only for the current holder: the record is
      ``IN_PROGRESS``, live, not released, with that fence. Anyone else gets ``LeaseLost`` and
      nothing changes, so a stalled worker can never overwrite or delete its successor's
      record. A retried ``complete``/``release`` that was already applied succeeds.
    * Leases and expiry are judged by ``now()``: the server's clock where there is one.
    * Driver and connection errors surface as ``StoreUnavailable`` with the driver error as
      ``__cause__``; a record that cannot be decoded as ``CorruptRecord``.
    * A store never closes a client it was given.
    """

    #: longest key the store accepts; longer keys are hashed by the caller
    max_key_length: int
    #: whether ``now()`` reads a server clock (True) or the client's (False)
    server_clock: bool

    def claim(self, request: ClaimRequest) -> ClaimResult: ...

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        """Claims for several keys, in order; one round trip where the store can."""
        ...

    def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        """Store ``result`` and keep the record for ``ttl`` seconds.

        ``with_items`` are the caller's own writes to commit atomically with the result, in
        the store's native format; a store that cannot do this raises ``ConfigurationError``.
        """
        ...

    def release(self, key: str, fence: int) -> None:
        """Give up the claim so the next claim takes the key at once."""
        ...

    def renew(self, key: str, fence: int, lease: float) -> Record:
        """Extend the lease to ``now + lease`` seconds."""
        ...

    def get(self, key: str) -> Record | None:
        """The live record for ``key``, or None (expired records count as absent)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the record whatever its state (administration, tests)."""
        ...

    def now(self) -> int:
        """The store's clock, microseconds since the epoch."""
        ...

    def close(self) -> None:
        """Release resources the store opened itself; clients it was given stay open."""
        ...


@runtime_checkable
class AsyncStore(Protocol):
    """The asyncio twin of :class:`Store`: the same methods and rules, awaited."""

    max_key_length: int
    server_clock: bool

    async def claim(self, request: ClaimRequest) -> ClaimResult: ...

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]: ...

    async def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record: ...

    async def release(self, key: str, fence: int) -> None: ...

    async def renew(self, key: str, fence: int, lease: float) -> Record: ...

    async def get(self, key: str) -> Record | None: ...

    async def delete(self, key: str) -> None: ...

    async def now(self) -> int: ...

    async def close(self) -> None: ...


# Optional capabilities. The core looks for these by name and works without them:
#
# ``bind(connection) -> Store``: a view of the store that runs inside the caller's own
#     connection and transaction (SQL), so the result commits with the business writes.
# ``setup() -> str``: create tables/indexes/TTL settings; returns what it did (``idem setup``).
# ``purge_expired(batch: int = 1000) -> int``: delete expired records in bounded batches
#     (``idem purge``); stores that expire records themselves do not have it.
# ``diagnostics() -> dict[str, object]``: facts for ``idem check`` (server version, key schema,
#     whether TTL is on, which claim path the server takes...).
# ``wait_for_change(key, fence, timeout) -> None``: return once ``key`` is no longer held with
#     ``fence`` (completed, released, expired, taken over) or after ``timeout`` seconds; may
#     return early. Subscribe first, then re-read, so a change in between is not missed. The
#     core polls with backoff when a store lacks it.
# ``async_twin() -> AsyncStore``: an asyncio view of the same data (in-process stores).
# ``scan(where: ScanFilter, page_size: int = 500) -> Iterator[list[Record]]``: every record
#     ``where`` may select (:mod:`idem_core.scanning`), in pages of at most ``page_size``
#     records *without their results*, holding no more than about one page in memory whatever
#     the store's size (``idem ls``, ``idem stuck``). A store may filter only in part on the
#     server; callers keep what ``where.matches`` accepts. Stores without it make the CLI say
#     that listing is not supported. DynamoDB's and a Redis Cluster's scans read the whole
#     table/keyspace, a page at a time.
#
# Stores must also be safe after ``os.fork()``: a child opens its own connections instead of
# using the parent's sockets.


class Backend(Protocol):
    """What the ``idem_core.stores`` entry point of a URL scheme names.

    ``open``/``open_async`` import their driver lazily and raise ``ConfigurationError``
    naming ``extra`` when it is missing. ``client`` is a ready driver object that the store
    uses as is and never closes.
    """

    extra: str

    def open(self, url: str, *, client: Any = None, **options: Any) -> Store: ...

    def open_async(self, url: str, *, client: Any = None, **options: Any) -> AsyncStore: ...
