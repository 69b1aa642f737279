"""WSGI middleware for the ``Idempotency-Key`` HTTP header (Flask, Django, any WSGI app).

The twin of :mod:`idem_core.integrations.asgi`, on the same policy
(:class:`~idem_core.integrations.http.HttpPolicy`) and the same stored responses: a store can
serve both. ``app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, idem=idem)`` for Flask.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import LeaseLost, ResultNotSerializable, StoreUnavailable
from .http import HttpPolicy, HttpRequest, Problem, StoredResponse, reason_phrase

if TYPE_CHECKING:
    from ..api import Idempotency
    from ..call import Call

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

logger = logging.getLogger("idem_core.wsgi")

#: the environ key of the transactional connection (``engine=``)
CONNECTION_ENVIRON = "idem_core.connection"


def environ_headers(environ: Environ) -> list[tuple[bytes, bytes]]:
    """The request headers of a WSGI environ, as lowercase names and latin-1 bytes."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            header = name[5:].replace("_", "-").lower()
        elif name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            header = name.replace("_", "-").lower()
        else:
            continue
        if isinstance(value, str):
            out.append((header.encode("latin-1"), value.encode("latin-1")))
    return out


def _str_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


class IdempotencyMiddleware:
    """Wrap a WSGI app. ``identify`` takes the environ (``lambda environ:
    environ["REMOTE_USER"]``); every other option is one of
    :class:`~idem_core.integrations.http.HttpPolicy`.

    The response is buffered and stored before it is sent; a response the store refuses
    (too large) is sent, recorded as not stored (a retry gets a 500 problem and never runs
    the request again), and logged.
    """

    def __init__(
        self, app: WSGIApp, *, idem: Idempotency, engine: Any = None, **options: Any
    ) -> None:
        self.app = app
        self.idem = idem
        #: a SQLAlchemy Engine on the records' database: each guarded request runs in one
        #: transaction on one of its connections (``environ["idem_core.connection"]``)
        self.engine = engine
        self.policy = HttpPolicy(**options)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        policy = self.policy
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        path = str(environ.get("PATH_INFO", ""))
        if not policy.applies(method, path, environ):
            return self.app(environ, start_response)
        headers = environ_headers(environ)
        key = policy.read_key(_key_values(headers, policy.header_bytes))
        if key is None:
            return self.app(environ, start_response)
        if isinstance(key, Problem):
            return _answer(start_response, key)
        body = self._read_body(environ)
        if body is None:
            return _answer(start_response, policy.too_large())
        request = HttpRequest(
            method,
            str(environ.get("SCRIPT_NAME", "")) + path,
            str(environ.get("QUERY_STRING", "")).encode("latin-1"),
            headers,
            body,
        )
        identified = policy.identify(environ) if policy.identify is not None else None
        identity = policy.scope_for(identified, request)
        if isinstance(identity, Problem):
            return _answer(start_response, identity)
        raw = policy.raw_key(identity, key)
        if self.engine is None:
            answer = self._respond(environ, raw, request, None)
        else:
            # The claim, the app's writes on this connection and the stored response commit
            # together (or roll back together) before anything is sent.
            with contextlib.ExitStack() as stack:
                try:
                    conn = stack.enter_context(self.engine.connect())
                    stack.enter_context(conn.begin())
                except Exception as exc:
                    answer = policy.database_problem(exc, path)
                else:
                    answer = self._respond(environ, raw, request, conn)
        return _answer(start_response, answer)

    def _respond(
        self, environ: Environ, raw: tuple[str, str], request: HttpRequest, conn: Any
    ) -> Problem:
        """What to send: a problem, the replay, or the app's response once it is stored."""
        policy = self.policy
        try:
            call = self.idem.claim(
                raw, payload=policy.fingerprint(request), connection=conn, **policy.claim_options()
            )
            call.enter()
            # A replay's result is read here: a first response that could not be stored
            # raises ResultNotSerializable, answered below.
            stored: StoredResponse | None = call.result if call.replayed else None
        except Exception as exc:
            answer = policy.claim_problem(exc, request.path)
            if answer is None:
                raise
            return answer
        if stored is not None:
            reason = stored.reason or reason_phrase(stored.status)
            return Problem(stored.status, policy.replay_headers(stored), stored.body, reason)
        app_environ = dict(environ)
        app_environ["wsgi.input"] = io.BytesIO(request.body)
        app_environ["CONTENT_LENGTH"] = str(len(request.body))
        if conn is not None:
            app_environ[CONNECTION_ENVIRON] = conn
        return self._execute(call, app_environ)

    def _execute(self, call: Call, environ: Environ) -> Problem:
        captured: list[tuple[str, list[tuple[str, str]]]] = []
        chunks: list[bytes] = []

        def capture(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            # Buffered: nothing reaches the client before the response is stored.
            captured[:] = [(status, list(headers))]
            return chunks.append

        try:
            result = self.app(environ, capture)
            try:
                for chunk in result:
                    chunks.append(bytes(chunk))
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except BaseException:
            _quietly(call.release)
            raise
        if not captured:
            _quietly(call.release)
            raise RuntimeError("the WSGI app returned without calling start_response")
        status_line, headers = captured[0]
        code, _, reason = status_line.partition(" ")
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        body = b"".join(chunks)
        self._settle(call, int(code), raw_headers, body, reason)
        return Problem(int(code), raw_headers, body, reason)

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

    def _read_body(self, environ: Environ) -> bytes | None:
        """The request body, or None when it is over the limit."""
        stream = environ.get("wsgi.input")
        if stream is None:
            return b""
        limit = self.policy.max_body_bytes
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length > limit:
            return None
        if length >= 0:
            return bytes(stream.read(length)) if length else b""
        if not environ.get("wsgi.input_terminated"):
            return b""  # no length and no end marker: PEP 3333 says there is no body
        data = bytes(stream.read(limit + 1))
        return None if len(data) > limit else data


def _key_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    # WSGI servers join repeated headers with ", ": parse_key refuses the joined value.
    return [v for k, v in headers if k == name]


def _answer(start_response: StartResponse, answer: Problem) -> Iterable[bytes]:
    reason = answer.reason or reason_phrase(answer.status)
    start_response(f"{answer.status} {reason}", _str_headers(answer.headers))
    return [answer.body]


def _quietly(op: Callable[[], None]) -> None:
    try:
        op()
    except Exception:
        logger.warning("could not release an idempotency key", exc_info=True)
