"""Stores found by URL scheme through the ``idem_core.stores`` entry-point group, lazily."""

from __future__ import annotations

import importlib
import threading
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigurationError
from .store import AsyncStore, Backend, Store

GROUP = "idem_core.stores"

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
        eps = entry_points(group=GROUP)
        for name in candidates:
            found = eps.select(name=name)
            for ep in found:
                try:
                    backend = cast(Backend, ep.load())
                except ImportError as exc:
                    raise ConfigurationError(_missing(name, exc)) from exc
                _loaded[name] = backend
                return backend
    extra = next((KNOWN_EXTRAS[n] for n in candidates if n in KNOWN_EXTRAS), None)
    if extra is not None:
        raise ConfigurationError(
            f"no store is registered for {scheme!r}; is idem-core installed? "
            f"try: pip install 'idem-core[{extra}]'"
            if extra
            else f"no store is registered for {scheme!r}; reinstall idem-core"
        )
    known = ", ".join(sorted({ep.name for ep in eps}))
    raise ConfigurationError(f"unknown store URL scheme {scheme!r}; registered schemes: {known}")


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
