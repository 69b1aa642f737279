"""The HTTP idempotency policy shared by the ASGI, WSGI, FastAPI and Django integrations.

No framework and no I/O here: each integration turns its request into an :class:`HttpRequest`,
asks :class:`HttpPolicy` what to do (key, identity, fingerprint, which headers to store, which
problem to answer), and does the reading and writing itself, sync or async.

The security model (docs/integrations/http-security.md):

* a key is always scoped by the caller's identity; by default the identity is a hash of every
  credential the request carries (``Authorization``, the ``credential_headers`` and the
  ``cookies`` the app names). A request carrying none is refused (400) unless the app opts in
  to one shared ``anonymous`` scope;
* credentials are never stored: ``Set-Cookie``, ``Authorization``, ``WWW-Authenticate``,
  ``Proxy-Authenticate``, ``Proxy-Authorization`` and the ``deny_headers`` are dropped from
  the stored response (the first caller still receives them);
* everything else (status, headers, body) is replayed byte for byte with
  ``Idempotent-Replayed: true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from fnmatch import fnmatchcase
from http import HTTPStatus
from typing import Any, NamedTuple

import msgspec

from ..errors import (
    AlreadyInProgress,
    ConfigurationError,
    KeyMissing,
    PayloadMismatch,
    ResultNotSerializable,
    StoreUnavailable,
)

logger = logging.getLogger("idem_core.http")

REPLAYED_HEADER = b"idempotent-replayed"
#: statuses never stored by default besides 5xx: a retry of these should run again
TRANSIENT_4XX = frozenset({408, 409, 425, 429})
#: response headers that carry credentials: never stored, so never replayed
NEVER_STORED = frozenset(
    {
        b"set-cookie",
        b"authorization",
        b"www-authenticate",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
#: the session cookies of common frameworks (Django's ``sessionid``, Flask's ``session``)
DEFAULT_COOKIES = ("sessionid", "session")
#: the identity of requests without credentials when the app opts in (``anonymous=True``)
ANONYMOUS = "anonymous"

# Sorted maps make JSON fingerprints canonical: the same document in any key order.
_canonical = msgspec.msgpack.Encoder(order="sorted", enc_hook=str)


class StoredResponse(msgspec.Struct, array_like=True, frozen=True):
    """The first response to a key, as stored and replayed (the same on every stack)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: the WSGI reason phrase, when the first response came through WSGI
    reason: str = ""


class HttpRequest(NamedTuple):
    """A framework-free view of a request: header names are lowercase bytes."""

    method: str
    path: str
    query: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    def cookies(self) -> dict[str, str]:
        """The request's cookies (RFC 6265 ``Cookie`` headers; the first of a name wins)."""
        out: dict[str, str] = {}
        for raw in self.header_values(b"cookie"):
            for part in raw.decode("latin-1").split(";"):
                name, sep, value = part.strip().partition("=")
                if sep and name and name not in out:
                    out[name] = value.strip()
        return out


class Problem(NamedTuple):
    """A response to send: an RFC 9457 ``application/problem+json`` answer, a replay, or
    the app's own response once it is stored."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: the status line's reason phrase (WSGI), empty for the standard one
    reason: str = ""


_TITLES = {
    400: "Idempotency-Key is missing or malformed",
    409: "A request is outstanding for this Idempotency-Key",
    413: "Request body too large to fingerprint",
    422: "Idempotency-Key is already used",
    503: "Idempotency store unavailable",
}


def problem(
    status: int, code: str, detail: str, retry_after: int | None = None, title: str = ""
) -> Problem:
    """A problem response; ``code`` (``idempotency_key_<code>``) is for programs to test."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": title or _TITLES.get(status, "Idempotency error"),
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
    return Problem(status, headers, body)


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def default_store_status(status: int) -> bool:
    """Store every response below 500 except transient 4xx (408, 409, 425, 429)."""
    return status < 500 and status not in TRANSIENT_4XX


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


def hash_identity(value: Any) -> str:
    """A caller's identity as it is stored: a hash, whatever the value's type (a user id
    ``42``, a UUID, a string, a tuple). Credentials are never readable in the store, and an
    identity can never contain the ``:`` that separates the stored key's parts."""
    data = _canonical.encode(value)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def stored_identity(
    identified: Any, credentials: Sequence[tuple[str, str]], anonymous: bool
) -> str | None:
    """The identity part of a stored HTTP key: the hash of what ``identify`` returned, else
    of every credential as (source, value) pairs (``("authorization", "Bearer ...")``,
    ``("cookie:session", "...")``); ``anonymous`` when allowed; None when there is none.
    The middleware and ``Idempotency.http_key`` both use it."""
    if identified is not None and identified != "":
        return hash_identity(["identify", identified])
    if credentials:
        return hash_identity(["credentials", sorted(credentials)])
    return ANONYMOUS if anonymous else None


def _is_json(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def body_fingerprint(request: HttpRequest) -> Any:
    """JSON bodies by meaning (the same document with keys in another order, or other
    whitespace, is the same request); every other body byte for byte."""
    body = request.body
    if _is_json(request.header(b"content-type")):
        try:
            document = msgspec.json.decode(body)
        except msgspec.DecodeError:
            pass  # not JSON after all: the bytes decide
        else:
            return ["json", hashlib.blake2b(_canonical.encode(document), digest_size=32).digest()]
    return ["bytes", hashlib.blake2b(body, digest_size=32).digest()]


#: a custom fingerprint: what the request means, as any msgpack-encodable value
Fingerprint = Callable[[HttpRequest], Any]


class HttpPolicy:
    """The options every HTTP integration shares, and the decisions made from them.

    :param methods: the methods that take a key (default POST and PATCH).
    :param routes: path globs (``"/orders/*"``) or a predicate (over the framework's request
        object: the ASGI scope, the WSGI environ, the Django request).
    :param required: answer 400 when a key is missing; when False such requests just run.
    :param identify: the caller's identity, a callable over the framework's request returning
        any value (a user id, a tenant, a tuple), or None when it cannot tell. The default
        derives it from the request's credentials (see ``credential_headers`` and ``cookies``).
    :param credential_headers: request headers that carry credentials (default
        ``Authorization``); their values, hashed, form the default identity.
    :param cookies: the cookies that carry credentials (default ``sessionid`` and
        ``session``); name your session cookie here if it is called otherwise.
    :param anonymous: requests without any identity share one explicit anonymous scope
        instead of being refused with 400. Only for endpoints that need no authentication:
        any client that sends the same key gets the same response.
    :param deny_headers: response headers never stored, besides :data:`NEVER_STORED`.
    :param fingerprint: a custom fingerprint over the :class:`HttpRequest`; the default
        covers the method, path, query, ``fingerprint_headers`` and the body (JSON by meaning).
    """

    def __init__(
        self,
        *,
        methods: Collection[str] = ("POST", "PATCH"),
        routes: Sequence[str] | Callable[[Any], bool] | None = None,
        required: bool = True,
        identify: Callable[[Any], Any] | None = None,
        credential_headers: Sequence[str] = ("authorization",),
        cookies: Sequence[str] = DEFAULT_COOKIES,
        anonymous: bool = False,
        on_in_progress: str = "reject",
        wait_timeout: float = 10.0,
        store_status: Callable[[int], bool] | Collection[int] = default_store_status,
        ttl: float | None = None,
        lease: float | None = None,
        renew_every: float | None = None,
        max_key_length: int = 255,
        max_body_bytes: int = 16 * 1024 * 1024,
        fingerprint_headers: Sequence[str] = (),
        fingerprint: Fingerprint | None = None,
        deny_headers: Collection[str] = (),
        header: str = "Idempotency-Key",
    ) -> None:
        if on_in_progress not in ("reject", "wait"):
            raise ValueError("on_in_progress must be 'reject' or 'wait'")
        self.methods = frozenset(m.upper() for m in methods)
        self.routes = routes
        self.required = required
        self.identify = identify
        self.credential_headers = tuple(h.lower().encode("latin-1") for h in credential_headers)
        self.cookies = tuple(cookies)
        self.anonymous = anonymous
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
        self.custom_fingerprint = fingerprint
        self.never_stored = NEVER_STORED | {h.lower().encode("latin-1") for h in deny_headers}
        self.header = header
        self.header_bytes = header.lower().encode("latin-1")
        self._warn_shared()

    def _warn_shared(self) -> None:
        """Name at startup every setting that lets different callers share keys."""
        if self.identify is None and not self.credential_headers and not self.cookies:
            if not self.anonymous:
                raise ConfigurationError(
                    "no identity source: every caller would share keys; give identify=, "
                    "credential_headers= or cookies=, or pass anonymous=True to accept it"
                )
            logger.warning(
                "idempotency keys are shared across ALL callers (no identify, no credential "
                "headers, no cookies, anonymous=True): any client sending a key another used "
                "receives that client's stored response"
            )
        elif self.anonymous:
            logger.warning(
                "idempotency keys of requests without credentials are shared (anonymous=True): "
                "any unauthenticated client sending the same key receives the same stored "
                "response; use it only on endpoints that need no authentication"
            )

    # -- selection ------------------------------------------------------------------------

    def applies(self, method: str, path: str, native: Any) -> bool:
        if method not in self.methods:
            return False
        routes = self.routes
        if routes is None:
            return True
        if callable(routes):
            return bool(routes(native))
        return any(fnmatchcase(path, pattern) for pattern in routes)

    def read_key(self, values: Sequence[bytes]) -> str | Problem | None:
        """The key, a problem to answer, or None: no key and none required (run as is)."""
        if not values:
            if self.required:
                return problem(400, "missing", f"{self.header} is missing")
            return None
        if len(values) > 1:
            return problem(400, "malformed", f"send one {self.header} header")
        key, why = parse_key(values[0], self.max_key_length)
        if key is None:
            return problem(400, "malformed", f"{self.header} is malformed: {why}")
        return key

    def too_large(self) -> Problem:
        return problem(
            413, "too_large", f"the request body is larger than {self.max_body_bytes} bytes"
        )

    # -- identity -------------------------------------------------------------------------

    def credentials(self, request: HttpRequest) -> list[tuple[str, str]]:
        """Every credential the request carries, as (source, value) pairs."""
        found = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name in self.credential_headers
            for value in request.header_values(name)
            if value.strip()
        ]
        if self.cookies:
            jar = request.cookies()
            found += [(f"cookie:{c}", jar[c]) for c in self.cookies if jar.get(c)]
        return found

    def scope_for(self, identified: Any, request: HttpRequest) -> str | Problem:
        """The stored identity scope: the hash of ``identify``'s value, else of every
        credential; with neither, the anonymous scope if allowed, else a 400 problem."""
        found = stored_identity(identified, self.credentials(request), self.anonymous)
        if found is not None:
            return found
        hint = ""
        if request.header(b"cookie") is not None:
            hint = (
                " (the request has cookies, but none this server names as credentials: "
                "list the session cookie in cookies=...)"
            )
        return problem(
            400,
            "no_identity",
            "an Idempotency-Key is scoped by the caller, and this request carries no "
            f"credentials{hint}; authenticate the request",
            title="The request carries no caller identity",
        )

    # -- the claim ------------------------------------------------------------------------

    def fingerprint(self, request: HttpRequest) -> Any:
        if self.custom_fingerprint is not None:
            return ["custom", self.custom_fingerprint(request)]
        headers = dict(request.headers)
        return [
            request.method,
            request.path,
            request.query,
            body_fingerprint(request),
            [headers.get(name) for name in self.fingerprint_headers],
        ]

    def raw_key(self, identity: str, key: str) -> tuple[str, str]:
        """The key's parts under the ``http`` scope: idem_core.keys encodes them, so no
        identity and key can be made to meet another pair's."""
        return (identity, key)

    def claim_options(self) -> dict[str, Any]:
        return {
            "scope": "http",
            "lease": self.lease,
            "ttl": self.ttl,
            "result_type": StoredResponse,
            "on_in_progress": "wait" if self.on_in_progress == "wait" else "raise",
            "wait_timeout": self.wait_timeout,
            "renew_every": self.renew_every,
        }

    def claim_problem(self, exc: Exception, where: str) -> Problem | None:
        """The answer to an error raised while claiming, or None when it is not ours."""
        if isinstance(exc, AlreadyInProgress):
            return problem(
                409,
                "in_progress",
                "a request with this Idempotency-Key is still being processed; retry later",
                retry_after=1,
            )
        if isinstance(exc, PayloadMismatch):
            return problem(
                422,
                "mismatch",
                "this Idempotency-Key was already used for a different request; "
                "use a new key for a new request",
            )
        if isinstance(exc, KeyMissing):
            return problem(400, "malformed", str(exc))
        if isinstance(exc, StoreUnavailable):
            return self.unavailable(exc, where)
        if isinstance(exc, ResultNotSerializable):
            # The first request ran, and its response was sent but could not be stored (too
            # large for the store): it never runs again for this key, and retries learn why.
            logger.warning("%s: a retry of a request whose response was not stored", where)
            return problem(
                500,
                "response_not_stored",
                "the request with this Idempotency-Key was processed, but its response could "
                "not be stored, so it cannot be replayed; it will not be processed again",
            )
        return None

    def database_problem(self, exc: Exception, where: str) -> Problem:
        """The answer when the transaction for ``engine=`` cannot begin: the database is the
        store, so it is 503 when it cannot be reached; anything else is a bug and raised."""
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(exc, SQLAlchemyError | OSError):
            raise exc
        return self.unavailable(exc, where)

    @staticmethod
    def unavailable(exc: Exception, where: str) -> Problem:
        logger.error("idempotency store unavailable for %s: %s", where, exc)
        return problem(503, "unavailable", "the idempotency store is unavailable", retry_after=1)

    # -- the response ---------------------------------------------------------------------

    def to_store(
        self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, reason: str = ""
    ) -> StoredResponse | None:
        """The response as stored (credentials dropped), or None when its status is not."""
        if not self.store_status(status):
            return None
        kept = [(k, v) for k, v in headers if k.lower() not in self.never_stored]
        return StoredResponse(status, kept, body, reason)

    @staticmethod
    def replay_headers(stored: StoredResponse) -> list[tuple[bytes, bytes]]:
        return [*stored.headers, (REPLAYED_HEADER, b"true")]
