"""Settings checked once, where they are given (``Idempotency(...)``, the decorator,
``claim(...)``), so a bad value is a :class:`ConfigurationError` naming the setting and what it
accepts, never a store error or a silent default later."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConfigurationError

#: the longest ttl or lease: every store holds it (microsecond timestamps far from overflow,
#: DynamoDB's TTL attribute, Redis PX) and nothing sensible needs longer
MAX_SECONDS = 10 * 365 * 86400
#: the longest namespace: a hashed key keeps its first 32 characters, and a short one leaves
#: room for the key on stores with a 255-character limit
MAX_NAMESPACE = 64
MAX_RETRIES = 100


def seconds(name: str, value: object, *, none: bool = False) -> float:
    """A positive, finite number of seconds up to 10 years (``None`` when ``none``)."""
    # The common case first, cheaply (claim() checks its settings on every call): NaN and
    # infinities fail the comparison.
    if (type(value) is float or type(value) is int) and 0 < value <= MAX_SECONDS:
        return float(value)
    if value is None and none:
        return value  # type: ignore[return-value]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= MAX_SECONDS
    ):
        accepted = "a number of seconds > 0 and <= 315360000 (10 years)"
        if none:
            accepted += ", or None"
        if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
            accepted += "; 0 does not mean 'the default' or 'forever'"
        raise ConfigurationError(f"{name} must be {accepted}, got {value!r}")
    return float(value)


def count(name: str, value: object, maximum: int | None = None) -> int:
    """A non-negative int (up to ``maximum``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or (maximum is not None and value > maximum)
    ):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigurationError(f"{name} must be an int >= 0{upper}, got {value!r}")
    return value


def choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        options = " or ".join(repr(a) for a in allowed)
        raise ConfigurationError(f"{name} must be {options}, got {value!r}")
    return value


def text(name: str, value: object, *, forbidden: str = "", maximum: int | None = None) -> str:
    """A non-empty string that every store can keep in a key (no NUL, no lone surrogate)."""
    problem = ""
    if not isinstance(value, str) or not value:
        problem = "a non-empty string"
    elif maximum is not None and len(value) > maximum:
        problem = f"at most {maximum} characters"
    elif "\x00" in value or any(c in value for c in forbidden):
        problem = "free of NUL" + "".join(f", {c!r}" for c in forbidden)
    else:
        try:
            value.encode()
        except UnicodeEncodeError:
            problem = "free of lone surrogates"
    if problem:
        raise ConfigurationError(f"{name} must be {problem}, got {value!r}")
    return value  # type: ignore[return-value]


def exception_types(name: str, value: object) -> tuple[type[BaseException], ...]:
    if value == ():
        return ()
    if not isinstance(value, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in value
    ):
        raise ConfigurationError(f"{name} must be a tuple of exception classes, got {value!r}")
    return value


def hooks(name: str, value: object) -> list[Callable[..., Any]]:
    """``None``, one callable or an iterable of callables."""
    if value is None:
        return []
    if callable(value):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        items = list(value)
        if all(callable(h) for h in items):
            return items
    raise ConfigurationError(f"{name} must be a callable or a list of callables, got {value!r}")


def known(where: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse unknown setting names (a typo would otherwise be ignored)."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(allowed))}"
        )
