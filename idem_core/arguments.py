"""A decorated function's arguments: bound to parameter names, and the key and payload
selected from them.

The default fingerprint covers every argument in *parameter order*, with defaults applied,
however the call passed them (positionally, by keyword, in any keyword order); a ``**kwargs``
catch-all is a dict, which the canonical encoding sorts. A first parameter named ``self`` or
``cls`` (a method, a classmethod, a Celery ``bind=True`` task) is left out of the default
fingerprint and of a key callable's positional arguments: it is the object the call runs on,
not its input. A key or payload callable may still ask for it by name. So is the argument a
``connection=`` name points to.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigurationError, KeyMissing

#: parameter names of the object a method runs on, left out of keys and fingerprints
RECEIVERS = ("self", "cls")


class Binder:
    """Maps a call's arguments to parameter names, cheaply for plain signatures."""

    __slots__ = ("arity", "defaults", "names", "omit", "positional", "sig", "simple", "skip")

    def __init__(self, func: Callable[..., Any]) -> None:
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the signature of {func!r}: {exc}") from exc
        self.sig = sig
        params = list(sig.parameters.values())
        self.names = [p.name for p in params]
        self.arity = len(params)
        #: every parameter can be passed by position or by keyword: no *args, **kwargs,
        #: positional-only or keyword-only ones; such calls are bound without inspect
        self.simple = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        self.positional = [p.name for p in params if p.kind is not p.KEYWORD_ONLY]
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}
        first = params[0] if params else None
        self.skip = int(
            first is not None
            and first.name in RECEIVERS
            and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
        )
        #: other arguments left out of the default fingerprint (a ``connection=`` argument)
        self.omit: frozenset[str] = frozenset()

    def leave_out(self, name: str) -> None:
        """Leave argument ``name`` out of the default fingerprint: it is how the call runs
        (a database connection), not what it does."""
        self.omit = self.omit | {name}

    def index_of(self, key: Any) -> int | None:
        """The position of a single-name key among plain parameters, for the fast path."""
        if self.simple and isinstance(key, str) and key in self.names:
            return self.names.index(key)
        return None

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every parameter's value, in parameter order, defaults applied."""
        if self.simple and len(args) <= self.arity:
            names = self.names
            if not kwargs and len(args) == self.arity:
                return dict(zip(names, args, strict=True))
            bound: dict[str, Any] = {}
            given, used, ok = len(args), 0, True
            for i, name in enumerate(names):
                if i < given:
                    bound[name] = args[i]
                    ok = name not in kwargs  # passed twice: inspect says so below
                elif name in kwargs:
                    bound[name] = kwargs[name]
                    used += 1
                elif name in self.defaults:
                    bound[name] = self.defaults[name]
                else:
                    ok = False  # missing: inspect says so below
                if not ok:
                    break
            if ok and used == len(kwargs):  # no unknown keyword either
                return bound
        try:
            ba = self.sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise KeyMissing(f"cannot bind the call's arguments: {exc}") from exc
        ba.apply_defaults()
        return dict(ba.arguments)

    def values(self, bound: dict[str, Any]) -> tuple[Any, ...]:
        """What the default fingerprint covers: every argument but the receiver (and those
        left out)."""
        if self.omit:
            omit = self.omit
            values = tuple(v for k, v in bound.items() if k not in omit)
        else:
            values = tuple(bound.values())
        return values[self.skip :] if self.skip else values


def extractor(
    spec: str | Sequence[str] | Callable[..., Any], what: str, binder: Binder
) -> Callable[[dict[str, Any]], Any]:
    """A function of the bound arguments for a key, payload or connection spec."""
    names = binder.names
    if callable(spec):
        try:
            params = list(inspect.signature(spec).parameters)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{what}: cannot read the signature of {spec!r}") from exc
        skip = binder.skip

        def by_callable(bound: dict[str, Any]) -> Any:
            try:
                if all(p in bound for p in params):
                    return spec(**{p: bound[p] for p in params})
                values = list(bound.values())
                return spec(*(values[skip:] if skip else values))
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                if what == "key":
                    raise KeyMissing(f"the key function failed: {exc!r}") from exc
                raise

        return by_callable
    if isinstance(spec, str):
        fields = [spec]
    elif isinstance(spec, Sequence) and spec and all(isinstance(f, str) for f in spec):
        fields = list(spec)
    else:
        raise ConfigurationError(
            f"{what} must be an argument name, a non-empty list of argument names or a "
            f"callable over the arguments, got {spec!r}"
        )
    unknown = [f for f in fields if f not in names]
    if unknown:
        raise ConfigurationError(f"{what}: no argument named {', '.join(unknown)}")
    if len(fields) == 1:
        only = fields[0]

        def one(bound: dict[str, Any]) -> Any:
            try:
                return bound[only]
            except KeyError:
                raise KeyMissing(f"argument {only!r} is missing") from None

        return one
    if what == "key":

        def parts(bound: dict[str, Any]) -> tuple[str, ...]:
            # A multi-part key: keys.encode_key escapes each part, so ("a:b", "c") and
            # ("a", "b:c") are two keys.
            values = tuple(bound.get(f) for f in fields)
            bad = [
                f for f, v in zip(fields, values, strict=True) if not isinstance(v, str) or not v
            ]
            if bad:
                raise KeyMissing(f"key arguments must be non-empty strings: {', '.join(bad)}")
            return values  # type: ignore[return-value]

        return parts
    return lambda bound: {f: bound.get(f) for f in fields}
