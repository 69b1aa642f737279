"""ASGI middleware for the ``Idempotency-Key`` HTTP header (Starlette, FastAPI, any ASGI app).

Implements draft-ietf-httpapi-idempotency-key-header: a request that carries a key runs once;
a retry with the same key gets the first response again, byte for byte, with
``Idempotent-Replayed: true``. Errors are ``application/problem+json`` (RFC 9457):

* 400: the key is missing where required, malformed, or too long;
* 409: a request with the same key is still running (or, with ``on_in_progress="wait"``, did
  not finish within ``wait_timeout``);
* 422: the key was used for a different request (method, path, query or body);
* 413: the body is larger than ``max_body_bytes`` (it must be read to fingerprint it);
* 503: the store cannot be reached (unless the ``Idempotency`` fails open).

Pure ASGI: no framework is imported, so it wraps any ASGI 3 application.

Lifespan: the middleware passes the app's ``lifespan`` messages through unchanged, and once the
app has answered ``lifespan.shutdown`` it closes the store its ``Idempotency`` opened for the
server's event loop (``aclose()``) before telling the server. Servers that run no lifespan
(``uvicorn --lifespan off``), or an app that fails its lifespan, leave the store to the process
exit; call ``await idem.aclose()`` from your own shutdown code then.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Collection, MutableMapping, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import (
    AlreadyInProgress,
    KeyMissing,
    LeaseLost,
    PayloadMismatch,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from ..api import Idempotency
    from ..call import AsyncCall

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: the caller's identity for a request: a user id, an API key id, a tenant...
Identify = Callable[[Scope], "str | Awaitable[str | None] | None"]

logger = logging.getLogger("idem_core.asgi")

REPLAYED_HEADER = b"idempotent-replayed"
#: statuses never stored by default besides 5xx: a retry of these should run again
TRANSIENT_4XX = frozenset({408, 409, 425, 429})


class StoredResponse(msgspec.Struct, array_like=True, frozen=True):
    """The first response to a key, as stored and replayed."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def default_store_status(status: int) -> bool:
    """Store every response below 500 except transient 4xx (408, 409, 425, 429)."""
    return status < 500 and status not in TRANSIENT_4XX


def authorization_identity(scope: Scope) -> str | None:
    """The default identity: the ``Authorization`` header (hashed before it is stored), so
    callers with different credentials never share keys."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


class IdempotencyMiddleware:
    """Wrap an ASGI app: ``app.add_middleware(IdempotencyMiddleware, idem=idem)``.

    :param idem: the :class:`~idem_core.Idempotency` whose store keeps the responses.
    :param methods: the methods that take a key (default POST and PATCH).
    :param routes: path globs (``"/orders/*"``) or a predicate over the ASGI scope; None means
        every path.
    :param required: answer 400 when a key is missing; when False such requests just run.
    :param identify: the caller's identity (sync or async callable over the scope). It is
        hashed into the stored key so one caller never sees another's response. The default
        uses the ``Authorization`` header; pass e.g. ``lambda scope: scope["user"].id``.
    :param on_in_progress: ``"reject"`` (409 at once) or ``"wait"`` for the first request to
        finish, up to ``wait_timeout`` seconds, then replay its response.
    :param store_status: which statuses are stored (a predicate or a collection); default
        :func:`default_store_status`. Other responses release the key, so a retry runs again.
    :param ttl: retention of stored responses in seconds (default: the ``Idempotency``'s).
    :param lease: how long a running request holds its key before a retry may take over.
    :param renew_every: extend the lease every so many seconds while the app runs.
    :param max_key_length: longest accepted key, in characters (default 255).
    :param max_body_bytes: largest request body read for the fingerprint (413 beyond).
    :param fingerprint_headers: request headers that are part of the fingerprint besides
        method, path, query and body (e.g. ``("content-type",)``).
    :param header: the header's name.
    :param close_on_shutdown: ``await idem.aclose()`` when the server shuts the app down
        (the ASGI lifespan), after the app's own shutdown has run.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        idem: Idempotency,
        methods: Collection[str] = ("POST", "PATCH"),
        routes: Sequence[str] | Callable[[Scope], bool] | None = None,
        required: bool = True,
        identify: Identify | None = authorization_identity,
        on_in_progress: str = "reject",
        wait_timeout: float = 10.0,
        store_status: Callable[[int], bool] | Collection[int] = default_store_status,
        ttl: float | None = None,
        lease: float | None = None,
        renew_every: float | None = None,
        max_key_length: int = 255,
        max_body_bytes: int = 16 * 1024 * 1024,
        fingerprint_headers: Sequence[str] = (),
        header: str = "Idempotency-Key",
        close_on_shutdown: bool = True,
    ) -> None:
        if on_in_progress not in ("reject", "wait"):
            raise ValueError("on_in_progress must be 'reject' or 'wait'")
        self.app = app
        self.idem = idem
        self.methods = frozenset(m.upper() for m in methods)
        self.routes = routes
        self.required = required
        self.identify = identify
        self.on_in_progress = on_in_progress
        self.wait_timeout = wait_timeout
        self.store_status: Callable[[int], bool] = (
            store_status if callable(store_status) else frozenset(store_status).__contains__
        )
        self.ttl = ttl
        self.lease = lease
        self.renew_every = renew_every
        self.max_key_length = max_key_length
        self.max_body_bytes = max_body_bytes
        self.fingerprint_headers = [h.lower().encode("latin-1") for h in fingerprint_headers]
        self.header = header
        self._header = header.lower().encode("latin-1")
        self.close_on_shutdown = close_on_shutdown

    # -- selection ------------------------------------------------------------------------

    def applies(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            return False
        routes = self.routes
        if routes is None:
            return True
        if callable(routes):
            return bool(routes(scope))
        path = scope["path"]
        return any(fnmatchcase(path, pattern) for pattern in routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.close_on_shutdown:
            await self._lifespan(scope, receive, send)
            return
        if not self.applies(scope):
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope.get("headers", ()) if k == self._header]
        if not values:
            if self.required:
                await self._problem(send, 400, "missing", f"{self.header} is missing")
                return
            await self.app(scope, receive, send)
            return
        if len(values) > 1:
            await self._problem(send, 400, "malformed", f"send one {self.header} header")
            return
        key, problem = parse_key(values[0], self.max_key_length)
        if key is None:
            await self._problem(send, 400, "malformed", f"{self.header} is malformed: {problem}")
            return
        body = await self._read_body(receive)
        if body is None:
            return  # the client went away
        if isinstance(body, int):
            await self._problem(
                send, 413, "too_large", f"the request body is larger than {body} bytes"
            )
            return
        identity = await self._identity(scope)
        await self._run(scope, receive, send, key, identity, body)

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
        self, scope: Scope, receive: Receive, send: Send, key: str, identity: str, body: bytes
    ) -> None:
        raw = (identity, key)  # encoded by idem_core.keys: "namespace:http:<identity>:<key>"
        try:
            call = self.idem.aclaim(
                raw,
                scope="http",
                payload=self._fingerprint(scope, body),
                lease=self.lease,
                ttl=self.ttl,
                result_type=StoredResponse,
                on_in_progress="wait" if self.on_in_progress == "wait" else "raise",
                wait_timeout=self.wait_timeout,
                renew_every=self.renew_every,
            )
            await call.enter()
        except AlreadyInProgress:
            await self._problem(
                send,
                409,
                "in_progress",
                "a request with this Idempotency-Key is still being processed; retry later",
                retry_after=1,
            )
            return
        except PayloadMismatch:
            await self._problem(
                send,
                422,
                "mismatch",
                "this Idempotency-Key was already used for a different request; "
                "use a new key for a new request",
            )
            return
        except KeyMissing as exc:
            await self._problem(send, 400, "malformed", str(exc))
            return
        except StoreUnavailable:
            logger.exception("idempotency store unavailable for %s", scope.get("path"))
            await self._problem(
                send, 503, "unavailable", "the idempotency store is unavailable", retry_after=1
            )
            return
        if call.replayed:
            stored: StoredResponse = call.result
            await send(
                {
                    "type": "http.response.start",
                    "status": stored.status,
                    "headers": [*stored.headers, (REPLAYED_HEADER, b"true")],
                }
            )
            await send({"type": "http.response.body", "body": stored.body, "more_body": False})
            return
        await self._execute(call, scope, receive, send, body)

    async def _execute(
        self, call: AsyncCall, scope: Scope, receive: Receive, send: Send, body: bytes
    ) -> None:
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
            await send(message)

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
        try:
            await self.app(app_scope, replay_body, capture)
        except BaseException:
            await _quietly(call.release())
            raise
        if start is None or not self.store_status(int(start["status"])):
            await _quietly(call.release())
            return
        stored = StoredResponse(
            int(start["status"]),
            [(bytes(k), bytes(v)) for k, v in start.get("headers", ())],
            b"".join(chunks),
        )
        try:
            await call.complete(stored)
        except (LeaseLost, StoreUnavailable):
            # The response has been sent already: a retry will run the request again.
            logger.warning("could not store the response for %r", call.key, exc_info=True)

    # -- helpers --------------------------------------------------------------------------

    async def _read_body(self, receive: Receive) -> bytes | int | None:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return self.max_body_bytes
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _identity(self, scope: Scope) -> str:
        if self.identify is None:
            return "-"
        value = self.identify(scope)
        if not isinstance(value, str) and value is not None:
            value = await value
        if not value:
            return "-"
        # Hashed: credentials must not be readable in the store, and ':' must not split keys.
        return hashlib.blake2b(value.encode(), digest_size=16).hexdigest()

    def _fingerprint(self, scope: Scope, body: bytes) -> list[Any]:
        headers = dict(scope.get("headers", ()))
        return [
            scope["method"],
            scope.get("root_path", "") + scope["path"],
            bytes(scope.get("query_string", b"")),
            hashlib.blake2b(body, digest_size=32).digest(),
            [headers.get(name) for name in self.fingerprint_headers],
        ]

    async def _problem(
        self, send: Send, status: int, code: str, detail: str, retry_after: int | None = None
    ) -> None:
        await send_problem(send, status, code, detail, retry_after)


_TITLES = {
    400: "Idempotency-Key is missing or malformed",
    409: "A request is outstanding for this Idempotency-Key",
    413: "Request body too large to fingerprint",
    422: "Idempotency-Key is already used",
    503: "Idempotency store unavailable",
}


async def send_problem(
    send: Send, status: int, code: str, detail: str, retry_after: int | None = None
) -> None:
    """An RFC 9457 problem response; ``code`` is an extension member for programs to test."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": _TITLES.get(status, "Idempotency error"),
            "status": status,
            "detail": detail,
            "code": f"idempotency_key_{code}",
        }
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def parse_key(value: bytes, max_length: int) -> tuple[str | None, str]:
    """The key from a header value, or (None, why not).

    The draft makes the field a Structured Field string (``"abc"``, with ``\\"`` and ``\\\\``
    escapes); bare tokens of visible ASCII are accepted too, since many clients send them.
    """
    try:
        text = value.decode("ascii").strip(" \t")
    except UnicodeDecodeError:
        return None, "only printable ASCII is allowed"
    if text.startswith('"'):
        out: list[str] = []
        i, n = 1, len(text)
        while i < n:
            ch = text[i]
            if ch == "\\":
                if i + 1 >= n or text[i + 1] not in '"\\':
                    return None, "bad escape in the quoted string"
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                if i != n - 1:
                    return None, "characters after the closing quote"
                key = "".join(out)
                break
            if not 0x20 <= ord(ch) <= 0x7E:
                return None, "only printable ASCII is allowed"
            out.append(ch)
            i += 1
        else:
            return None, "unterminated quoted string"
    else:
        key = text
        if any(not 0x21 <= ord(ch) <= 0x7E or ch == '"' for ch in key):
            return None, "only visible ASCII without spaces, or a quoted string, is allowed"
    if not key:
        return None, "the key is empty"
    if len(key) > max_length:
        return None, f"the key is longer than {max_length} characters"
    return key, ""


async def _quietly(op: Awaitable[None]) -> None:
    try:
        await op
    except Exception:
        logger.warning("could not release an idempotency key", exc_info=True)
