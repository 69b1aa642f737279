"""Fault injection around any store: fail before an operation, or after it was applied."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from ..errors import StoreUnavailable
from ..record import ClaimRequest, ClaimResult, Record
from ..store import AsyncStore, Store

When = Literal["before", "after"]


class InjectedFault(ConnectionError):
    """The driver-level error a fault stands for."""


class _Faults:
    def __init__(self) -> None:
        self.plan: dict[str, When] = {}

    def fail_next(self, op: str, when: When) -> None:
        """Make the next call of ``op`` fail: ``before`` it reaches the store, or ``after`` it
        was applied, as when the reply is lost on the network."""
        self.plan[op] = when

    def _take(self, op: str) -> When | None:
        return self.plan.pop(op, None)

    @staticmethod
    def _raise(op: str) -> StoreUnavailable:
        err = StoreUnavailable(f"injected fault in {op}")
        err.__cause__ = InjectedFault(op)
        return err


class FaultyStore(_Faults):
    """A :class:`~idem_core.Store` proxy whose next call of an operation can be made to fail."""

    def __init__(self, inner: Store) -> None:
        super().__init__()
        self.inner = inner
        self.max_key_length = inner.max_key_length
        self.server_clock = inner.server_clock

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        when = self._take(op)
        if when == "before":
            raise self._raise(op)
        out = getattr(self.inner, op)(*args, **kwargs)
        if when == "after":
            raise self._raise(op)
        return out

    def claim(self, request: ClaimRequest) -> ClaimResult:
        return self._call("claim", request)  # type: ignore[no-any-return]

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        return self._call("claim_many", requests)  # type: ignore[no-any-return]

    def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        return self._call("complete", key, fence, result, ttl, with_items=with_items)  # type: ignore[no-any-return]

    def release(self, key: str, fence: int) -> None:
        self._call("release", key, fence)

    def renew(self, key: str, fence: int, lease: float) -> Record:
        return self._call("renew", key, fence, lease)  # type: ignore[no-any-return]

    def get(self, key: str) -> Record | None:
        return self._call("get", key)  # type: ignore[no-any-return]

    def delete(self, key: str) -> None:
        self._call("delete", key)

    def now(self) -> int:
        return self.inner.now()

    def close(self) -> None:
        self.inner.close()


class AsyncFaultyStore(_Faults):
    """The asyncio twin of :class:`FaultyStore`."""

    def __init__(self, inner: AsyncStore) -> None:
        super().__init__()
        self.inner = inner
        self.max_key_length = inner.max_key_length
        self.server_clock = inner.server_clock

    async def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        when = self._take(op)
        if when == "before":
            raise self._raise(op)
        out = await getattr(self.inner, op)(*args, **kwargs)
        if when == "after":
            raise self._raise(op)
        return out

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        return await self._call("claim", request)  # type: ignore[no-any-return]

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        return await self._call("claim_many", requests)  # type: ignore[no-any-return]

    async def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        return await self._call("complete", key, fence, result, ttl, with_items=with_items)  # type: ignore[no-any-return]

    async def release(self, key: str, fence: int) -> None:
        await self._call("release", key, fence)

    async def renew(self, key: str, fence: int, lease: float) -> Record:
        return await self._call("renew", key, fence, lease)  # type: ignore[no-any-return]

    async def get(self, key: str) -> Record | None:
        return await self._call("get", key)  # type: ignore[no-any-return]

    async def delete(self, key: str) -> None:
        await self._call("delete", key)

    async def now(self) -> int:
        return await self.inner.now()

    async def close(self) -> None:
        await self.inner.close()
