"""What a declared result type allows, decided once when a function is decorated.

A return annotation (or ``result_type=``) becomes a *value format*: how a result is encoded for
the store and decoded on replay. msgspec handles builtins, dataclasses, msgspec Structs,
TypedDicts, NamedTuples, enums, ``datetime``/``Decimal``/``UUID``...; an annotation naming a
pydantic model is handled by pydantic (imported by the user's own code already, never by us).
Anything else cannot be stored, and that is a ``ConfigurationError`` at decoration time rather
than an error after the function has run.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
import typing
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import msgspec.inspect as mi

from .errors import ConfigurationError

_any_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()


class ResultTypeWarning(UserWarning):
    """A result from a function with no declared return type would replay as another type."""


class Decoder(typing.Protocol):
    def decode(self, buf: bytes, /) -> Any: ...


class ValueFormat(NamedTuple):
    """How results of one declared type are stored."""

    #: decodes a stored body; raises ``msgspec.ValidationError`` when it does not fit the type
    decoder: Decoder
    #: turns a value into what msgspec encodes (None: the value itself)
    dump: Callable[[Any], Any] | None
    #: whether an encoded value is decoded once more before storing, to prove it replays
    checked: bool
    #: no type declared: replays decode to msgspec's defaults (dicts, lists, str...)
    untyped: bool


UNTYPED = ValueFormat(_any_decoder, None, False, True)


def type_name(tp: Any) -> str:
    if isinstance(tp, type):
        if tp.__module__ == "builtins":
            return tp.__qualname__
        return f"{tp.__module__}.{tp.__qualname__}"
    return repr(tp).replace("typing.", "")


@functools.lru_cache(maxsize=256)
def _cached_format(tp: Any) -> ValueFormat:
    return _build_format(tp)


def value_format(tp: Any) -> ValueFormat:
    """The format for results declared as ``tp``; ``ConfigurationError`` if none can store it."""
    if tp is Any or tp is object:
        return UNTYPED
    try:
        return _cached_format(tp)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return _build_format(tp)  # e.g. Annotated metadata that cannot be hashed


def _build_format(tp: Any) -> ValueFormat:
    try:
        info = mi.type_info(tp)
    except Exception as exc:
        raise ConfigurationError(
            f"a result declared as {type_name(tp)} cannot be stored: {exc}; declare a type "
            "idem-core can encode (builtins, dataclasses, msgspec Structs, TypedDicts, "
            "pydantic models...) or pass result_type=..."
        ) from exc
    customs: list[type] = []
    _collect_custom(info, set(), customs)
    if not customs:
        return ValueFormat(msgspec.msgpack.Decoder(tp), None, True, False)
    unknown = [c for c in customs if not _is_pydantic(c)]
    if unknown:
        names = ", ".join(sorted({type_name(c) for c in unknown}))
        raise ConfigurationError(
            f"a result declared as {type_name(tp)} cannot be stored: idem-core cannot encode "
            f"{names}; use a dataclass, msgspec Struct, TypedDict or pydantic model, or pass "
            "result_type=..."
        )
    return _pydantic_format(tp)


def _collect_custom(node: Any, seen: set[int], out: list[type]) -> None:
    """The classes msgspec does not know (``CustomType``) anywhere inside a type's info."""
    if id(node) in seen:
        return  # recursive types share their nodes
    seen.add(id(node))
    if isinstance(node, mi.CustomType):
        if node.cls is not object:  # ``object`` decodes like Any
            out.append(node.cls)
        return
    for field in msgspec.structs.fields(node):
        _visit(getattr(node, field.name), seen, out)


def _visit(value: Any, seen: set[int], out: list[type]) -> None:
    if isinstance(value, mi.Type):
        _collect_custom(value, seen, out)
    elif isinstance(value, mi.Field):
        _collect_custom(value.type, seen, out)
    elif isinstance(value, tuple):
        for item in value:
            _visit(item, seen, out)


def _is_pydantic(cls: type) -> bool:
    # A pydantic model can only exist once its defining code imported pydantic: looking in
    # sys.modules keeps pydantic an optional dependency that we never import ourselves.
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(cls, type) and issubclass(cls, pydantic.BaseModel)


class _PydanticDecoder:
    """Replays through pydantic's own JSON round trip, so strict models, aliases and custom
    serialisers come back exactly as ``model_dump_json``/``model_validate_json`` would."""

    __slots__ = ("_adapter",)

    def __init__(self, adapter: Any) -> None:
        self._adapter = adapter

    def decode(self, buf: bytes, /) -> Any:
        plain = _any_decoder.decode(buf)
        try:
            return self._adapter.validate_json(msgspec.json.encode(plain))
        except Exception as exc:
            raise msgspec.ValidationError(str(exc)) from exc


def _pydantic_format(tp: Any) -> ValueFormat:
    pydantic = sys.modules["pydantic"]
    try:
        adapter = pydantic.TypeAdapter(tp)
    except Exception as exc:
        raise ConfigurationError(
            f"a result declared as {type_name(tp)} cannot be stored: pydantic cannot handle it "
            f"({exc}); pass result_type=..."
        ) from exc

    def dump(value: Any) -> Any:
        # The stored body is plain msgpack (readable without pydantic); warnings are off
        # because the round trip below reports a value that does not fit the type.
        return msgspec.json.decode(adapter.dump_json(value, by_alias=True, warnings=False))

    return ValueFormat(_PydanticDecoder(adapter), dump, True, False)


# -- return annotations -------------------------------------------------------------------


class Unresolved:
    """A return annotation naming something not defined yet (a forward reference, or a name
    imported under ``TYPE_CHECKING``): resolved on the first call instead."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def resolve(self) -> Any:
        try:
            return return_type(self.func)
        except NameError as exc:
            raise ConfigurationError(
                f"cannot resolve the return annotation of {self.func.__qualname__}: {exc}; "
                "define the type at module level or pass result_type=..."
            ) from exc


def return_type(func: Callable[..., Any]) -> Any:
    """``func``'s return annotation as a type (Any when absent or ``None``).

    Only the return annotation is evaluated: a parameter annotated with a name imported under
    ``TYPE_CHECKING`` must not stop the result from being typed. Raises ``NameError`` for a
    name that is not defined (yet), ``ConfigurationError`` for anything else.
    """
    annotations = getattr(func, "__annotations__", None) or {}
    if "return" not in annotations:
        return Any
    inner = inspect.unwrap(func)
    stub = _stub()
    stub.__annotations__ = {"return": annotations["return"]}
    try:
        hints = typing.get_type_hints(
            stub, globalns=getattr(inner, "__globals__", {}), include_extras=True
        )
    except NameError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"cannot resolve the return annotation of {func.__qualname__}: {exc}; "
            "pass result_type=..."
        ) from exc
    ret = hints.get("return", Any)
    # ``None`` has nothing to decode to; ``NoReturn`` functions only ever store cached errors.
    return Any if ret is type(None) or ret is typing.NoReturn or ret is typing.Never else ret


def _stub() -> Callable[[], None]:
    def stub() -> None:
        return None

    return stub


# -- silent type changes ------------------------------------------------------------------

_PLAIN = frozenset({str, int, float, bool, bytes, type(None)})
_SAMPLE = 16  # items looked at per list/dict level
_BUDGET = 64  # values looked at per result: a hint, not a proof, so it stays cheap
_warned: set[str | None] = set()


def replay_change(value: Any) -> tuple[type, type] | None:
    """(original type, replayed type) of a value inside ``value`` that an untyped replay would
    decode differently (a dataclass as a dict, a Decimal as a str...), or None."""
    stack = [value]
    budget = _BUDGET
    while stack and budget:
        budget -= 1
        item = stack.pop()
        kind = type(item)
        if kind in _PLAIN:
            continue
        if kind is list:
            stack.extend(itertools.islice(item, _SAMPLE))
        elif kind is dict:
            stack.extend(itertools.islice(item.values(), _SAMPLE))
        else:
            from .codec import _encoder

            try:
                replayed = type(_any_decoder.decode(_encoder.encode(item)))
            except Exception:
                continue  # not encodable: reported as not stored, not as a type change
            if replayed is not kind:
                return kind, replayed
    return None


def warn_if_replay_differs(value: Any, function: str | None, key: str = "") -> None:
    """Warn once per function (once for all ``claim()`` blocks without a scope) when an
    untyped result would replay as another type."""
    if function in _warned:
        return
    change = replay_change(value)
    if change is None:
        return
    _warned.add(function)
    original, replayed = change
    where = function or f"a claim() block (key {key!r})"
    found = "" if type(value) is original else f" (inside a {type_name(type(value))})"
    warnings.warn(
        ResultTypeWarning(
            f"{where} returned a {type_name(original)}{found} that replays as a "
            f"{type_name(replayed)}, because no result type is declared: annotate the return "
            f"type or pass result_type=... so duplicates get a {type_name(original)} too"
        ),
        stacklevel=5,
    )
