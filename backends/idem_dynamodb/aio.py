"""The asyncio DynamoDB store, on aiobotocore (aioboto3 sessions and clients accepted)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, TypeVar

from idem_core.errors import ConfigurationError
from idem_core.record import ClaimRequest, ClaimResult, Record
from idem_core.registry import import_driver

from .plans import Failed, Plan, Plans, sleep_seconds
from .settings import Settings
from .store import (
    MAX_KEY_PARTITION,
    MAX_KEY_SORT,
    client_config,
    is_client,
    low_level,
    unavailable,
)

T = TypeVar("T")


class AsyncDynamoDBStore:
    """The asyncio twin of :class:`~idem_dynamodb.store.DynamoDBStore`: same table, same rules.

    The client is created on first use inside the running event loop and belongs to it.
    """

    server_clock = False

    def __init__(self, settings: Settings, client: Any = None) -> None:
        import_driver("aiobotocore", "dynamodb")
        self._botocore_exc = import_driver("botocore.exceptions", "dynamodb")
        self.settings = settings
        self.plans = Plans(settings)
        self.max_key_length = MAX_KEY_SORT if settings.sort_key else MAX_KEY_PARTITION
        client = low_level(client)
        self._given = client if client is not None and is_client(client) else None
        self._session = client if client is not None and self._given is None else None
        if self._session is not None and not (
            hasattr(self._session, "client") or hasattr(self._session, "create_client")
        ):
            raise ConfigurationError(
                "client= must be an aiobotocore/aioboto3 DynamoDB client or session, "
                f"got {type(client)!r}"
            )
        self._client: Any = None
        self._context: Any = None
        self._lock: asyncio.Lock | None = None
        self._pid = os.getpid()

    async def _get_client(self) -> Any:
        if self._pid != os.getpid():
            # A forked child must not touch the parent's connections: start afresh.
            self._pid = os.getpid()
            self._client = self._context = self._lock = None
            if self._given is not None:
                raise ConfigurationError(
                    "an async DynamoDB store opened with client= cannot be used after "
                    "os.fork(); open the store again in the child"
                )
        if self._given is not None:
            return self._given
        if self._client is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._client is None:
                    self._client = await self._build()
        return self._client

    async def _build(self) -> Any:
        s = self.settings
        config = client_config(s, import_driver("aiobotocore.config", "dynamodb").AioConfig)
        kwargs: dict[str, Any] = {"config": config}
        if s.endpoint_url:
            kwargs["endpoint_url"] = s.endpoint_url
        if s.region:
            kwargs["region_name"] = s.region
        try:
            if self._session is not None:
                if hasattr(self._session, "create_client"):
                    context = self._session.create_client("dynamodb", **kwargs)
                else:
                    context = self._session.client("dynamodb", **kwargs)
            else:
                session_mod = import_driver("aiobotocore.session", "dynamodb")
                session = session_mod.AioSession(profile=s.profile)
                if not s.region and not session.get_config_variable("region"):
                    raise ConfigurationError(
                        "no AWS region: add ?region=... to the dynamodb:// URL or set AWS_REGION"
                    )
                context = session.create_client("dynamodb", **kwargs)
            client = await context.__aenter__()
        except self._botocore_exc.BotoCoreError as exc:
            raise ConfigurationError(f"cannot create a DynamoDB client: {exc}") from exc
        self._context = context
        return client

    async def _run(self, plan: Plan[T]) -> T:
        client = await self._get_client()
        client_error = self._botocore_exc.ClientError
        boto_error = self._botocore_exc.BotoCoreError
        try:
            call = next(plan)
            while True:
                pause = sleep_seconds(call)
                if pause is not None:
                    await asyncio.sleep(pause)
                    call = plan.send({})
                    continue
                reply: dict[str, Any] | Failed
                try:
                    reply = await getattr(client, call.op)(**call.kwargs)
                except client_error as exc:
                    code = str(exc.response.get("Error", {}).get("Code", ""))
                    if code not in call.expect:
                        raise unavailable(self.settings, exc) from exc
                    reply = Failed(code, exc.response, exc)
                except (boto_error, OSError) as exc:
                    raise unavailable(self.settings, exc) from exc
                call = plan.send(reply)
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            plan.close()

    # -- the AsyncStore protocol ----------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        return await self._run(self.plans.claim(request))

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        # DynamoDB has no batched conditional write: the claims go out side by side.
        await self._get_client()
        return list(await asyncio.gather(*(self.claim(r) for r in requests)))

    async def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        return await self._run(self.plans.complete(key, fence, result, ttl, with_items))

    async def release(self, key: str, fence: int) -> None:
        await self._run(self.plans.release(key, fence))

    async def renew(self, key: str, fence: int, lease: float) -> Record:
        return await self._run(self.plans.renew(key, fence, lease))

    async def get(self, key: str) -> Record | None:
        return await self._run(self.plans.get(key))

    async def delete(self, key: str) -> None:
        await self._run(self.plans.delete(key))

    async def now(self) -> int:
        return self.plans.clock()

    async def close(self) -> None:
        context, self._context, self._client = self._context, None, None
        if context is not None and self._pid == os.getpid():
            await context.__aexit__(None, None, None)

    # -- optional capabilities ------------------------------------------------------------

    async def setup(self) -> str:
        """Create the table (on-demand) and turn TTL on; says what it did."""
        return await self._run(self.plans.setup())

    async def diagnostics(self) -> dict[str, object]:
        """Key schema, TTL, and whether a failed claim returns the record in one request."""
        return await self._run(self.plans.diagnostics())

    async def __aenter__(self) -> AsyncDynamoDBStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
