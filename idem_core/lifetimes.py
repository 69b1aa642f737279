"""Which store an :class:`~idem_core.Idempotency` uses, where, and who closes it.

One :class:`Stores` per ``Idempotency``:

* **Given stores** (``store=``, ``astore=``) are used as they are and never closed. A given
  async store is used from every event loop: binding it to one loop is the caller's job.
* **Opened stores** (``url=``) belong to us: one sync store per process, opened on first use,
  and one async store per event loop, opened on first use inside that loop (drivers bind
  their connections to the loop that made them). A forked child drops the parent's stores
  without closing them (the parent still uses those sockets) and opens its own on first use.
* **In-process stores** (``memory://``) keep their records in this process: the sync store is
  the data, and each loop gets an ``async_twin()`` view of it, so every loop and thread sees
  the same records. Closing never drops them.
* **A loop that has closed** runs no coroutine, so its store cannot be closed: the entry is
  dropped (abandoned) at the next lookup. A ``WeakKeyDictionary`` would not do: the store's
  sockets keep their loop alive.

``close()`` closes the sync store we opened; ``aclose()`` closes the store of the running loop
(and forgets those of loops already closed). Neither is final: the next call opens a new store,
as ``Engine.dispose()`` does, so one module-level ``Idempotency`` can serve an application
through lifespans, test cases and Lambda invocations. Records are never lost by closing.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from . import _process
from .errors import ConfigurationError
from .registry import backend_for, open_async_store, open_store
from .store import AsyncStore, Store

if TYPE_CHECKING:
    import asyncio

this_thread = threading.get_ident


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, or None. Never raises; but on Python 3.11 each call makes a
    getpid() system call (its fork check), so the hot path avoids it: see ``Stores.hot``.
    asyncio is not imported for it (a cold start's cost): no loop runs where it never was."""
    aio = sys.modules.get("asyncio")
    if aio is None:
        return None
    return cast("asyncio.AbstractEventLoop | None", aio._get_running_loop())


class _Entry:
    """An async store opened for one event loop."""

    __slots__ = ("live", "loop", "owned", "raw", "store")

    def __init__(self, loop: Any, raw: AsyncStore, store: AsyncStore, owned: bool) -> None:
        self.loop = loop
        self.raw = raw  # what we close: an instrument wrapper need not forward close()
        self.store = store  # what calls use
        self.owned = owned
        self.live = True  # False once closed or abandoned: no thread may use it any more


class _NoLoop:
    _thread_id = None  # as a BaseEventLoop that is not running


_NO_ENTRY = _Entry(_NoLoop(), cast(AsyncStore, None), cast(AsyncStore, None), owned=False)
_NO_ENTRY.live = False  # never usable: a lookup that finds it opens a store


class Stores:
    """The stores of one ``Idempotency``: see the module's docstring."""

    __slots__ = (
        "__weakref__",
        "_agiven",
        "_client",
        "_given",
        "_in_process",
        "_instrument",
        "_lock",
        "_loops",
        "_opened",
        "_options",
        "hot",
        "sync",
        "url",
    )

    def __init__(
        self,
        *,
        store: Store | None,
        astore: AsyncStore | None,
        url: str | None,
        client: Any,
        options: dict[str, Any],
        instrument: Callable[[Any], Any] | None,
    ) -> None:
        self.url = url
        self._client = client
        self._options = options
        self._instrument = instrument
        self._in_process = url is not None and bool(getattr(backend_for(url), "in_process", False))
        self._given: Store | None = self._wrap(store) if store is not None else None
        self._agiven: AsyncStore | None = self._wrap(astore) if astore is not None else None
        #: the sync store to use, or None: the hot path reads it, ``sync_store()`` fills it
        self.sync: Store | None = self._given
        self._opened: Store | None = None
        #: the last entry looked up: the hot path's shortcut (see ``async_store``)
        self.hot: _Entry = _NO_ENTRY
        self._loops: dict[asyncio.AbstractEventLoop | None, _Entry] = {}
        self._lock = threading.Lock()
        _process.reset_in_child(self)

    def _wrap(self, store: Any) -> Any:
        return self._instrument(store) if self._instrument is not None else store

    # -- sync ------------------------------------------------------------------------------

    def sync_store(self) -> Store:
        """This process's sync store, opened on first use."""
        store = self.sync
        if store is not None:
            return store
        with self._lock:
            if self.sync is None:
                if self.url is None:
                    raise ConfigurationError("this Idempotency was given only an async store")
                self._opened = open_store(self.url, client=self._client, **self._options)
                self.sync = self._wrap(self._opened)
            return cast(Store, self.sync)

    def close(self) -> None:
        """Close the sync store we opened; the next call opens a new one. In-process
        records are kept (there is nothing to release)."""
        with self._lock:
            opened = self._opened
            if opened is None or self._in_process:
                return
            self._opened = None
            self.sync = None
        opened.close()

    # -- async -----------------------------------------------------------------------------

    def async_store(self) -> AsyncStore:
        """The running loop's async store, opened on first use inside it.

        The shortcut: asyncio's loops record the thread running them (``_thread_id``, None
        once stopped), and a thread runs one loop at a time; so when the last entry's loop
        runs on this thread, it is the running loop. One attribute read and ``get_ident()``
        instead of ``get_running_loop()`` (a system call on Python 3.11). Other loops
        (uvloop) take the lookup every time.
        """
        entry = self.hot
        if entry.loop._thread_id == this_thread() and entry.live:
            return entry.store
        loop = running_loop()
        entry = self._loops.get(loop, _NO_ENTRY)  # a dict read needs no lock
        if not entry.live:
            with self._lock:
                entry = self._loops.get(loop, _NO_ENTRY)
                if not entry.live:
                    self._abandon_closed_loops()
                    entry = self._open_async(loop)
                    self._loops[loop] = entry
        import asyncio  # no cost: a loop runs, so asyncio is imported

        if isinstance(loop, asyncio.BaseEventLoop):  # whose _thread_id we know the meaning of
            self.hot = entry  # one reference: other threads see the old entry or this one
        return entry.store

    def _open_async(self, loop: asyncio.AbstractEventLoop | None) -> _Entry:
        if self._agiven is not None:
            return _Entry(loop, self._agiven, self._agiven, owned=False)
        twin_of: Any = None
        if self._given is not None:
            twin_of = self._given
        elif self._in_process:
            # The sync store holds the records: every loop's twin must see the same ones.
            if self._opened is None:
                self._opened = open_store(cast(str, self.url), client=self._client, **self._options)
                self.sync = self._wrap(self._opened)
            twin_of = self._opened
        twin = getattr(twin_of, "async_twin", None) if twin_of is not None else None
        if twin is not None:
            raw = cast(AsyncStore, twin())
            return _Entry(loop, raw, self._wrap(raw), owned=False)
        if self.url is None:
            raise ConfigurationError("this Idempotency was given only a sync store")
        if loop is None:
            raise ConfigurationError(
                "an async store opened from a URL belongs to one event loop: use astore, "
                "aclaim() and async functions inside a running loop"
            )
        raw = open_async_store(self.url, client=self._client, **self._options)
        return _Entry(loop, raw, self._wrap(raw), owned=True)

    def _abandon_closed_loops(self) -> None:
        """Forget the stores of loops that have closed: nothing can await their close()."""
        for loop, entry in list(self._loops.items()):
            if loop is not None and loop.is_closed():
                entry.live = False
                del self._loops[loop]

    async def aclose(self) -> None:
        """Close the running loop's store (if we opened it) and forget closed loops' ones."""
        loop = running_loop()
        with self._lock:
            entry = self._loops.pop(loop, None)
            if entry is not None:
                entry.live = False  # every thread's shortcut to it is now a miss
            self._abandon_closed_loops()
        if entry is not None and entry.owned:
            await entry.raw.close()

    # -- the rest ---------------------------------------------------------------------------

    def any_store(self) -> Store | AsyncStore | None:
        """A store already at hand, without opening one (e.g. for its ``max_key_length``)."""
        if self.sync is not None:
            return self.sync
        if self._agiven is not None:
            return self._agiven
        entries = list(self._loops.values())
        return entries[0].store if entries else None

    def _after_fork_in_child(self) -> None:
        # The parent's sockets are not ours: forget them unclosed (closing would send a
        # goodbye on the parent's connections). The lock may have been held by a thread that
        # does not exist here. The same rule for in-process stores: the child starts empty.
        self._lock = threading.Lock()
        self._loops = {}
        self.hot = _NO_ENTRY
        self._opened = None
        self.sync = self._given
