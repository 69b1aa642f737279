"""FastAPI: guard single routes with a dependency, not only the whole app with middleware.

::

    from fastapi import Depends, FastAPI
    from idem_core.integrations.fastapi import IdempotencyKey, IdempotentRoute

    app = FastAPI()
    app.router.route_class = IdempotentRoute      # before the routes are declared
    guard = IdempotencyKey(idem)

    @app.post("/payments", dependencies=[Depends(guard)])
    async def pay(...): ...

The dependency declares the ``Idempotency-Key`` header in the OpenAPI schema of exactly the
routes it guards. The work itself (claim, replay, storing the response before it is sent) is
the ASGI middleware's, applied by :class:`IdempotentRoute` to each route that depends on a
guard: a route's response is only visible below the dependency system, in its ASGI app. A
guarded route whose route class is not :class:`IdempotentRoute` answers 500 instead of running
unprotected (fail closed).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, cast

from fastapi import Depends, Header, HTTPException, Request, Response
from fastapi.routing import APIRoute

from .asgi import CONNECTION_STATE, IdempotencyMiddleware

if TYPE_CHECKING:
    from fastapi.dependencies.models import Dependant

    from ..api import Idempotency

__all__ = ["IdempotencyKey", "IdempotentRoute"]

_MARK = "idem_core.guarded"


class IdempotencyKey:
    """A route dependency: ``dependencies=[Depends(IdempotencyKey(idem, **options))]``.

    ``options`` are those of :class:`~idem_core.integrations.http.HttpPolicy` except
    ``methods`` and ``routes`` (the route decides); ``identify`` takes the ASGI scope.
    With ``engine=`` (a SQLAlchemy ``AsyncEngine`` on the SQL store's database), each guarded
    request runs in one transaction, and ``Depends(guard.connection)`` hands the endpoint its
    ``AsyncConnection``: the endpoint's writes on it and the stored response commit together.
    """

    def __init__(self, idem: Idempotency, *, description: str | None = None, **options: Any):
        options.pop("routes", None)
        options["methods"] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        self.idem = idem
        self.options = options
        # Validated (and startup warnings logged) now, not at the first request.
        self.middleware_for(_nothing)
        header = str(options.get("header", "Idempotency-Key"))
        required = bool(options.get("required", True))
        doc = description or (
            "A unique key (e.g. a UUID) per logical request: a retry with the same key gets "
            "the first response again, with Idempotent-Replayed: true."
        )
        param = Annotated[
            str | None,
            Header(
                alias=header,
                description=doc,
                json_schema_extra={"maxLength": int(options.get("max_key_length", 255))},
            ),
        ]
        # FastAPI reads the signature: the header appears in the route's OpenAPI schema.
        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
                inspect.Parameter(
                    "idempotency_key",
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=param,
                    default=inspect.Parameter.empty if required else None,
                ),
            ]
        )

        self.connection = self._connection_dependency()

    def middleware_for(self, app: Any) -> IdempotencyMiddleware:
        return IdempotencyMiddleware(app, idem=self.idem, **self.options)

    def _connection_dependency(self) -> Callable[..., Coroutine[Any, Any, Any]]:
        guard = self

        # A default, not an annotation: annotations are strings here and cannot name ``guard``.
        async def idem_connection(request: Request, key: Any = Depends(guard)) -> Any:
            """The connection whose transaction also stores the response (``engine=``)."""
            conn = request.scope.get("state", {}).get(CONNECTION_STATE)
            if conn is None:
                raise HTTPException(
                    500, "IdempotencyKey hands a connection only when given engine=..."
                )
            return conn

        return idem_connection

    async def __call__(self, request: Request, idempotency_key: str | None = None) -> str | None:
        if request.scope.get(_MARK) is not self:
            raise HTTPException(
                500,
                "this route depends on IdempotencyKey but its route class is not "
                "IdempotentRoute: set app.router.route_class = IdempotentRoute",
            )
        return idempotency_key


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("never called")


def _guards(dependant: Dependant) -> list[IdempotencyKey]:
    found: list[IdempotencyKey] = []
    for dep in dependant.dependencies:
        if isinstance(dep.call, IdempotencyKey):
            found.append(dep.call)
        found.extend(_guards(dep))
    return found


class IdempotentRoute(APIRoute):
    """An APIRoute whose handler runs in the middleware of the guard it depends on.

    The handler is wrapped (not the route's ASGI app) because FastAPI builds a new app from
    ``get_route_handler()`` for each router inclusion, with the inclusion's dependencies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guards = list(dict.fromkeys(_guards(_effective_dependant(self))))
        if not guards:
            return handler
        if len(guards) > 1:
            raise ValueError(f"route {self.path} depends on more than one IdempotencyKey")
        guard = guards[0]

        async def endpoint_app(scope: Any, receive: Any, send: Any) -> None:
            request = Request({**scope, _MARK: guard}, receive, send)
            response = await handler(request)
            await response(scope, receive, send)

        app = guard.middleware_for(endpoint_app)

        async def guarded(request: Request) -> Response:
            return _Forward(app, request)

        return guarded


class _Forward(Response):
    """A response that runs the guarded ASGI app in its place (the replay, the problem or
    the endpoint's stored response are all written by the middleware)."""

    def __init__(self, app: Any, request: Request) -> None:
        super().__init__()
        self._app = app
        self._request = request

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def _effective_dependant(route: APIRoute) -> Dependant:
    # FastAPI >= 0.16x builds included routes from an "effective context" (the inclusion's
    # dependencies added) that it exposes to get_route_handler() through a context variable.
    try:
        from fastapi.routing import _effective_route_context_var
    except ImportError:
        return route.dependant
    context = _effective_route_context_var.get()
    if context is not None and getattr(context, "original_route", None) is route:
        return cast("Dependant", context.dependant)
    return route.dependant
