"""Django: a view decorator and a middleware for the ``Idempotency-Key`` header.

``@idempotent_view(idem)`` guards one view. With a PostgreSQL store in the same database as
the view's (``transactional=True``, the default when it can), the record joins the view's
transaction: the claim, the view's writes and the stored response commit together in one
``transaction.atomic`` block, or not at all. A crash between the view's writes and the
response being stored can then not make a retry run the view again: either both are visible
or neither is.

``IdempotencyMiddleware`` guards every matching request (configured by
``settings.IDEMPOTENCY = {"idem": <Idempotency or dotted path>, **options}``); it stores
responses on the store's own connections, outside the view's transaction.

Options are those of :class:`~idem_core.integrations.http.HttpPolicy`; ``identify`` takes the
Django request (``identify=lambda request: request.user.pk``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connections, transaction
from django.http import HttpRequest as DjangoRequest
from django.http import HttpResponse, HttpResponseBase
from django.utils.module_loading import import_string

from ..errors import ConfigurationError, LeaseLost, ResultNotSerializable, StoreUnavailable
from .http import HttpPolicy, HttpRequest, Problem, StoredResponse

if TYPE_CHECKING:
    from ..api import Idempotency
    from ..call import Call

__all__ = ["IdempotencyMiddleware", "idempotent_view", "sqlalchemy_connection"]

logger = logging.getLogger("idem_core.django")

View = Callable[..., HttpResponseBase]


def _request_view(request: DjangoRequest) -> HttpRequest:
    headers = [
        (name.lower().encode("latin-1"), str(value).encode("latin-1"))
        for name, value in request.headers.items()
    ]
    return HttpRequest(
        str(request.method or "GET").upper(),
        request.path,
        str(request.META.get("QUERY_STRING", "")).encode("latin-1"),
        headers,
        request.body,
    )


def _as_response(answer: Problem | StoredResponse, replayed: bool = False) -> HttpResponse:
    body = answer.body
    response = HttpResponse(body, status=answer.status)
    if isinstance(answer, StoredResponse) and answer.reason:
        response.reason_phrase = answer.reason
    del response["Content-Type"]
    headers = answer.headers
    if replayed and isinstance(answer, StoredResponse):
        headers = HttpPolicy.replay_headers(answer)
    for name, value in headers:
        key = name.decode("latin-1")
        if key.lower() == "set-cookie":
            continue  # never stored; a problem sets none
        if key in response.headers:
            response.headers[key] += ", " + value.decode("latin-1")
        else:
            response.headers[key] = value.decode("latin-1")
    return response


def _response_parts(response: HttpResponseBase) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    render = getattr(response, "render", None)
    if callable(render) and not getattr(response, "is_rendered", True):
        render()
    if getattr(response, "streaming", False):
        body = b"".join(bytes(c) for c in response.streaming_content)
        response.streaming_content = [body]
    else:
        body = bytes(response.content)
    headers = [(k.encode("latin-1"), str(v).encode("latin-1")) for k, v in response.headers.items()]
    # Cookies live apart from the headers in Django: they are credentials, never stored.
    return response.status_code, headers, body


class _Guard:
    """The shared steps of the decorator and the middleware."""

    def __init__(self, idem: Idempotency, options: dict[str, Any]) -> None:
        self.idem = idem
        self.policy = HttpPolicy(**options)

    def prepare(
        self, request: DjangoRequest
    ) -> tuple[tuple[str, str], HttpRequest] | Problem | None:
        """(raw key, request view), a problem to answer, or None: run unguarded."""
        policy = self.policy
        method = str(request.method or "GET").upper()
        if not policy.applies(method, request.path_info, request):
            return None
        values = [v.encode("latin-1") for v in _header_values(request, policy.header)]
        key = policy.read_key(values)
        if key is None or isinstance(key, Problem):
            return key
        length = int(request.META.get("CONTENT_LENGTH") or 0)
        if length > policy.max_body_bytes:
            return policy.too_large()
        view = _request_view(request)
        identified = policy.identify(request) if policy.identify is not None else None
        identity = policy.scope_for(identified, view)
        if isinstance(identity, Problem):
            return identity
        return policy.raw_key(identity, key), view

    def run(
        self,
        request: DjangoRequest,
        respond: Callable[[], HttpResponseBase],
        connection: Any = None,
    ) -> HttpResponseBase:
        prepared = self.prepare(request)
        if prepared is None:
            return respond()
        if isinstance(prepared, Problem):
            return _as_response(prepared)
        raw, view = prepared
        try:
            call = self.idem.claim(
                raw,
                payload=self.policy.fingerprint(view),
                connection=connection,
                **self.policy.claim_options(),
            )
            call.enter()
            # A replay's result is read here: a first response that could not be stored
            # raises ResultNotSerializable, answered below.
            stored = call.result if call.replayed else None
        except Exception as exc:
            answer = self.policy.claim_problem(exc, request.path)
            if answer is None:
                raise
            return _as_response(answer)
        if stored is not None:
            return _as_response(stored, replayed=True)
        try:
            response = respond()
            status, headers, body = _response_parts(response)
        except BaseException:
            _quietly(call.release)
            raise
        self._settle(call, status, headers, body, response.reason_phrase)
        return response

    def _settle(
        self, call: Call, status: int, headers: list[tuple[bytes, bytes]], body: bytes, reason: str
    ) -> None:
        stored = self.policy.to_store(status, headers, body, reason)
        if stored is None:
            _quietly(call.release)
            return
        try:
            call.complete(stored)
        except ResultNotSerializable:
            logger.warning("response for %r not stored: the store refused it", call.key)
        except (LeaseLost, StoreUnavailable):
            logger.warning("could not store the response for %r", call.key, exc_info=True)


def _header_values(request: DjangoRequest, header: str) -> list[str]:
    meta = "HTTP_" + header.upper().replace("-", "_")
    value = request.META.get(meta)
    return [] if value is None else [str(value)]


def idempotent_view(
    idem: Idempotency,
    *,
    using: str = "default",
    transactional: bool | None = None,
    **options: Any,
) -> Callable[[View], View]:
    """Guard a view. ``transactional``: run the view, the claim and the stored response in
    one ``transaction.atomic(using=using)`` block on Django's own connection (needs an SQL
    store on that database; default: when the store is SQL and the database PostgreSQL).
    Views joined this way must not commit on their own (no ``transaction.commit()``)."""
    guard = _Guard(idem, {"methods": ("POST", "PUT", "PATCH", "DELETE"), **options})

    def decorate(view: View) -> View:
        if inspect.iscoroutinefunction(view):
            raise ConfigurationError(
                f"{view.__qualname__} is an async view: idempotent_view guards sync views; "
                "serve async views through idem_core.integrations.asgi.IdempotencyMiddleware"
            )

        @functools.wraps(view)
        def wrapper(request: DjangoRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            def respond() -> HttpResponseBase:
                return view(request, *args, **kwargs)

            joined = _joins(idem, using) if transactional is None else transactional
            if not joined:
                return guard.run(request, respond)
            with transaction.atomic(using=using), sqlalchemy_connection(using) as conn:
                return guard.run(request, respond, connection=conn)

        return wrapper

    return decorate


def _joins(idem: Idempotency, using: str) -> bool:
    if not hasattr(idem.store, "bind"):
        return False
    return str(connections[using].vendor) == "postgresql"


class IdempotencyMiddleware:
    """``MIDDLEWARE = [..., "idem_core.integrations.django.IdempotencyMiddleware"]`` after
    the session and authentication middleware, with ``settings.IDEMPOTENCY``."""

    def __init__(self, get_response: Callable[[DjangoRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        config = dict(getattr(settings, "IDEMPOTENCY", {}))
        idem = config.pop("idem", None)
        if isinstance(idem, str):
            idem = import_string(idem)
        if idem is None:
            raise ConfigurationError(
                "set settings.IDEMPOTENCY = {'idem': <an Idempotency or its dotted path>, ...}"
            )
        self.guard = _Guard(idem, config)

    def __call__(self, request: DjangoRequest) -> HttpResponseBase:
        return self.guard.run(request, lambda: self.get_response(request))


# -- Django's connection as a SQLAlchemy Connection -----------------------------------------


class _Borrowed:
    """Django's DBAPI connection lent to SQLAlchemy: Django owns its transaction and its
    life, so SQLAlchemy's commit, rollback and close are no-ops on it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


_engines: dict[str, Any] = {}


@contextmanager
def sqlalchemy_connection(using: str = "default") -> Iterator[Any]:
    """A SQLAlchemy ``Connection`` on Django's own connection to ``using`` (inside its
    current transaction): ``idem.claim(key, connection=conn)`` then commits with the view.
    Also what a view can use to run SQLAlchemy statements in the same transaction."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    django_conn = connections[using]
    if django_conn.vendor != "postgresql":
        raise ConfigurationError(f"database {using!r} is not PostgreSQL")
    django_conn.ensure_connection()
    engine = _engines.get(using)
    if engine is None:
        engine = create_engine(
            "postgresql+psycopg://",
            creator=lambda: _Borrowed(connections[using].connection),
            poolclass=NullPool,
            pool_reset_on_return=None,
            use_native_hstore=False,  # its type lookup wants a bare psycopg Connection
        )
        _engines[using] = engine
    if not django_conn.in_atomic_block:
        ctx: Any = transaction.atomic(using=using)
    else:
        ctx = nullcontext()
    with ctx, engine.connect() as conn:
        yield conn


def _quietly(op: Callable[[], None]) -> None:
    try:
        op()
    except Exception:
        logger.warning("could not release an idempotency key", exc_info=True)
