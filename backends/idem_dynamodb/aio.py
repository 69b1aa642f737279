"""The asyncio DynamoDB store, on aiobotocore (aioboto3 sessions and clients accepted)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any, TypeVar

from idem_core.errors import ConfigurationError
from idem_core.record import ClaimRequest, ClaimResult, Record
from idem_core.registry import import_driver

from . import batch, steps
from .common import ForkGuard, Shared, client_kwargs, no_region, session_client, split_client
from .errors import require_driver
from .plans import Call, Plan, sleep_seconds
from .settings import Settings
from .wire import lean, resolve
from .wire.aio_http import AsyncWireClient
from .wire.protocol import OPERATIONS

T = TypeVar("T")
_running = asyncio.get_running_loop


class _Bound:
    """The store's own client in one event loop, and the guard that closes it there.

    aiohttp's session belongs to the loop it was opened in and can only be closed inside
    it. A store is often abandoned, not closed, when its loop ends (``asyncio.run`` returns;
    ``Idempotency`` keeps one async store per loop). The guard is an async generator started
    in the loop: ``asyncio.run`` (and ``asyncio.Runner``, pytest-asyncio) call
    ``loop.shutdown_asyncgens()`` before closing the loop, which runs the guard's ``finally``
    while the loop still runs, so the client is closed cleanly and nothing is reported.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.context: Any = None
        self.client: Any = None
        #: the lean path's client (its connections belong to this loop too)
        self.wire: AsyncWireClient | None = None
        self.guard: AsyncGenerator[None, None] | None = None
        self.lock = asyncio.Lock()

    async def start_guard(self) -> None:
        self.guard = _guard(self)
        await self.guard.__anext__()

    async def aclose(self) -> None:
        wire, self.wire = self.wire, None
        if wire is not None:
            wire.close()
        context, self.context, self.client = self.context, None, None
        if context is not None:
            await context.__aexit__(None, None, None)


async def _guard(bound: _Bound) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        # Only when the loop shuts its async generators down (or the store is dropped while
        # the loop runs): close quietly, an error here would be printed by the loop.
        with contextlib.suppress(Exception):
            await bound.aclose()


class AsyncDynamoDBStore(Shared):
    """The asyncio twin of :class:`~idem_dynamodb.store.DynamoDBStore`: same table, same rules.

    The store's own client is created on first use inside the running event loop and
    belongs to it; once that loop has closed, the next use in another loop builds a new
    client. Using the store from two live loops at once is refused: open one per loop.
    A given client is used as is, in whatever loop the caller uses it.
    """

    server_clock = False

    def __init__(self, settings: Settings, client: Any = None) -> None:
        require_driver("aiobotocore")
        super().__init__(settings)
        self._given, self._session = split_client(client, "an aiobotocore/aioboto3")
        self._fork = ForkGuard(self._given)
        self._bound: _Bound | None = None
        self._lean = lean.enabled(settings, self._given, self._session)
        if not self._lean:
            self.errors.drivers()  # aiobotocore from the first request

    # -- the client -----------------------------------------------------------------------

    async def _get_client(self) -> Any:
        if self._fork.forked():
            # The parent's connections are not ours: drop them without closing.
            self._bound = None
        bound = self._bound
        if bound is not None and bound.client is not None and bound.loop is _running():
            return bound.client
        return await self._slow_client()

    async def _here(self) -> _Bound:
        """The running loop's bound state, refusing a store whose loop is still open."""
        loop = asyncio.get_running_loop()
        bound = self._bound
        if bound is not None and bound.loop is not loop:
            if not bound.loop.is_closed():
                raise ConfigurationError(
                    "this async DynamoDB store's client belongs to another event loop that is "
                    "still open; open one store per event loop"
                )
            bound = None  # its loop is gone: abandoned (closed by its guard, if it ran)
        if bound is None:
            bound = self._bound = _Bound(loop)
        if bound.guard is None:
            await bound.start_guard()
        return bound

    async def _slow_client(self) -> Any:
        self._fork.check_given()
        if self._given is not None:
            return self._given
        bound = await self._here()
        async with bound.lock:
            if bound.client is None:
                context = self._client_context()
                try:
                    bound.client = await context.__aenter__()
                except import_driver("botocore.exceptions", "dynamodb").BotoCoreError as exc:
                    raise ConfigurationError(f"cannot create a DynamoDB client: {exc}") from exc
                bound.context = context
        return bound.client

    async def _get_wire(self) -> AsyncWireClient:
        """The lean path's client in the running loop (see the sync store's)."""
        if self._fork.forked():
            self._bound = None  # the parent's connections: dropped without closing
        bound = self._bound
        if bound is not None and bound.wire is not None and bound.loop is _running():
            return bound.wire
        bound = await self._here()
        if bound.wire is None:
            s = self.settings
            found = resolve.fast(s)
            if found is None:  # botocore's chain may block on a request: not in the loop
                self.errors.drivers()
                found = await asyncio.to_thread(resolve.slow, s)
            endpoint, region = found.endpoint, found.region
            if endpoint is None:  # only botocore's endpoint rules know it
                meta = (await self._get_client()).meta
                endpoint, region = meta.endpoint_url, meta.region_name
            if not region:
                raise no_region()
            if bound.wire is None:
                bound.wire = lean.async_client(s, found, endpoint, region)
        return bound.wire

    def _client_context(self) -> Any:
        botocore_exc = import_driver("botocore.exceptions", "dynamodb")
        self.errors.drivers()
        s = self.settings
        kwargs = client_kwargs(s, import_driver("aiobotocore.config", "dynamodb").AioConfig)
        try:
            if self._session is not None:
                return session_client(self._session, kwargs)
            session_mod = import_driver("aiobotocore.session", "dynamodb")
            session = session_mod.AioSession(profile=s.profile)
            if not s.region and not session.get_config_variable("region"):
                raise no_region()
            return session.create_client("dynamodb", **kwargs)
        except botocore_exc.BotoCoreError as exc:
            raise ConfigurationError(f"cannot create a DynamoDB client: {exc}") from exc

    # -- the driver: every request of every operation passes here -------------------------

    async def _run(self, plan: Plan[T]) -> T:
        try:
            errors = self.errors
            call = next(plan)
            while True:
                pause = sleep_seconds(call)
                if pause is not None:
                    await asyncio.sleep(pause)
                    call = plan.send({})
                    continue
                try:
                    reply = await self._send(call)
                except errors.transient as exc:  # read when an error is caught
                    reply = errors.reply(call, exc)
                call = plan.send(reply)
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            plan.close()

    async def _send(self, call: Call) -> Any:
        if self._lean and call.op in OPERATIONS:
            return await (await self._get_wire()).call(call.op, call.kwargs)
        return await getattr(await self._get_client(), call.op)(**call.kwargs)

    # -- the AsyncStore protocol ----------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        return await self._run(self.plans.claim(request))

    async def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        if batch.batched(self.settings, requests):
            return await self._run(batch.claim_many(self.plans, requests))
        # A key or two: the claims go out side by side, one request each.
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
        await self._run(steps.delete_plan(self.plans, key))
        await self._run(self.plans.delete(key))

    async def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        """Record a step for the holder of ``fence`` (see :mod:`idem_dynamodb.steps`)."""
        await self._run(steps.record_plan(self.plans, key, fence, name, data, until))

    async def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        return await self._run(steps.load_plan(self.plans, key))

    async def now(self) -> int:
        return self.plans.clock()

    async def close(self) -> None:
        """Close the store's own client, inside the loop it belongs to; a client whose loop
        is gone (or another process's) is dropped unclosed."""
        bound, self._bound = self._bound, None
        if self._fork.forked() or bound is None:
            return
        guard, bound.guard = bound.guard, None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if bound.loop is running:
            await bound.aclose()
            if guard is not None:
                await guard.aclose()  # finished: nothing left for the loop's shutdown

    aclose = close

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
