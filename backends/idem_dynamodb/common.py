"""What the sync and async DynamoDB stores share besides the plans: the client's
configuration, given clients and sessions, the fork policy and the size limits."""

from __future__ import annotations

import os
from typing import Any

from idem_core.errors import ConfigurationError

from .errors import Errors
from .plans import Plans
from .settings import Settings


def client_config(settings: Settings, config_class: Any) -> Any:
    return config_class(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
        max_pool_connections=max(10, settings.pool_size * 2),
    )


def client_kwargs(settings: Settings, config_class: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"config": client_config(settings, config_class)}
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.region:
        kwargs["region_name"] = settings.region
    return kwargs


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


def split_client(client: Any, what: str) -> tuple[Any, Any]:
    """A ``client=`` argument as (given client, session): one of them or neither."""
    client = low_level(client)
    if client is None:
        return None, None
    if is_client(client):
        return client, None
    if hasattr(client, "client") or hasattr(client, "create_client"):
        return None, client
    raise ConfigurationError(
        f"client= must be {what} DynamoDB client or session, got {type(client)!r}"
    )


def session_client(session: Any, kwargs: dict[str, Any]) -> Any:
    """A client (sync) or client context (async) from a given session."""
    if hasattr(session, "create_client"):
        return session.create_client("dynamodb", **kwargs)
    return session.client("dynamodb", **kwargs)


def no_region() -> ConfigurationError:
    return ConfigurationError(
        "no AWS region: add ?region=... to the dynamodb:// URL or set AWS_REGION"
    )


class Shared:
    """The state both twins hold, built the same way."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.plans = Plans(settings)
        self.errors = Errors(settings)
        self.max_key_length = self.plans.codec.max_key_length
        #: bytes of result (after compression, when it applies) that ``complete`` stores
        self.max_result_size = self.plans.codec.max_result_size


class ForkGuard:
    """One fork policy for both stores: after ``os.fork()`` the child drops the parent's
    client unclosed (its sockets are the parent's) and builds its own on first use, from the
    URL or a given session. A given *client* is the caller's own object, holding the
    parent's connections: the child refuses it rather than share them or copy its
    credentials out of botocore's internals."""

    def __init__(self, given: Any) -> None:
        self.origin = self.pid = os.getpid()
        self.given = given

    def forked(self) -> bool:
        """True once per child process, on its first check."""
        if self.pid == os.getpid():
            return False
        self.pid = os.getpid()
        return True

    def check_given(self) -> None:
        if self.given is not None and os.getpid() != self.origin:
            raise ConfigurationError(
                "a DynamoDB store opened with client= (a ready client) cannot be used in a "
                "forked child: its connections belong to the parent. Open the store in the "
                "child, or pass a session (client=boto3.Session(...)) from which each "
                "process builds its own client"
            )
