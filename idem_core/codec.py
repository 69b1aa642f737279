"""How results are stored: a tag byte, then msgpack. Nothing a store returns is unpickled.

``VALUE`` bodies hold the result; ``ERROR`` bodies hold an exception as
``{"module", "qualname", "args", "bases"}``: a ``cache_errors`` exception, or the marker of a
result that could not be stored (``idem_core.errors.ResultNotSerializable``). Replaying an
error maps the stored names to the exception types the caller listed, never looking anything
up in a module: what a store returns never makes us import or run code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from .errors import ConfigurationError, CorruptRecord, ReplayedError, ResultNotSerializable
from .results import UNTYPED, Unresolved, type_name, value_format, warn_if_replay_differs

VALUE = 0x01
ERROR = 0x02

#: longest reason kept in a "not stored" record: the marker must stay small to be storable
_REASON_CHARS = 300
#: ancestors kept with a stored error, so a subclass replays as the nearest listed type
_BASES = 8


def _enc_hook(obj: Any) -> Any:
    # A pydantic model returned where no type is declared: stored as its JSON form (and the
    # type change on replay is warned about, see ``results.warn_if_replay_differs``).
    if hasattr(type(obj), "__pydantic_serializer__") and hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", by_alias=True)
    raise NotImplementedError(f"objects of type {type_name(type(obj))} are not supported")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


class _StoredError(msgspec.Struct):
    module: str
    qualname: str
    args: list[Any]
    bases: list[tuple[str, str]] = []


_error_decoder = msgspec.msgpack.Decoder(_StoredError)
_NOT_STORED = (ResultNotSerializable.__module__, ResultNotSerializable.__qualname__)


class ResultCodec:
    """Encodes results, and decodes them back to the declared type on replay.

    Built once per decorated function (or per ``result_type`` for ``claim()``): the declared
    type is checked here, so a type that cannot be stored fails at decoration time.
    """

    __slots__ = (
        "_allowed",
        "_check",
        "_decoder",
        "_dump",
        "cache_errors",
        "pending",
        "result_type",
        "untyped",
    )

    def __init__(
        self,
        result_type: Any = Any,
        cache_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.cache_errors = cache_errors
        self._allowed = _allowed_errors(cache_errors)
        #: set while the declared type waits for its first use to be resolved
        self.pending: Unresolved | None = None
        if isinstance(result_type, Unresolved):
            self.pending, result_type = result_type, Any
        self._use(result_type)

    def _use(self, result_type: Any) -> None:
        fmt = UNTYPED if result_type is Any else value_format(result_type)
        self.result_type = result_type
        self._decoder = fmt.decoder
        self._dump = fmt.dump
        self._check = fmt.checked
        self.untyped = fmt.untyped

    def ready(self) -> None:
        """Resolve a deferred annotation; ``ConfigurationError`` if it still cannot be."""
        pending = self.pending
        if pending is not None:
            self._use(pending.resolve())
            self.pending = None

    def encode(self, value: Any, function: str | None = None, key: str = "") -> bytes:
        """The stored form of ``value``, proved to decode to the declared type.

        Raises ``ResultNotSerializable`` (naming the types) when it cannot be encoded or would
        not replay as the declared type. With no declared type, a value that would replay as
        another type is warned about once per ``function``.
        """
        dump = self._dump
        try:
            body = _encoder.encode(value if dump is None else dump(value))
        except Exception as exc:  # TypeError, OverflowError, UnicodeEncodeError, pydantic's...
            raise ResultNotSerializable(
                f"cannot store a result of type {type_name(type(value))}: {exc}"
            ) from exc
        if self._check:
            try:
                self._decoder.decode(body)
            except msgspec.DecodeError as exc:
                raise ResultNotSerializable(
                    f"a result of type {type_name(type(value))} does not match the declared "
                    f"type {type_name(self.result_type)}: {exc}"
                ) from exc
        elif self.untyped:
            warn_if_replay_differs(value, function, key)
        return b"\x01" + body

    def decode(self, data: bytes | None, key: str) -> Any:
        """The stored value, or raise the stored error."""
        if not data:
            raise CorruptRecord(f"the record for {key!r} is completed but has no result")
        tag = data[0]
        if tag == VALUE:
            try:
                return self._decoder.decode(data[1:])
            except msgspec.DecodeError as exc:
                raise CorruptRecord(
                    f"the stored result for {key!r} does not decode as "
                    f"{type_name(self.result_type)}: {exc}"
                ) from exc
        if tag == ERROR:
            raise self._rebuild(data, key)
        raise CorruptRecord(f"the stored result for {key!r} has an unknown format ({tag:#x})")

    def _rebuild(self, data: bytes, key: str) -> Exception:
        try:
            info = _error_decoder.decode(data[1:])
        except msgspec.DecodeError as exc:
            raise CorruptRecord(f"the stored error for {key!r} is malformed: {exc}") from exc
        return rebuild_error(info, self._allowed)


def _allowed_errors(
    cache_errors: tuple[type[BaseException], ...],
) -> dict[tuple[str, str], Callable[..., Exception]]:
    allowed: dict[tuple[str, str], Callable[..., Exception]] = {_NOT_STORED: ResultNotSerializable}
    for cls in cache_errors:
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise ConfigurationError(f"cache_errors must be Exception subclasses, not {cls!r}")
        allowed[(cls.__module__, cls.__qualname__)] = cls
    return allowed


def encode_error(exc: BaseException, *, with_bases: bool = True) -> bytes:
    """An exception's stored form: its type's names and ancestors, and its args."""
    cls = type(exc)
    args: list[Any]
    try:
        _encoder.encode(list(exc.args))
        args = list(exc.args)
    except Exception:
        # Whatever the args hold (objects, lone surrogates...), the message always stores.
        args = [_safe_text(str(exc))]
    bases = [
        (base.__module__, base.__qualname__)
        for base in cls.__mro__[1:]
        if with_bases and base not in (Exception, BaseException, object)
    ][:_BASES]
    return b"\x02" + _encoder.encode(
        {"module": cls.__module__, "qualname": cls.__qualname__, "args": args, "bases": bases}
    )


def _safe_text(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def not_stored(key: str, function: str | None, reason: str) -> tuple[bytes, ResultNotSerializable]:
    """The record stored in place of a result that cannot be, and the error duplicates get."""
    reason = _safe_text(reason)
    if len(reason) > _REASON_CHARS:
        reason = reason[: _REASON_CHARS - 3] + "..."
    error = ResultNotSerializable(
        f"the result of {function or 'a claim'} for key {key!r} was not stored: {reason}. "
        "It ran once and is not run again: duplicates raise this error until the record "
        "expires or is deleted"
    )
    return encode_error(error, with_bases=False), error


def rebuild_error(
    info: _StoredError, allowed: dict[tuple[str, str], Callable[..., Exception]]
) -> Exception:
    """The stored exception as a type the caller listed in ``cache_errors``: the stored type
    itself, or for a subclass the nearest listed ancestor. Anything else is a ReplayedError."""
    name = f"{info.module}.{info.qualname}"
    cls = allowed.get((info.module, info.qualname))
    if cls is None:
        for base in info.bases:
            cls = allowed.get(base)
            if cls is not None:
                break
        else:
            return ReplayedError(name, tuple(info.args))
    try:
        return cls(*info.args)
    except Exception:
        return ReplayedError(name, tuple(info.args))
