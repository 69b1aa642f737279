"""The synchronous DynamoDB store, on boto3."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from idem_core.errors import ConfigurationError
from idem_core.record import ClaimRequest, ClaimResult, Record
from idem_core.registry import import_driver
from idem_core.scanning import DEFAULT_PAGE, ScanFilter

from . import batch, steps
from .common import ForkGuard, Shared, client_kwargs, no_region, session_client, split_client
from .plans import Plan, sleep_seconds
from .settings import Settings

T = TypeVar("T")


class DynamoDBStore(Shared):
    """Idempotency records in one DynamoDB table; leases are taken over by watching them
    (see ``Plans.watched``), never by comparing two machines' clocks."""

    server_clock = False

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self._boto3 = import_driver("boto3", "dynamodb")
        self._botocore_exc = import_driver("botocore.exceptions", "dynamodb")
        super().__init__(settings)
        self._given, self._session = split_client(client, "a boto3")
        self._fork = ForkGuard(self._given)
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- the client -----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client in use; a forked child builds its own on first use."""
        if self._fork.forked():
            # The parent's sockets and threads are not ours: drop them without closing.
            self._lock = threading.Lock()
            self._pool = self._client = None
        if self._client is None:
            self._fork.check_given()
            with self._lock:
                if self._client is None:
                    self._client = self._given if self._given is not None else self._build()
        return self._client

    def _build(self) -> Any:
        s = self.settings
        kwargs = client_kwargs(s, import_driver("botocore.config", "dynamodb").Config)
        try:
            if self._session is not None:
                return session_client(self._session, kwargs)
            session = self._boto3.session.Session(profile_name=s.profile)
            if not s.region and not session.region_name:
                raise no_region()
            return session.client("dynamodb", **kwargs)
        except self._botocore_exc.BotoCoreError as exc:
            raise ConfigurationError(f"cannot create a DynamoDB client: {exc}") from exc

    # -- the driver: every request of every operation passes here -------------------------

    def _run(self, plan: Plan[T]) -> T:
        try:
            client = self.client
            transient = self.errors.transient
            call = next(plan)
            while True:
                pause = sleep_seconds(call)
                if pause is not None:
                    time.sleep(pause)
                    call = plan.send({})
                    continue
                try:
                    reply = getattr(client, call.op)(**call.kwargs)
                except transient as exc:
                    reply = self.errors.reply(call, exc)
                call = plan.send(reply)
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            plan.close()

    # -- the Store protocol ---------------------------------------------------------------

    def claim(self, request: ClaimRequest) -> ClaimResult:
        return self._run(self.plans.claim(request))

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[ClaimResult]:
        if batch.batched(self.settings, requests):
            return self._run(batch.claim_many(self.plans, requests))
        # A key or two: the claims go out side by side, one request each.
        if len(requests) <= 1:
            return [self.claim(r) for r in requests]
        _ = self.client  # built once, before the threads share it
        return list(self._executor().map(self.claim, requests))

    def _executor(self) -> ThreadPoolExecutor:
        _ = self.client  # the fork check
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max_workers=self.settings.pool_size, thread_name_prefix="idem-dynamodb"
                    )
        return self._pool

    def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        return self._run(self.plans.complete(key, fence, result, ttl, with_items))

    def release(self, key: str, fence: int) -> None:
        self._run(self.plans.release(key, fence))

    def renew(self, key: str, fence: int, lease: float) -> Record:
        return self._run(self.plans.renew(key, fence, lease))

    def get(self, key: str) -> Record | None:
        return self._run(self.plans.get(key))

    def delete(self, key: str) -> None:
        self._run(steps.delete_plan(self.plans, key))
        self._run(self.plans.delete(key))

    def record_step(self, key: str, fence: int, name: str, data: bytes, until: int) -> None:
        """Record a step for the holder of ``fence`` (see :mod:`idem_dynamodb.steps`)."""
        self._run(steps.record_plan(self.plans, key, fence, name, data, until))

    def load_steps(self, key: str) -> dict[str, tuple[int, bytes]]:
        return self._run(steps.load_plan(self.plans, key))

    def now(self) -> int:
        return self.plans.clock()

    def close(self) -> None:
        if self._fork.forked():
            self._pool = self._client = None  # the parent's: not ours to close
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        client, self._client = self._client, None
        if client is not None and client is not self._given:
            client.close()

    # -- optional capabilities ------------------------------------------------------------

    def setup(self) -> str:
        """Create the table (on-demand) and turn TTL on; says what it did."""
        return self._run(self.plans.setup())

    @property
    def scan_note(self) -> str:
        """What ``idem ls`` says about listing this table (:mod:`idem_dynamodb.scan`)."""
        from .scan import note

        return note(self.plans)

    def scan(self, where: ScanFilter, page_size: int = DEFAULT_PAGE) -> Iterator[list[Record]]:
        """Pages of the records ``where`` selects: a paginated Scan (a full table read) or,
        on a shared table, a Query on the namespace's partition."""
        from .scan import scan_pages

        return scan_pages(self, where, page_size)

    def diagnostics(self) -> dict[str, object]:
        """Key schema, TTL, and whether a failed claim returns the record in one request."""
        return self._run(self.plans.diagnostics())

    def __enter__(self) -> DynamoDBStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
