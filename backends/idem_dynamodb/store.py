"""The synchronous DynamoDB store, on boto3."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from idem_core.errors import ConfigurationError, StoreUnavailable
from idem_core.record import ClaimRequest, ClaimResult, Record
from idem_core.registry import import_driver

from .plans import NOT_FOUND, Failed, Plan, Plans, sleep_seconds
from .settings import Settings

T = TypeVar("T")

#: DynamoDB keys: 2048 bytes for a partition key, 1024 for a sort key. Counted in characters
#: of up to 4 UTF-8 bytes each, so any key this long fits.
MAX_KEY_PARTITION = 512
MAX_KEY_SORT = 256


def client_config(settings: Settings, config_class: Any) -> Any:
    return config_class(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
        max_pool_connections=max(10, settings.pool_size * 2),
    )


def unavailable(settings: Settings, exc: BaseException) -> StoreUnavailable:
    """A driver error as StoreUnavailable, with a hint where one helps."""
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    if code == NOT_FOUND:
        return StoreUnavailable(
            f"DynamoDB table {settings.table!r} does not exist; create it with "
            f"`idem setup dynamodb://{settings.table}?...` ({exc})"
        )
    return StoreUnavailable(f"DynamoDB request on table {settings.table!r} failed: {exc}")


def is_client(obj: Any) -> bool:
    return hasattr(obj, "put_item") and hasattr(getattr(obj, "meta", None), "service_model")


def low_level(obj: Any) -> Any:
    """``obj``, refused when it is a boto3 resource: a resource's client converts attribute
    values itself, so it cannot carry the low-level requests of this store."""
    meta = getattr(obj, "meta", None)
    if meta is not None and not is_client(obj) and is_client(getattr(meta, "client", None)):
        raise ConfigurationError(
            "client= must be a low-level DynamoDB client (boto3.client('dynamodb')) or a "
            "session, not a resource such as dynamodb.Table(...)"
        )
    return obj


class DynamoDBStore:
    """Idempotency records in one DynamoDB table, judged by the client's clock."""

    server_clock = False

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self._boto3 = import_driver("boto3", "dynamodb")
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
                f"client= must be a boto3 DynamoDB client or session, got {type(client)!r}"
            )
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    # -- the client -----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client in use; a forked child builds its own on first use."""
        if self._pid != os.getpid():
            self._after_fork()
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._given if self._given is not None else self._build()
        return self._client

    def _after_fork(self) -> None:
        # The parent's sockets and threads are not ours: drop them without closing.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool = None
        self._client = None
        if self._given is not None:
            # Ours from now on, so close() closes it.
            self._client, self._given = _rebuild(self._given, self._boto3), None

    def _build(self) -> Any:
        s = self.settings
        config = client_config(s, import_driver("botocore.config", "dynamodb").Config)
        kwargs: dict[str, Any] = {"config": config}
        if s.endpoint_url:
            kwargs["endpoint_url"] = s.endpoint_url
        if s.region:
            kwargs["region_name"] = s.region
        try:
            if self._session is not None:
                if hasattr(self._session, "create_client"):
                    return self._session.create_client("dynamodb", **kwargs)
                return self._session.client("dynamodb", **kwargs)
            session = self._boto3.session.Session(profile_name=s.profile)
            if not s.region and not session.region_name:
                raise ConfigurationError(
                    "no AWS region: add ?region=... to the dynamodb:// URL or set AWS_REGION"
                )
            return session.client("dynamodb", **kwargs)
        except self._botocore_exc.BotoCoreError as exc:
            raise ConfigurationError(f"cannot create a DynamoDB client: {exc}") from exc

    # -- the driver -----------------------------------------------------------------------

    def _run(self, plan: Plan[T]) -> T:
        client = self.client
        client_error = self._botocore_exc.ClientError
        boto_error = self._botocore_exc.BotoCoreError
        try:
            call = next(plan)
            while True:
                pause = sleep_seconds(call)
                if pause is not None:
                    time.sleep(pause)
                    call = plan.send({})
                    continue
                reply: dict[str, Any] | Failed
                try:
                    reply = getattr(client, call.op)(**call.kwargs)
                except client_error as exc:
                    code = str(exc.response.get("Error", {}).get("Code", ""))
                    if code not in call.expect:
                        raise unavailable(self.settings, exc) from exc
                    reply = Failed(code, exc.response, exc)
                except boto_error as exc:
                    raise unavailable(self.settings, exc) from exc
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
        # DynamoDB has no batched conditional write: the claims go out side by side.
        if len(requests) <= 1:
            return [self.claim(r) for r in requests]
        _ = self.client  # built once, before the threads share it
        return list(self._executor().map(self.claim, requests))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():
            self._after_fork()
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
        self._run(self.plans.delete(key))

    def now(self) -> int:
        return self.plans.clock()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=True)
        client, self._client = self._client, None
        if client is not None and client is not self._given and self._pid == os.getpid():
            client.close()

    # -- optional capabilities ------------------------------------------------------------

    def setup(self) -> str:
        """Create the table (on-demand) and turn TTL on; says what it did."""
        return self._run(self.plans.setup())

    def diagnostics(self) -> dict[str, object]:
        """Key schema, TTL, and whether a failed claim returns the record in one request."""
        return self._run(self.plans.diagnostics())

    def __enter__(self) -> DynamoDBStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rebuild(client: Any, boto3: Any) -> Any:
    """A new client with a given client's endpoint, region, config and credentials."""
    meta = client.meta
    kwargs: dict[str, Any] = {
        "region_name": meta.region_name,
        "endpoint_url": meta.endpoint_url,
        "config": meta.config,
    }
    # Credentials live on the request signer; there is no public accessor for them.
    credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        kwargs.update(
            aws_access_key_id=frozen.access_key,
            aws_secret_access_key=frozen.secret_key,
            aws_session_token=frozen.token,
        )
    return boto3.session.Session().client("dynamodb", **kwargs)
