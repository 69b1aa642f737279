"""How results are stored: a tag byte, then msgpack. Nothing a store returns is unpickled."""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from .errors import CorruptRecord, ReplayedError, ResultNotSerializable

VALUE = 0x01
ERROR = 0x02

_encoder = msgspec.msgpack.Encoder()
_error_decoder = msgspec.msgpack.Decoder(dict[str, Any])


class ResultCodec:
    """Encodes results, and decodes them back to the declared type on replay."""

    __slots__ = ("_decoder", "cache_errors", "result_type")

    def __init__(
        self, result_type: Any = Any, cache_errors: tuple[type[BaseException], ...] = ()
    ) -> None:
        self.result_type = result_type
        self.cache_errors = cache_errors
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(result_type)

    def encode(self, value: Any) -> bytes:
        try:
            return b"\x01" + _encoder.encode(value)
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            kind = type(value)
            raise ResultNotSerializable(
                f"cannot store a result of type {kind.__module__}.{kind.__qualname__}: {exc}"
            ) from exc

    def decode(self, data: bytes | None, key: str) -> Any:
        """The stored value, or raise the stored error."""
        if not data:
            raise CorruptRecord(f"the record for {key!r} is completed but has no result")
        tag = data[0]
        try:
            if tag == VALUE:
                return self._decoder.decode(data[1:])
            if tag == ERROR:
                info = _error_decoder.decode(data[1:])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorruptRecord(
                f"the stored result for {key!r} does not decode as {self.result_type!r}: {exc}"
            ) from exc
        else:
            if tag == ERROR:
                raise rebuild_error(info, self.cache_errors)
        raise CorruptRecord(f"the stored result for {key!r} has an unknown format ({tag:#x})")


def encode_error(exc: BaseException) -> bytes:
    cls = type(exc)
    args: list[Any]
    try:
        _encoder.encode(list(exc.args))
        args = list(exc.args)
    except (TypeError, msgspec.EncodeError, OverflowError):
        args = [str(exc)]
    return b"\x02" + _encoder.encode(
        {"module": cls.__module__, "qualname": cls.__qualname__, "args": args}
    )


def rebuild_error(info: dict[str, Any], allowed: tuple[type[BaseException], ...]) -> Exception:
    """The stored exception, rebuilt only as a type the caller allowed to be cached.

    Names are looked up among modules already imported: what a store returns never makes us
    import code.
    """
    module, qualname = str(info.get("module", "")), str(info.get("qualname", ""))
    args = tuple(info.get("args") or ())
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if (
        allowed
        and isinstance(obj, type)
        and issubclass(obj, Exception)
        and issubclass(obj, allowed)
    ):
        try:
            return obj(*args)
        except Exception:
            return ReplayedError(f"{module}.{qualname}", args)
    return ReplayedError(f"{module}.{qualname}", args)
