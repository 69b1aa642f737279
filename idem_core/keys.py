"""Idempotency keys and payload fingerprints."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from .errors import KeyMissing

# Sorted maps make the encoding canonical: equal payloads hash equally whatever dict order.
_canonical = msgspec.msgpack.Encoder(order="sorted")


def full_key(namespace: str, scope: str, raw: object, max_length: int) -> str:
    """``namespace:scope:raw``, or a deterministic hash of it when the store cannot hold it."""
    if not isinstance(raw, str):
        raise KeyMissing(
            f"the idempotency key must be a non-empty string, got {type(raw).__name__}: {raw!r}"
            " (convert it with str() in the key function if that is what you mean)"
        )
    if not raw:
        raise KeyMissing("the idempotency key is empty")
    key = f"{namespace}:{scope}:{raw}" if scope else f"{namespace}:{raw}"
    # A character is at most 4 bytes in UTF-8: most keys never need encoding to be measured.
    size = len(key)
    if size > max_length or (size * 4 > max_length and len(key.encode()) > max_length):
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        key = f"{namespace[:32]}:#{digest}"
    return key


def fingerprint(payload: Any) -> str:
    """A 128-bit hash (hex) of the canonical msgpack encoding of ``payload``."""
    try:
        data = _canonical.encode(payload)
    except (TypeError, msgspec.EncodeError) as exc:
        raise KeyMissing(
            f"cannot fingerprint the payload: {exc}; select encodable fields with payload=..."
        ) from exc
    return hashlib.blake2b(data, digest_size=16).hexdigest()
