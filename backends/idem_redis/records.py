"""The record layout: one binary string per key, written by the scripts, read here.

A record is the value of one string key (``prefix + key``)::

    header   49 bytes, little-endian: kind (1 byte), fence, lease_expires_at, expires_at,
             created_at, updated_at (8 bytes each, signed, microseconds), ids_len, result_len
             (4 bytes each, unsigned)
    ids      ids_len bytes: flags (1 byte), fingerprint length (4 bytes), fingerprint, attempt
    result   result_len bytes (empty while in progress)
    steps    what remains: one entry per recorded step (see :func:`step_entry`)

``kind`` is ``0xF1`` (in progress) or ``0xF2`` (completed): any other first byte is not a
record. The scripts read and write the header with Lua's ``struct`` library (Redis's Lua is
5.1, so there is no ``string.pack``; its numbers are doubles, exact up to 2**53, and times
and fences stay far below), and treat ``ids``, the result and the steps as opaque bytes.
The fingerprint and the attempt are kept as raw bytes when they are lowercase hex (the
core's fingerprints are: 16 bytes instead of 32 characters); ``flags`` says which.

Records written by idem-core before this layout (one hash per key, see ``LEGACY_FIELDS``)
are converted in place by the first script that touches them; ``SCAN`` listings read both.
"""

from __future__ import annotations

import struct
from typing import Any

from idem_core.errors import CorruptRecord
from idem_core.record import Record, Status

IN_PROGRESS = 0xF1
COMPLETED = 0xF2

#: the header, as Python's and as Lua's ``struct`` spell it
HEADER = struct.Struct("<BqqqqqII")
LUA_HEADER = "<Bi8i8i8i8i8I4I4"
#: the header and the start of ``ids``, read in one call
_HEAD = struct.Struct("<BqqqqqIIBI")
_IDS = struct.Struct("<BI")
_STEP_NAME = struct.Struct("<H")
_STEP_DATA = struct.Struct("<qI")

FP_RAW = 1
ATTEMPT_RAW = 2

#: the fields of a record written by earlier versions (a hash), and steps as ``t:<name>``
LEGACY_FIELDS = ("s", "p", "f", "l", "e", "a", "c", "u")

_STATUS = {IN_PROGRESS: Status.IN_PROGRESS, COMPLETED: Status.COMPLETED}


def _raw(text: str) -> bytes | None:
    """``text`` as the bytes it spells when it is lowercase hex (so it reads back the same)."""
    if len(text) % 2 or not text:
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if raw.hex() == text else None


def ids(fingerprint: str, attempt: str) -> bytes:
    """The ``ids`` part of a record: written by the claim script as it is given."""
    flags = 0
    fp = _raw(fingerprint)
    if fp is None:
        fp = fingerprint.encode()
    else:
        flags = FP_RAW
    at = _raw(attempt)
    if at is None:
        at = attempt.encode()
    else:
        flags |= ATTEMPT_RAW
    return _IDS.pack(flags, len(fp)) + fp + at


def step_entry(name: str, until: int, data: bytes) -> bytes:
    """One step as the record's tail holds it: name length (2 bytes), name, until (8 bytes),
    data length (4 bytes), data. The record-step script appends it as it is given."""
    raw = name.encode()
    return _STEP_NAME.pack(len(raw)) + raw + _STEP_DATA.pack(until, len(data)) + data


def decode(key: str, value: Any, result: bool = True) -> Record:
    """The record in ``value`` (the whole value, or its head as a script returns it: without
    the steps, and without the result when the script replies with the header and ids only).
    ``result=False``: leave the result out (listings)."""
    try:
        kind, fence, lease, expires, created, updated, ids_len, result_len, flags, fp_len = (
            _HEAD.unpack_from(value)
        )
        status = _STATUS[kind]
        start = HEADER.size + _IDS.size
        mid = start + fp_len
        end = HEADER.size + ids_len
        if mid > end or len(value) < end:
            raise ValueError("the ids overrun the record")
        fp = value[start:mid]
        at = value[mid:end]
        data = None
        if result and kind == COMPLETED and len(value) >= end + result_len:
            data = bytes(value[end : end + result_len])
        return Record(
            key,
            status,
            fp.hex() if flags & FP_RAW else fp.decode(),
            fence,
            lease,
            expires,
            at.hex() if flags & ATTEMPT_RAW else at.decode(),
            created,
            updated,
            data,
        )
    except (struct.error, KeyError, ValueError, TypeError) as exc:
        raise CorruptRecord(f"the Redis record for key {key!r} cannot be decoded: {exc}") from exc


def head_size(value: Any) -> int:
    """Bytes of a record's header and ids (from its header)."""
    return HEADER.size + int(HEADER.unpack_from(value)[6])


def steps_of(value: Any) -> bytes:
    """The steps part of a whole record value."""
    _, _, _, _, _, _, ids_len, result_len = HEADER.unpack_from(value)
    return bytes(value[HEADER.size + ids_len + result_len :])


def decode_steps(key: str, tail: Any) -> dict[str, tuple[int, bytes]]:
    """Every step in a record's tail: name -> (until, data); a name written again (a retried
    write, or a later generation's) counts as its last entry."""
    steps: dict[str, tuple[int, bytes]] = {}
    at = 0
    try:
        while at < len(tail):
            (size,) = _STEP_NAME.unpack_from(tail, at)
            at += _STEP_NAME.size
            name = bytes(tail[at : at + size]).decode()
            at += size
            until, length = _STEP_DATA.unpack_from(tail, at)
            at += _STEP_DATA.size
            if at + length > len(tail):
                raise ValueError("a step's data overruns the record")
            steps[name] = (until, bytes(tail[at : at + length]))
            at += length
    except (struct.error, ValueError) as exc:
        raise CorruptRecord(f"a step of the Redis record {key!r} is corrupt: {exc}") from exc
    return steps


def encode(record: Record, steps: dict[str, tuple[int, bytes]] | None = None) -> bytes:
    """The value the scripts would hold for ``record`` (and ``steps``): for tools and tests
    that write records in bulk. Write it with an expiry at ``record.expires_at``."""
    kind = IN_PROGRESS if record.status is Status.IN_PROGRESS else COMPLETED
    result = (record.result or b"") if kind == COMPLETED else b""
    head = ids(record.fingerprint, record.attempt)
    tail = b"".join(step_entry(n, until, data) for n, (until, data) in (steps or {}).items())
    return (
        HEADER.pack(
            kind,
            record.fence,
            record.lease_expires_at,
            record.expires_at,
            record.created_at,
            record.updated_at,
            len(head),
            len(result),
        )
        + head
        + result
        + tail
    )


def decode_legacy(key: str, fields: Any) -> Record | None:
    """A record of the earlier layout from its ``LEGACY_FIELDS`` (``HMGET``; for listings)."""
    if not fields or fields[0] is None:
        return None
    try:
        text = [f.decode() if isinstance(f, bytes) else str(f) for f in fields]
        if text[0] not in ("i", "c"):
            raise ValueError(f"unknown status {text[0]!r}")
        return Record(
            key,
            Status.IN_PROGRESS if text[0] == "i" else Status.COMPLETED,
            text[1],
            int(text[2]),
            int(text[3]),
            int(text[4]),
            text[5],
            int(text[6]),
            int(text[7]),
        )
    except (ValueError, UnicodeDecodeError, IndexError) as exc:
        raise CorruptRecord(f"the Redis record for key {key!r} cannot be decoded: {exc}") from exc
