"""Stores found by URL scheme through the ``idem_core.stores`` entry-point group, lazily.

idem-core's own distribution is asked first: its entry points are one file, where listing
the group across every installed distribution reads them all (tens of milliseconds of a
Lambda cold start). Schemes it does not declare (third-party stores) take the full scan.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigurationError
from .store import AsyncStore, Backend, Store

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

GROUP = "idem_core.stores"
DISTRIBUTION = "idem-core"

# Schemes shipped with idem-core, so a broken or partial install still names the extra to add.
KNOWN_EXTRAS = {
    "memory": "",
    "sqlite": "sql",
    "postgresql": "postgres",
    "postgres": "postgres",
    "mysql": "mysql",
    "mariadb": "mysql",
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "redis+cluster": "redis",
    "redis+sentinel": "redis",
    "dynamodb": "dynamodb",
}

_lock = threading.Lock()
_loaded: dict[str, Backend] = {}


def scheme_of(url: str) -> str:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"not a store URL: {url!r} (expected e.g. 'memory://')")
    return url.split("://", 1)[0].lower()


def backend_for(url: str) -> Backend:
    """The backend registered for the URL's scheme (``a+b`` falls back to ``a``)."""
    scheme = scheme_of(url)
    candidates = [scheme] if "+" not in scheme else [scheme, scheme.split("+", 1)[0]]
    with _lock:
        for name in candidates:
            if name in _loaded:
                return _loaded[name]
        # the exact scheme only: ``a+b`` from another distribution must win over our ``a``
        backend = _load(_own_entry_points(), candidates[:1])
        if backend is None:  # not one of ours: every distribution's entry points
            every = list(_all_entry_points())
            backend = _load(every, candidates)
        if backend is not None:
            return backend
    extra = next((KNOWN_EXTRAS[n] for n in candidates if n in KNOWN_EXTRAS), None)
    if extra is not None:
        raise ConfigurationError(
            f"no store is registered for {scheme!r}; is idem-core installed? "
            f"try: pip install 'idem-core[{extra}]'"
            if extra
            else f"no store is registered for {scheme!r}; reinstall idem-core"
        )
    known = ", ".join(sorted({ep.name for ep in every}))
    raise ConfigurationError(f"unknown store URL scheme {scheme!r}; registered schemes: {known}")


def _load(eps: Iterable[EntryPoint], candidates: list[str]) -> Backend | None:
    """The backend of the first candidate scheme among ``eps``, loaded and remembered."""
    for name in candidates:
        for ep in eps:
            if ep.name != name:
                continue
            try:
                backend = cast(Backend, ep.load())
            except ImportError as exc:
                raise ConfigurationError(_missing(name, exc)) from exc
            _loaded[name] = backend
            return backend
    return None


class _OwnEntryPoint:
    """One line of our ``entry_points.txt``: ``name = module:attr``."""

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value

    def load(self) -> Any:
        module, _, attr = self.value.partition(":")
        attr = attr.split("[", 1)[0]  # "module:attr [extra]"
        return getattr(importlib.import_module(module.strip()), attr.strip())


def _own_entry_points() -> list[Any]:
    """Our ``idem_core.stores`` entry points, read from our distribution's
    ``entry_points.txt`` where it is a plain ``.dist-info`` folder on ``sys.path`` (an
    installed wheel, an editable install): importing :mod:`importlib.metadata` alone costs
    a cold start ~25 ms. Any other layout asks importlib.metadata."""
    text = _own_entry_points_text()
    if text is None:
        from importlib import metadata

        try:
            found = metadata.distribution(DISTRIBUTION).entry_points
        except metadata.PackageNotFoundError:  # a source tree: the full scan decides
            return []
        return [ep for ep in found if ep.group == GROUP]
    eps: list[Any] = []
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]").strip()
        elif section == GROUP and "=" in line:
            name, _, value = line.partition("=")
            eps.append(_OwnEntryPoint(name.strip(), value.strip()))
    return eps


def _own_entry_points_text() -> str | None:
    prefix = DISTRIBUTION.replace("-", "_") + "-"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix) and name.endswith(".dist-info"):
                try:
                    with open(os.path.join(entry, name, "entry_points.txt")) as f:
                        return f.read()
                except OSError:
                    return None
    return None


def _all_entry_points() -> Iterable[EntryPoint]:
    from importlib import metadata

    return metadata.entry_points(group=GROUP)


def register(scheme: str, backend: Backend) -> None:
    """Register a backend in-process, without an entry point (tests, applications)."""
    with _lock:
        _loaded[scheme.lower()] = backend


def open_store(url: str, *, client: Any = None, **options: Any) -> Store:
    return backend_for(url).open(url, client=client, **options)


def open_async_store(url: str, *, client: Any = None, **options: Any) -> AsyncStore:
    return backend_for(url).open_async(url, client=client, **options)


def import_driver(module: str, extra: str) -> ModuleType:
    """Import a backend's driver, or raise ConfigurationError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"{module!r} is not installed; install it with: pip install 'idem-core[{extra}]'"
        ) from exc


def url_options(url: str) -> dict[str, str]:
    """The query parameters of a store URL, as a plain dict (the last value of a key wins)."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def _missing(scheme: str, exc: ImportError) -> str:
    extra = KNOWN_EXTRAS.get(scheme, scheme)
    return (
        f"the store for {scheme!r} could not be imported ({exc}); "
        f"install it with: pip install 'idem-core[{extra}]'"
    )
