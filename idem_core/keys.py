"""Idempotency keys and payload fingerprints.

A stored key is built from a tuple (namespace, scope, key parts) and must never be the same for
two different tuples, or one caller would replay another's result. The encoding:

* each part has ``\\`` written ``\\\\`` and ``:`` written ``\\:``, then the parts are joined with
  ``:``: ``namespace:key``, ``namespace:scope:key``, ``namespace:scope:part1:part2``, and a
  multi-part key without a scope ``namespace::part1:part2``. Keys without ``:`` or ``\\`` (the
  common case) read exactly as they are.
* a key longer than the store can hold becomes ``namespace[:32]:\\#`` + a 128-bit hash of the
  encoded key. ``\\#`` never appears in an encoded key, so a hashed key never meets a plain one.

Keys are compared exactly as given: case, trailing spaces and Unicode normalisation all count
(``"é"`` NFC and NFD are two keys). A key containing NUL or a lone surrogate is refused with
:class:`KeyMissing` on every store: PostgreSQL cannot hold NUL in text and no store can hold a
lone surrogate, so we refuse both before any store is touched, whatever the key's length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec

from .errors import KeyMissing

#: What a key may be: one non-empty string, or a tuple (or list) of them (a multi-part key).
RawKey = str | Sequence[str]


def _pydantic(obj: Any) -> Any:
    # Duck typing keeps pydantic optional: a v2 model's class has ``model_dump`` and
    # ``__pydantic_fields__`` (or ``model_fields``); nothing is imported for other objects.
    cls = type(obj)
    if hasattr(cls, "model_dump") and (
        hasattr(cls, "__pydantic_fields__") or hasattr(cls, "model_fields")
    ):
        return obj.model_dump(mode="json")
    raise TypeError(f"Encoding objects of type {cls.__qualname__} is unsupported")


# Sorted maps (and sets) make the encoding canonical: equal payloads hash equally whatever the
# insertion order. Pydantic models are encoded as their JSON-mode dump.
_canonical = msgspec.msgpack.Encoder(order="sorted", enc_hook=_pydantic)

#: the number of characters of the namespace kept in front of a hashed key
_HASHED_NAMESPACE = 32


def _escape(part: str) -> str:
    if ":" in part or "\\" in part:
        return part.replace("\\", "\\\\").replace(":", "\\:")
    return part


def prefix(namespace: str, scope: str, multi: bool = False) -> str:
    """The encoded ``namespace:scope:`` every key of a scope starts with (computed once by the
    decorator). ``multi`` marks a multi-part key without a scope (``namespace::``)."""
    if scope:
        return f"{_escape(namespace)}:{_escape(scope)}:"
    return f"{_escape(namespace)}::" if multi else f"{_escape(namespace)}:"


def _bad_key(raw: object) -> KeyMissing:
    if isinstance(raw, str):
        return KeyMissing("the idempotency key is empty")
    if isinstance(raw, tuple | list):
        return KeyMissing(f"every part of a multi-part key must be a non-empty string: {raw!r}")
    return KeyMissing(
        f"the idempotency key must be a non-empty string, got {type(raw).__name__}: {raw!r}"
        " (convert it with str() in the key function if that is what you mean)"
    )


def encode_key(head: str, namespace: str, raw: object, max_length: int) -> str:
    """``head`` (from :func:`prefix`) followed by the encoded ``raw`` key; hashed when the store
    cannot hold it. ``raw`` is a non-empty string or a tuple/list of them; a multi-part ``raw``
    needs a head with a scope, or ``prefix(namespace, "", multi=True)``."""
    if type(raw) is str and raw:
        key = head + raw if ":" not in raw and "\\" not in raw else head + _escape(raw)
    elif isinstance(raw, tuple | list) and raw:
        if not all(isinstance(p, str) and p for p in raw):
            raise _bad_key(raw)
        # str.__str__: a str subclass (a StrEnum member, say) counts by its text, not its repr
        key = head + ":".join(_escape(str.__str__(p)) for p in raw)
    elif isinstance(raw, str) and raw:
        key = head + _escape(str.__str__(raw))
    else:
        raise _bad_key(raw)
    if key.isascii():  # O(1) in CPython: most keys skip the encoding below
        if "\x00" in key:
            raise KeyMissing(
                f"the idempotency key contains NUL (\\x00), which no store keeps: {key!r}"
            )
        size = len(key)
        if size <= max_length:
            return key
        data = key.encode()
    else:
        try:
            data = key.encode()
        except UnicodeEncodeError:
            raise KeyMissing(
                f"the idempotency key contains a lone surrogate, which no store keeps: {key!r}"
            ) from None
        if "\x00" in key:
            raise KeyMissing(
                f"the idempotency key contains NUL (\\x00), which no store keeps: {key!r}"
            )
        if len(data) <= max_length:
            return key
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    return f"{_escape(namespace[:_HASHED_NAMESPACE])}:\\#{digest}"


def full_key(namespace: str, scope: str, raw: object, max_length: int) -> str:
    """The stored key for (namespace, scope, raw): see the module's docstring."""
    # Idempotency's namespace never holds ':' or '\\': it is used as it is.
    namespace_part = _escape(namespace) if ":" in namespace or "\\" in namespace else namespace
    if scope:
        if ":" in scope or "\\" in scope:
            scope = _escape(scope)
        head = f"{namespace_part}:{scope}:"
    elif type(raw) is str:
        head = namespace_part + ":"
    else:
        # A multi-part key without a scope must not read as (scope, key): ``ns::a:b``.
        multi = isinstance(raw, tuple | list) and len(raw) > 1
        head = namespace_part + ("::" if multi else ":")
    return encode_key(head, namespace, raw, max_length)


def fingerprint(payload: Any) -> str:
    """A 128-bit hash (hex) of the canonical msgpack encoding of ``payload``."""
    try:
        data = _canonical.encode(payload)
    except (TypeError, msgspec.EncodeError) as exc:
        raise KeyMissing(
            f"cannot fingerprint the payload: {exc}; select encodable fields with payload=..."
        ) from exc
    except UnicodeEncodeError as exc:
        raise KeyMissing(
            "cannot fingerprint the payload: it contains a string with a lone surrogate "
            f"({exc.object[exc.start : exc.end]!r}), which no store can keep; "
            "select other fields with payload=... or clean the string"
        ) from exc
    return hashlib.blake2b(data, digest_size=16).hexdigest()
