"""ASGI middleware for the ``Idempotency-Key`` HTTP header (Starlette, FastAPI, any ASGI app).

Implements draft-ietf-httpapi-idempotency-key-header: a request that carries a key runs once;
a retry with the same key gets the first response again, byte for byte, with
``Idempotent-Replayed: true``. Errors are ``application/problem+json`` (RFC 9457):

* 400: the key is missing where required, malformed, or too long; or the request carries no
  caller identity (keys are always scoped by the caller, see :mod:`.http`);
* 409: a request with the same key is still running (or, with ``on_in_progress="wait"``, did
  not finish within ``wait_timeout``);
* 422: the key was used for a different request (method, path, query or body);
* 413: the body is larger than ``max_body_bytes`` (it must be read to fingerprint it);
* 503: the store cannot be reached (unless the ``Idempotency`` fails open).

The policy (identity, fingerprint, what is stored) lives in :mod:`idem_core.integrations.http`,
shared with the WSGI and Django integrations. Pure ASGI: no framework is imported.

Lifespan: the middleware passes the app's ``lifespan`` messages through unchanged, and once the
app has answered ``lifespan.shutdown`` it closes the store its ``Idempotency`` opened for the
server's event loop (``aclose()``) before telling the server. Servers that run no lifespan
(``uvicorn --lifespan off``), or an app that fails its lifespan, leave the store to the process
exit; call ``await idem.aclose()`` from your own shutdown code then.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from ..errors import LeaseLost, ResultNotSerializable, StoreUnavailable
from .http import (
    REPLAYED_HEADER,
    TRANSIENT_4XX,
    HttpPolicy,
    HttpRequest,
    Problem,
    StoredResponse,
    default_store_status,
    parse_key,
    problem,
)

if TYPE_CHECKING:
    from ..api import Idempotency
    from ..call import AsyncCall

__all__ = [
    "REPLAYED_HEADER",
    "TRANSIENT_4XX",
    "IdempotencyMiddleware",
    "StoredResponse",
    "authorization_identity",
    "default_store_status",
    "parse_key",
    "send_problem",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: the caller's identity for a request (sync or async): any value, e.g. a user id, or None
Identify = Callable[[Scope], Any]

logger = logging.getLogger("idem_core.asgi")

#: the key of the transactional connection in the request's state (``engine=``)
CONNECTION_STATE = "idem_connection"


def authorization_identity(scope: Scope) -> str | None:
    """The ``Authorization`` header alone (hashed before it is stored). Prefer the default,
    which also covers the session cookies: with this one a cookie-only request is refused."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


class IdempotencyMiddleware:
    """Wrap an ASGI app: ``app.add_middleware(IdempotencyMiddleware, idem=idem)``.

    :param idem: the :class:`~idem_core.Idempotency` whose store keeps the responses.
    :param identify: the caller's identity: a sync or async callable over the scope returning
        any value (``lambda scope: scope["user"].id``), or None when it cannot tell. By default
        the identity is a hash of every credential the request carries (``Authorization``
        and the session ``cookies``); a request with none is refused with 400 unless
        ``anonymous=True``.
    :param on_in_progress: ``"reject"`` (409 at once) or ``"wait"`` for the first request to
        finish, up to ``wait_timeout`` seconds, then replay its response.

    :param engine: a SQLAlchemy ``AsyncEngine`` on the database of an SQL store: each guarded
        request then runs in one transaction on one of its connections, handed to the app as
        ``request.state.idem_connection``; the claim, the app's writes on that connection and
        the stored response commit together, or not at all.

    :param close_on_shutdown: ``await idem.aclose()`` when the server shuts the app down
        (the ASGI lifespan), after the app's own shutdown has run.

    The other options are those of :class:`~idem_core.integrations.http.HttpPolicy`.
    The response is buffered until it is stored, so a retry that arrives after the client got
    it is always a replay; a response the store refuses (too large) is sent, recorded as not
    stored (a retry gets a 500 problem and never runs the request again), and logged.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        idem: Idempotency,
        engine: Any = None,
        close_on_shutdown: bool = True,
        **options: Any,
    ) -> None:
        self.app = app
        self.idem = idem
        #: a SQLAlchemy AsyncEngine on the records' database: each guarded request runs in
        #: one transaction on one of its connections (``request.state.idem_connection``)
        self.engine = engine
        self.policy = HttpPolicy(**options)
        self.identify: Identify | None = self.policy.identify
        self.close_on_shutdown = close_on_shutdown

    # -- selection ------------------------------------------------------------------------

    def applies(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        return self.policy.applies(scope["method"], scope["path"], scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.close_on_shutdown:
            await self._lifespan(scope, receive, send)
            return
        if not self.applies(scope):
            await self.app(scope, receive, send)
            return
        policy = self.policy
        headers = scope.get("headers", ())
        key = policy.read_key([v for k, v in headers if k == policy.header_bytes])
        if key is None:
            await self.app(scope, receive, send)
            return
        if isinstance(key, Problem):
            await send_raw(send, key)
            return
        body = await self._read_body(receive)
        if body is None:
            return  # the client went away
        if isinstance(body, int):
            await send_raw(send, policy.too_large())
            return
        request = HttpRequest(
            scope["method"],
            scope.get("root_path", "") + scope["path"],
            bytes(scope.get("query_string", b"")),
            [(bytes(k), bytes(v)) for k, v in headers],
            body,
        )
        identified = None
        if self.identify is not None:
            identified = self.identify(scope)
            if inspect.isawaitable(identified):
                identified = await identified
        identity = policy.scope_for(identified, request)
        if isinstance(identity, Problem):
            await send_raw(send, identity)
            return
        await self._run(scope, receive, send, key, identity, request)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's lifespan, untouched, with the store closed once the app has shut down
        (its shutdown code may still use it)."""

        async def on_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                try:
                    await self.idem.aclose()
                except Exception:
                    logger.warning("could not close the idempotency store", exc_info=True)
            await send(message)

        await self.app(scope, receive, on_send)

    # -- the idempotent run ---------------------------------------------------------------

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        key: str,
        identity: str,
        request: HttpRequest,
    ) -> None:
        raw = self.policy.raw_key(identity, key)
        if self.engine is None:
            answer = await self._answer(scope, receive, raw, request, None)
        else:
            # The claim, the app's writes on this connection and the stored response commit
            # together (or roll back together) before anything is sent.
            async with contextlib.AsyncExitStack() as stack:
                try:
                    conn = await stack.enter_async_context(self.engine.connect())
                    await stack.enter_async_context(conn.begin())
                except Exception as exc:
                    answer = self.policy.database_problem(exc, scope.get("path", ""))
                else:
                    answer = await self._answer(scope, receive, raw, request, conn)
        if answer is not None:
            await send_raw(send, answer)

    async def _answer(
        self, scope: Scope, receive: Receive, raw: tuple[str, str], request: HttpRequest, conn: Any
    ) -> Problem | None:
        """What to send: a problem, the replay, or the app's response once it is stored."""
        try:
            call = self.idem.aclaim(
                raw,
                payload=self.policy.fingerprint(request),
                connection=conn,
                **self.policy.claim_options(),
            )
            await call.enter()
            # A replay's result is read here: a first response that could not be stored
            # raises ResultNotSerializable, answered below.
            stored: StoredResponse | None = call.result if call.replayed else None
        except Exception as exc:
            answer = self.policy.claim_problem(exc, scope.get("path", ""))
            if answer is None:
                raise
            return answer
        if stored is not None:
            return Problem(stored.status, self.policy.replay_headers(stored), stored.body)
        return await self._execute(call, scope, receive, request.body, conn)

    async def _execute(
        self, call: AsyncCall, scope: Scope, receive: Receive, body: bytes, conn: Any
    ) -> Problem | None:
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            # Buffered: nothing reaches the client before the response is stored.
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        sent = False

        async def replay_body() -> Message:
            # The body was read to fingerprint it: hand it to the app as one message; later
            # reads reach the server, which reports the disconnect.
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        # Zero-copy sends would bypass the capture: offer the app the plain body messages only.
        app_scope = dict(scope)
        extensions = {**scope.get("extensions", {})}
        extensions.pop("http.response.pathsend", None)
        extensions.pop("http.response.zerocopysend", None)
        app_scope["extensions"] = extensions
        if conn is not None:
            # request.state.idem_connection in Starlette and FastAPI
            app_scope["state"] = {**scope.get("state", {}), CONNECTION_STATE: conn}
        try:
            await self.app(app_scope, replay_body, capture)
        except BaseException:
            await _quietly(call.release())
            raise
        if start is None:
            await _quietly(call.release())
            return None
        status = int(start["status"])
        headers = [(bytes(k), bytes(v)) for k, v in start.get("headers", ())]
        content = b"".join(chunks)
        await self._settle(call, status, headers, content)
        return Problem(status, headers, content)

    async def _settle(
        self, call: AsyncCall, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Store the response before it is sent. One the store refuses (too large) is recorded
        as not stored: retries get a 500 problem, never a second run (idem_core's rule)."""
        stored = self.policy.to_store(status, headers, body)
        if stored is None:
            await _quietly(call.release())
            return
        try:
            await call.complete(stored)
        except ResultNotSerializable:
            # Even the small "not stored" record was refused: the key was released.
            logger.warning("response for %r not stored: the store refused it", call.key)
        except (LeaseLost, StoreUnavailable):
            logger.warning("could not store the response for %r", call.key, exc_info=True)

    # -- helpers --------------------------------------------------------------------------

    async def _read_body(self, receive: Receive) -> bytes | int | None:
        parts: list[bytes] = []
        size = 0
        limit = self.policy.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return limit
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


async def send_raw(send: Send, answer: Problem) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})


async def send_problem(
    send: Send, status: int, code: str, detail: str, retry_after: int | None = None
) -> None:
    """An RFC 9457 problem response; ``code`` is an extension member for programs to test."""
    await send_raw(send, problem(status, code, detail, retry_after))


async def _quietly(op: Awaitable[None]) -> None:
    try:
        await op
    except Exception:
        logger.warning("could not release an idempotency key", exc_info=True)
