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
from .errors import require_driver
from .plans import Call, Plan, sleep_seconds
from .settings import Settings
from .wire import lean, resolve
from .wire.client import OPERATIONS, WireClient

T = TypeVar("T")


class DynamoDBStore(Shared):
    """Idempotency records in one DynamoDB table; leases are taken over by watching them
    (see ``Plans.watched``), never by comparing two machines' clocks."""

    server_clock = False

    def __init__(self, settings: Settings, client: Any = None) -> None:
        require_driver("boto3")
        super().__init__(settings)
        self._given, self._session = split_client(client, "a boto3")
        self._fork = ForkGuard(self._given)
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._lean = lean.enabled(settings, self._given, self._session)
        self._wire: WireClient | None = None
        if not self._lean:
            self.errors.drivers()  # boto3 from the first request

    # -- the client -----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client in use; a forked child builds its own on first use."""
        if self._fork.forked():
            self._drop_parents()
        if self._client is None:
            self._fork.check_given()
            with self._lock:
                if self._client is None:
                    self._client = self._given if self._given is not None else self._build()
        return self._client

    def _drop_parents(self) -> None:
        # The parent's sockets and threads are not ours: drop them without closing.
        self._lock = threading.Lock()
        self._pool = self._client = self._wire = None

    def _lean_client(self) -> WireClient:
        """The lean path's client (:mod:`idem_dynamodb.wire`), built on first use without
        botocore when the URL and the environment say everything (a Lambda function)."""
        if self._fork.forked():
            self._drop_parents()
        wire = self._wire
        if wire is None:
            s = self.settings
            found = resolve.fast(s)
            if found is None:
                self.errors.drivers()  # botocore's credential chain
                found = resolve.slow(s)
            endpoint, region = found.endpoint, found.region
            if endpoint is None:  # only botocore's endpoint rules know it
                endpoint, region = self.client.meta.endpoint_url, self.client.meta.region_name
            if not region:
                raise no_region()
            wire = lean.sync_client(s, found, endpoint, region)
            with self._lock:
                if self._wire is None:
                    self._wire = wire
                else:
                    wire = self._wire
        return wire

    def _build(self) -> Any:
        boto3 = import_driver("boto3", "dynamodb")
        botocore_exc = import_driver("botocore.exceptions", "dynamodb")
        self.errors.drivers()
        s = self.settings
        kwargs = client_kwargs(s, import_driver("botocore.config", "dynamodb").Config)
        try:
            if self._session is not None:
                return session_client(self._session, kwargs)
            session = boto3.session.Session(profile_name=s.profile)
            if not s.region and not session.region_name:
                raise no_region()
            return session.client("dynamodb", **kwargs)
        except botocore_exc.BotoCoreError as exc:
            raise ConfigurationError(f"cannot create a DynamoDB client: {exc}") from exc

    # -- the driver: every request of every operation passes here -------------------------

    def _run(self, plan: Plan[T]) -> T:
        try:
            errors = self.errors
            call = next(plan)
            while True:
                pause = sleep_seconds(call)
                if pause is not None:
                    time.sleep(pause)
                    call = plan.send({})
                    continue
                try:
                    reply = self._send(call)
                except errors.transient as exc:  # read when an error is caught
                    reply = errors.reply(call, exc)
                call = plan.send(reply)
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            plan.close()

    def _send(self, call: Call) -> Any:
        if self._lean and call.op in OPERATIONS:
            return self._lean_client().call(call.op, call.kwargs)
        return getattr(self.client, call.op)(**call.kwargs)

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
            self._pool = self._client = self._wire = None  # the parent's: not ours to close
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()
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
