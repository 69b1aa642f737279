"""The public API: ``Idempotency``, its decorator and its ``claim`` context managers."""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypedDict, TypeVar, Unpack, cast

from . import steps as _steps
from . import validate
from .arguments import Binder, extractor
from .call import AsyncCall, Call, Options
from .codec import ResultCodec
from .errors import ConfigurationError, StoreUnavailable
from .events import Emitter, EventHook, EventKind
from .keys import RawKey, encode_key, fingerprint, full_key, prefix
from .lifetimes import Stores, this_thread
from .local_cache import LocalCache
from .record import ClaimOutcome, ClaimRequest, ClaimResult, Record
from .results import Unresolved, return_type
from .store import AsyncStore, Store

# Enum members looked up once: a class attribute lookup costs ~0.1 us on the hot path.
_E_REPLAYED = EventKind.REPLAYED
_O_COMPLETED = ClaimOutcome.COMPLETED


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

KeySpec = str | Sequence[str] | Callable[..., RawKey]
PayloadSpec = Sequence[str] | Callable[..., Any] | None

_attempts = itertools.count()
_RETRY_PAUSE = 0.05


def _attempt_id() -> str:
    # Unique per call and per process; cheaper than uuid4 on the hot path.
    return f"{_process_tag}-{next(_attempts)}"


_process_tag = os.urandom(6).hex()


def _new_process_tag() -> None:
    global _process_tag
    _process_tag = os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_process_tag)


class CallSettings(TypedDict, total=False):
    """Per-call settings of ``claim``, ``aclaim``, ``claim_many`` and the decorator."""

    #: seconds the claim stays exclusive without renewal (default: the object's ``lease``)
    lease: float | None
    #: seconds a completed result is kept (default: the object's ``ttl``)
    ttl: float | None
    #: the type a replayed result decodes to
    result_type: Any
    #: ``"raise"`` (AlreadyInProgress) or ``"wait"`` for the first execution to finish
    on_in_progress: str
    #: seconds to wait with ``on_in_progress="wait"``
    wait_timeout: float
    #: exception types stored and replayed as themselves
    cache_errors: tuple[type[BaseException], ...]
    #: seconds between background lease renewals
    renew_every: float | None


_CALL_SETTINGS = frozenset(CallSettings.__annotations__)


class Idempotency:
    """Makes functions and blocks idempotent on one store, for sync and async code alike.

    ``store``/``astore`` are ready stores (never closed by us; a given async store is used
    from every event loop as it is). ``url`` opens stores lazily: one sync store per process
    and one async store per event loop, so a forked worker never shares its parent's
    connections and each ``asyncio.run()`` gets connections of its own (see
    :mod:`idem_core.lifetimes`). ``close()``/``aclose()`` release them; the object stays
    usable and reopens on the next call.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        astore: AsyncStore | None = None,
        url: str | None = None,
        client: Any = None,
        store_options: dict[str, Any] | None = None,
        namespace: str = "default",
        ttl: float = 86400.0,
        lease: float = 30.0,
        on_event: EventHook | Sequence[EventHook] | None = None,
        on_store_error: str = "fail",
        local_cache: int = 0,
        retries: int = 1,
        instrument: Callable[[Any], Any] | None = None,
    ) -> None:
        if store is None and astore is None and url is None:
            raise ConfigurationError("give a store, an astore or a url")
        if url is not None and (not isinstance(url, str) or not url):
            raise ConfigurationError(f"url must be a non-empty string, got {url!r}")
        if store_options is not None and not isinstance(store_options, dict):
            raise ConfigurationError(f"store_options must be a dict, got {store_options!r}")
        if instrument is not None and not callable(instrument):
            raise ConfigurationError(f"instrument must be a callable, got {instrument!r}")
        validate.choice("on_store_error", on_store_error, ("fail", "fail_open"))
        # ':' and '\\' are kept out so a namespace is its own readable prefix of every key.
        validate.text("namespace", namespace, forbidden=":\\", maximum=validate.MAX_NAMESPACE)
        self.url = url
        self.namespace = namespace
        self.ttl = validate.seconds("ttl", ttl)
        self.lease = validate.seconds("lease", lease)
        self.on_store_error = on_store_error
        self.retries = validate.count("retries", retries, validate.MAX_RETRIES)
        local_cache = validate.count("local_cache", local_cache)
        hooks: list[EventHook] = validate.hooks("on_event", on_event)
        #: applied to every store this object uses (e.g. metrics around each operation)
        self.instrument = instrument
        self._stores = Stores(
            store=store,
            astore=astore,
            url=url,
            client=client,
            options=store_options or {},
            instrument=instrument,
        )
        self._emit = Emitter(namespace, hooks)
        self._cache: LocalCache | None = LocalCache(local_cache) if local_cache else None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        client: Any = None,
        store_options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Idempotency:
        """Open stores for ``url`` lazily; ``settings`` are this class's keyword arguments."""
        from .registry import backend_for

        if not isinstance(url, str) or not url:
            raise ConfigurationError(f"url must be a non-empty string, got {url!r}")
        validate.known("from_url", settings, _SETTINGS)
        backend_for(url)  # fail fast on an unknown scheme or a missing extra
        return cls(url=url, client=client, store_options=store_options, **settings)

    @classmethod
    def from_env(cls, var: str = "IDEM_URL", **settings: Any) -> Idempotency:
        validate.text("var", var)
        validate.known("from_env", settings, (*_SETTINGS, "client", "store_options"))
        url = os.environ.get(var)
        if not url:
            raise ConfigurationError(f"set {var} to a store URL, e.g. {var}=memory://")
        return cls.from_url(url, **settings)

    # -- stores ---------------------------------------------------------------------------

    def on_event(self, hook: EventHook) -> EventHook:
        """Add an event hook (usable as a decorator)."""
        self._emit.hooks.append(hook)
        return hook

    def remove_event_hook(self, hook: EventHook) -> None:
        """Remove a hook added with ``on_event`` (or given to the constructor)."""
        self._emit.hooks.remove(hook)

    @property
    def store(self) -> Store:
        """The sync store: the one given, or this process's, opened on first use."""
        return self._stores.sync_store()

    @property
    def astore(self) -> AsyncStore:
        """The async store of the running event loop: the one given, or one opened on first
        use inside this loop (see :mod:`idem_core.lifetimes`)."""
        return self._stores.async_store()

    def close(self) -> None:
        """Close the sync store this object opened (never one it was given). Records are
        kept; the next sync call opens a new store."""
        self._stores.close()

    async def aclose(self) -> None:
        """Close the async store this object opened for the running event loop (never one
        it was given), and forget those of loops that have closed. The sync store stays
        open: call :meth:`close` for it."""
        await self._stores.aclose()

    def __enter__(self) -> Idempotency:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Idempotency:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- keys -----------------------------------------------------------------------------

    def key_for(self, raw: object, scope: str = "", max_length: int | None = None) -> str:
        """The stored key for a raw idempotency key (a string, or a tuple of strings)."""
        if max_length is None:
            store = self._stores.any_store()
            max_length = store.max_key_length if store is not None else 255
        elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 80:
            raise ConfigurationError(f"max_length must be an int >= 80, got {max_length!r}")
        return full_key(self.namespace, _scope(scope), raw, max_length)

    def _request(
        self, raw_key: object, payload: Any, lease: float, ttl: float, scope: str, limit: int
    ) -> ClaimRequest:
        return ClaimRequest(
            full_key(self.namespace, _scope(scope), raw_key, limit),
            fingerprint(payload),
            _attempt_id(),
            lease,
            ttl,
        )

    # -- retries and the local cache --------------------------------------------------------

    def _retry(self, op: Callable[..., T], *args: Any, _spent: int = 0, **kwargs: Any) -> T:
        """Run a store operation, retrying a StoreUnavailable with the same arguments: each
        operation is safe to repeat (claims carry their attempt id). ``_spent`` counts the
        tries already made."""
        for attempt in range(_spent, self.retries + 1):
            try:
                return op(*args, **kwargs)
            except StoreUnavailable:
                if attempt >= self.retries:
                    raise
                time.sleep(_RETRY_PAUSE * (attempt + 1))
        raise AssertionError("unreachable")

    async def _aretry(self, op: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        for attempt in range(self.retries + 1):
            try:
                return await op(*args, **kwargs)
            except StoreUnavailable:
                if attempt >= self.retries:
                    raise
                import asyncio  # not at the top: a sync cold start need not import it

                await asyncio.sleep(_RETRY_PAUSE * (attempt + 1))
        raise AssertionError("unreachable")

    def _remember(self, key: str, record: Record) -> None:
        if self._cache is not None:
            self._cache.put(key, record)

    def _recall(self, request: ClaimRequest) -> Record | None:
        if self._cache is None:
            return None
        return self._cache.get(request.key, request.fingerprint)

    # -- context managers ---------------------------------------------------------------

    def _options(self, settings: CallSettings, function: str | None = None) -> Options:
        if not settings.keys() <= _CALL_SETTINGS:
            validate.known("claim", settings, _CALL_SETTINGS)
        # Checked before the codec is built from it (Options checks the rest).
        cache_errors = validate.exception_types("cache_errors", settings.get("cache_errors", ()))
        ttl, lease = settings.get("ttl"), settings.get("lease")
        return Options(
            # None means the object's own; 0 is refused by Options, not read as the default
            ttl=self.ttl if ttl is None else ttl,
            lease=self.lease if lease is None else lease,
            codec=ResultCodec(settings.get("result_type", Any), cache_errors),
            on_in_progress=settings.get("on_in_progress", "raise"),
            wait_timeout=settings.get("wait_timeout", 10.0),
            cache_errors=cache_errors,
            renew_every=settings.get("renew_every"),
            function=function,
        )

    def _batch(
        self,
        store: Store | AsyncStore,
        items: Sequence[tuple[RawKey, Any]],
        scope: str,
        settings: CallSettings,
    ) -> tuple[list[ClaimRequest], Options]:
        opts = self._options(settings, scope or None)
        limit = store.max_key_length
        return [self._request(k, p, opts.lease, opts.ttl, scope, limit) for k, p in items], opts

    def claim(
        self,
        key: RawKey,
        *,
        payload: Any = None,
        connection: Any = None,
        scope: str = "",
        **settings: Unpack[CallSettings],
    ) -> Call:
        """``with idem.claim(key, payload=...) as call:`` — replay ``call.result`` when
        ``call.replayed``, else do the work and ``call.complete(value)``.

        ``connection`` runs the record inside the caller's own transaction (SQL stores);
        ``scope`` separates keys of different operations (``namespace:scope:key``);
        ``settings`` are those of :class:`CallSettings`."""
        store = self.store if connection is None else _bind(self.store, connection)
        opts = self._options(settings, scope or None)
        req = self._request(key, payload, opts.lease, opts.ttl, scope, store.max_key_length)
        return Call(self, store, req, opts)

    def aclaim(
        self,
        key: RawKey,
        *,
        payload: Any = None,
        connection: Any = None,
        scope: str = "",
        **settings: Unpack[CallSettings],
    ) -> AsyncCall:
        """``async with idem.aclaim(key, payload=...) as call:`` — the twin of :meth:`claim`."""
        store = self.astore if connection is None else _bind(self.astore, connection)
        opts = self._options(settings, scope or None)
        req = self._request(key, payload, opts.lease, opts.ttl, scope, store.max_key_length)
        return AsyncCall(self, store, req, opts)

    def claim_many(
        self,
        items: Sequence[tuple[RawKey, Any]],
        *,
        scope: str = "",
        **settings: Unpack[CallSettings],
    ) -> list[Call]:
        """Claim a batch of ``(key, payload)`` in one store call where the store can.

        Nothing is raised for a duplicate: each call's ``outcome`` says what it found
        (``replayed`` calls carry ``result``; ``IN_PROGRESS`` and ``MISMATCH`` hold nothing).
        """
        store = self.store
        reqs, opts = self._batch(store, items, scope, settings)
        results = self._retry(store.claim_many, reqs)
        calls = [Call(self, store, req, opts) for req in reqs]
        for call, res in zip(calls, results, strict=True):
            call.adopt(res)
        return calls

    async def aclaim_many(
        self,
        items: Sequence[tuple[RawKey, Any]],
        *,
        scope: str = "",
        **settings: Unpack[CallSettings],
    ) -> list[AsyncCall]:
        """The asyncio twin of :meth:`claim_many`."""
        store = self.astore
        reqs, opts = self._batch(store, items, scope, settings)
        results = await self._aretry(store.claim_many, reqs)
        calls = [AsyncCall(self, store, req, opts) for req in reqs]
        for call, res in zip(calls, results, strict=True):
            call.adopt(res)
        return calls

    # -- the decorator ------------------------------------------------------------------

    def idempotent(
        self,
        fn: Callable[P, R] | None = None,
        *,
        key: KeySpec,
        payload: PayloadSpec = None,
        ttl: float | None = None,
        lease: float | None = None,
        on_in_progress: str = "raise",
        wait_timeout: float = 10.0,
        cache_errors: tuple[type[BaseException], ...] = (),
        renew_every: float | None = None,
        result_type: Any = None,
        connection: str | Callable[..., Any] | None = None,
        scope: str | None = None,
    ) -> Any:
        """Make ``fn`` run once per key; duplicates get the stored result.

        ``key``: an argument name, several names (a multi-part key, each part encoded so
        ``("a:b", "c")`` and ``("a", "b:c")`` differ: see :mod:`idem_core.keys`), or a callable
        over the arguments returning a string or a tuple of strings. ``payload``: argument names
        or a callable whose value is fingerprinted (default: every argument but a first
        ``self``/``cls``, in parameter order). ``result_type``: the type replays decode to
        (default: the return annotation). ``connection``: the argument name (or a callable over
        the arguments) of a database connection whose transaction the record joins.
        """

        def decorate(func: Callable[P, R]) -> Callable[P, R]:
            return self._wrap(
                func,
                key=key,
                payload=payload,
                ttl=ttl,
                lease=lease,
                on_in_progress=on_in_progress,
                wait_timeout=wait_timeout,
                cache_errors=cache_errors,
                renew_every=renew_every,
                result_type=result_type,
                connection=connection,
                scope=scope,
            )

        return decorate if fn is None else decorate(fn)

    def _wrap(
        self,
        func: Callable[P, R],
        *,
        key: KeySpec,
        payload: PayloadSpec,
        ttl: float | None,
        lease: float | None,
        on_in_progress: str,
        wait_timeout: float,
        cache_errors: tuple[type[BaseException], ...],
        renew_every: float | None,
        result_type: Any,
        connection: str | Callable[..., Any] | None,
        scope: str | None,
    ) -> Callable[P, R]:
        if not callable(func):
            raise ConfigurationError(f"idempotent() decorates a function, got {func!r}")
        bind = Binder(func)
        if scope is not None:
            validate.text("scope", scope)
        name = scope or f"{func.__module__}.{func.__qualname__}"
        opts = self._options(
            {
                "ttl": ttl,
                "lease": lease,
                "on_in_progress": on_in_progress,
                "wait_timeout": wait_timeout,
                "cache_errors": cache_errors,
                "renew_every": renew_every,
            },
            function=name,
        )
        # Decided now, not after the function has run: a return type that cannot be stored is
        # a ConfigurationError at decoration (one naming a type not defined yet is resolved
        # on the first call, before anything runs). After _options: the settings it checks
        # (cache_errors) are the codec's inputs.
        codec = ResultCodec(
            _return_type(func) if result_type is None else result_type, cache_errors
        )
        opts.codec = codec
        get_key = extractor(key, "key", bind)
        get_payload = None if payload is None else extractor(payload, "payload", bind)
        get_conn = None if connection is None else extractor(connection, "connection", bind)
        if isinstance(connection, str):
            bind.leave_out(connection)  # a connection is how the call runs, not its input
        key_index = bind.index_of(key)
        namespace, lease_s, ttl_s = self.namespace, opts.lease, opts.ttl
        head = prefix(namespace, name)  # the encoded "namespace:scope:", built once
        arity, names, plain, skip, omit = bind.arity, bind.names, bind.simple, bind.skip, bind.omit

        def prepare(args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> ClaimRequest:
            # The fingerprint covers every argument (but self/cls) in parameter order, however
            # it was passed: see idem_core.arguments.
            if plain and not kwargs and len(args) == arity:
                if key_index is not None:
                    raw = args[key_index]
                else:
                    raw = get_key(dict(zip(names, args, strict=True)))
                if get_payload is not None:
                    fp = fingerprint(get_payload(dict(zip(names, args, strict=True))))
                elif omit:
                    fp = fingerprint(bind.values(dict(zip(names, args, strict=True))))
                else:
                    fp = fingerprint(args[skip:] if skip else args)
            else:
                bound = bind(args, kwargs)
                raw = get_key(bound)
                fp = fingerprint(bind.values(bound) if get_payload is None else get_payload(bound))
            return ClaimRequest(
                encode_key(head, namespace, raw, limit), fp, _attempt_id(), lease_s, ttl_s
            )

        emit, decode, stores = self._emit, opts.codec.decode, self._stores

        if inspect.iscoroutinefunction(func):
            afunc = cast(Callable[..., Awaitable[Any]], func)

            @functools.wraps(func)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                if codec.pending is not None:
                    codec.ready()
                entry = stores.hot  # see Stores.async_store
                if entry.loop._thread_id == this_thread() and entry.live:
                    store = entry.store
                else:
                    store = stores.async_store()
                if get_conn is not None:
                    store = _bind(store, get_conn(bind(args, kwargs)))
                call = AsyncCall(self, store, prepare(args, kwargs, store.max_key_length), opts)
                await call.enter()
                if call.replayed:
                    return call.result
                token = _steps.enter(call)  # current_acall(): steps inside the function
                try:
                    value = await afunc(*args, **kwargs)
                except BaseException as exc:
                    await call._abort(exc)  # never raises in place of exc
                    raise
                finally:
                    _steps.leave(token)
                await call._finish(value, None)
                return value

            awrapper.__idem_prepare__ = prepare  # type: ignore[attr-defined]
            awrapper.__idem_owner__ = self  # type: ignore[attr-defined]
            return cast(Callable[P, R], awrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if codec.pending is not None:
                codec.ready()
            store = stores.sync
            if store is None:
                store = stores.sync_store()
            if get_conn is not None:
                store = _bind(store, get_conn(bind(args, kwargs)))
            req = prepare(args, kwargs, store.max_key_length)
            first: ClaimResult | StoreUnavailable | None = None
            if self._cache is None:
                # The common case needs no Call object: one claim, then replay or run.
                try:
                    first = store.claim(req)
                except StoreUnavailable as exc:
                    first = exc  # the Call retries it, or fails open
                else:
                    if first.outcome is _O_COMPLETED:
                        emit(_E_REPLAYED, req.key, name, first.record.fence)
                        return decode(first.record.result, req.key)
            call = Call(self, store, req, opts)
            call.enter(first)
            if call.replayed:
                return call.result
            token = _steps.enter(call)  # current_call(): steps inside the function
            try:
                value = func(*args, **kwargs)
            except BaseException as exc:
                call._abort(exc)  # never raises in place of exc
                raise
            finally:
                _steps.leave(token)
            call._finish(value, None)
            return value

        # The decorator's own key code, for Idempotency.key_of (idem_core.operate).
        wrapper.__idem_prepare__ = prepare  # type: ignore[attr-defined]
        wrapper.__idem_owner__ = self  # type: ignore[attr-defined]
        return cast(Callable[P, R], wrapper)

    # -- operators' tools (idem_core.operate) ----------------------------------------------

    def key_of(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        """The stored key of ``func(*args, **kwargs)``: ``func`` decorated by
        :meth:`idempotent` (computed by the decorator's own code), or a handler made by
        :meth:`lambda_handler`, :meth:`batch_handler` (give one record) or :meth:`consumer`
        (give the event or message). For ``claim`` use :meth:`key_for` with the scope; for
        the HTTP middleware, :meth:`http_key`."""
        from .operate import key_of

        return key_of(self, self._key_limit(), func, args, kwargs)

    def http_key(
        self,
        key: str,
        *,
        identity: Any = None,
        credentials: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        anonymous: bool = False,
    ) -> str:
        """The stored key of an HTTP request carrying ``Idempotency-Key: key``, as the HTTP
        middleware (ASGI, WSGI, FastAPI, Django) computes it: ``identity`` is what its
        ``identify`` returned for the caller; without one, ``credentials`` are the request's
        credentials as the middleware reads them (``{"authorization": "Bearer ..."}``,
        ``"cookie:NAME"`` for a session cookie); ``anonymous`` for a middleware that allows
        requests with neither."""
        from .integrations.http import stored_identity

        pairs = list(credentials.items() if isinstance(credentials, Mapping) else credentials or [])
        found = stored_identity(identity, pairs, anonymous)
        if found is None:
            raise ConfigurationError(
                "give identity=, credentials= or anonymous=True: the middleware refuses a "
                "request without any"
            )
        return self.key_for((found, key), scope="http")

    def _key_limit(self) -> int:
        store = self._stores.any_store()
        return store.max_key_length if store is not None else 255

    def inspect(self, key: str, result_type: Any = None) -> Any:
        """The record under the stored ``key`` as an :class:`idem_core.operate.RecordInfo`
        (times as UTC datetimes; the result decoded as ``result_type`` if given, raw bytes
        otherwise); :class:`idem_core.operate.RecordNotFound` if there is none."""
        from .operate import inspect as inspect_record

        return inspect_record(self.store, key, result_type)

    def forget(self, key: str) -> bool:
        """Delete the record under the stored ``key`` whatever its state, so the next call
        runs again; True if there was one. Emits ``FORGOTTEN``."""
        from .operate import forget

        return forget(self.store, key, self._emit)

    def release(self, key: str, *, fence: int | None = None) -> Any:
        """Release the claim on ``key`` for a deliberate re-run: a lapsed lease, or the
        live one whose ``fence`` is named; anything else raises
        :class:`idem_core.operate.ReleaseRefused`. Emits ``RELEASED_BY_OPERATOR``."""
        from .operate import release

        return release(self.store, key, fence, self._emit)

    async def ainspect(self, key: str, result_type: Any = None) -> Any:
        """The asyncio twin of :meth:`inspect` (on the running loop's async store)."""
        from .operate import ainspect

        return await ainspect(self.astore, key, result_type)

    async def aforget(self, key: str) -> bool:
        """The asyncio twin of :meth:`forget`."""
        from .operate import aforget

        return await aforget(self.astore, key, self._emit)

    async def arelease(self, key: str, *, fence: int | None = None) -> Any:
        """The asyncio twin of :meth:`release`."""
        from .operate import arelease

        return await arelease(self.astore, key, fence, self._emit)

    # -- integrations (thin delegations to idem_core.integrations) -------------------------

    def lambda_handler(self, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """An AWS Lambda handler run once per key; see
        :func:`idem_core.integrations.aws_lambda.lambda_handler` for the options."""
        from .integrations.aws_lambda import lambda_handler

        return lambda_handler(self, fn, **options)

    def batch_handler(self, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """An SQS/Kinesis/DynamoDB Streams batch handler with per-record idempotency and a
        partial batch response; see :func:`idem_core.integrations.aws_lambda.batch_handler`."""
        from .integrations.aws_lambda import batch_handler

        return batch_handler(self, fn, **options)

    def consumer(self, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """A queue message handler applied once per ``dedup_id``; see
        :func:`idem_core.integrations.consumer.consumer`."""
        from .integrations.consumer import consumer

        return consumer(self, fn, **options)

    def asgi(self, app: Any, **options: Any) -> Any:
        """``app`` wrapped in the ``Idempotency-Key`` middleware; see
        :class:`idem_core.integrations.asgi.IdempotencyMiddleware`."""
        from .integrations.asgi import IdempotencyMiddleware

        return IdempotencyMiddleware(app, idem=self, **options)


#: the settings ``from_url``/``from_env`` pass on to ``Idempotency(...)``
_SETTINGS = tuple(
    name
    for name in inspect.signature(Idempotency.__init__).parameters
    if name not in ("self", "url", "client", "store_options")
)


def _scope(scope: object) -> str:
    if type(scope) is str:
        return scope
    raise ConfigurationError(f"scope must be a string, got {scope!r}")


def _bind(store: Any, connection: Any) -> Any:
    bind = getattr(store, "bind", None)
    if bind is None:
        raise ConfigurationError(
            f"{type(store).__name__} cannot join a caller's transaction (connection=...)"
        )
    return bind(connection)


def _return_type(func: Callable[..., Any]) -> Any:
    """The declared result type, or an ``Unresolved`` one to resolve on the first call."""
    try:
        return return_type(func)
    except NameError:
        return Unresolved(func)
