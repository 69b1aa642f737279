"""Records as DynamoDB items (low-level attribute values), and the 400 KB item limit."""

from __future__ import annotations

from typing import Any

import msgspec.structs

from idem_core.errors import CorruptRecord, ResultNotSerializable
from idem_core.record import Record, Status
from idem_core.registry import import_driver

from .settings import Settings

Item = dict[str, Any]

#: DynamoDB keys: 2048 bytes for a partition key, 1024 for a sort key. Counted in characters
#: of up to 4 UTF-8 bytes each, so any key this long fits.
MAX_KEY_PARTITION = 512
MAX_KEY_SORT = 256
#: DynamoDB's limit on one item, names and values included: "400 KB", read conservatively as
#: 400,000 bytes (DynamoDB Local enforces 409,600, moto 405,000; both accept this).
ITEM_LIMIT = 400_000
# Room for the attributes a completion keeps but does not send (fingerprint, attempt, ...):
# their exact size is only known to the server, so the check before the write is generous.
_UNSENT_ALLOWANCE = 2048
_NUMBER_SIZE = 21  # at most 38 digits, stored as 2 digits per byte plus one
_ZSTD = "zstd"
# DynamoDB Local (and older DynamoDB) refuse empty binary values: an empty result is this
# encoding and no result attribute.
EMPTY = "empty"

# Attribute names. Placeholders (#x) are used everywhere because STATUS and TTL are reserved
# words in DynamoDB's expression language.
STATUS = "status"
FINGERPRINT = "fingerprint"
FENCE = "fence"
LEASE = "lease_expires_at"
EXPIRES = "expires_at"
ATTEMPT = "attempt"
CREATED = "created_at"
UPDATED = "updated_at"
RESULT = "result"
ENCODING = "result_encoding"
#: a random token that every claim and renewal replaces: a claimer that watched the same
#: version for a whole lease knows the holder stopped renewing, whatever the clocks say
VERSION = "version"


class Codec:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._zstd: Any = None
        self.names: dict[str, str] = {
            "#k": settings.key_attr,
            "#st": STATUS,
            "#fp": FINGERPRINT,
            "#f": FENCE,
            "#l": LEASE,
            "#e": EXPIRES,
            "#a": ATTEMPT,
            "#c": CREATED,
            "#u": UPDATED,
            "#r": RESULT,
            "#z": ENCODING,
            "#t": settings.ttl_attr,
            "#v": VERSION,
        }
        self.max_key_length = MAX_KEY_SORT if settings.sort_key else MAX_KEY_PARTITION
        #: bytes of stored (compressed, when that applies) result an item can hold
        self.max_result_size = self._max_result_size()

    # -- keys -----------------------------------------------------------------------------

    def key(self, key: str) -> Item:
        s = self.settings
        if s.sort_key is None:
            return {s.key_attr: {"S": key}}
        return {s.key_attr: {"S": s.namespace}, s.sort_key: {"S": key}}

    def key_of(self, item: Item) -> str:
        s = self.settings
        return str(item[s.sort_key if s.sort_key is not None else s.key_attr]["S"])

    # -- records --------------------------------------------------------------------------

    def ttl_seconds(self, expires_at: int) -> int:
        """The TTL attribute: after our own expiry plus the skew allowance, rounded up, so
        DynamoDB (on AWS's clock) never deletes a record a worker within the allowance of the
        true time may still hold."""
        return -(-(expires_at + self.settings.skew_allowance_us) // 1_000_000) + 1

    def item(self, record: Record, version: str | None = None) -> Item:
        """A whole item for ``record`` (claims write every attribute)."""
        item = self.key(record.key)
        if version is not None:
            item[VERSION] = {"S": version}
        item.update(
            {
                STATUS: {"S": record.status.value},
                FINGERPRINT: {"S": record.fingerprint},
                FENCE: {"N": str(record.fence)},
                LEASE: {"N": str(record.lease_expires_at)},
                EXPIRES: {"N": str(record.expires_at)},
                ATTEMPT: {"S": record.attempt},
                CREATED: {"N": str(record.created_at)},
                UPDATED: {"N": str(record.updated_at)},
                self.settings.ttl_attr: {"N": str(self.ttl_seconds(record.expires_at))},
            }
        )
        if record.result is not None:
            stored, encoding = self.pack(record.result)
            if stored:
                item[RESULT] = {"B": stored}
            if encoding:
                item[ENCODING] = {"S": encoding}
        return item

    def record(self, item: Item | None) -> Record | None:
        """The record an item holds; ``CorruptRecord`` when it is not one of ours."""
        if not item:
            return None
        try:
            result: bytes | None = None
            encoding = item.get(ENCODING, {}).get("S")
            if RESULT in item:
                result = self.unpack(bytes(item[RESULT]["B"]), encoding)
            elif encoding == EMPTY:
                result = b""
            return Record(
                key=self.key_of(item),
                status=Status(item[STATUS]["S"]),
                fingerprint=str(item[FINGERPRINT]["S"]),
                fence=int(item[FENCE]["N"]),
                lease_expires_at=int(item[LEASE]["N"]),
                expires_at=int(item[EXPIRES]["N"]),
                attempt=str(item[ATTEMPT]["S"]),
                created_at=int(item[CREATED]["N"]),
                updated_at=int(item[UPDATED]["N"]),
                result=result,
            )
        except CorruptRecord:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecord(
                f"DynamoDB item {self._describe(item)} in table {self.settings.table!r} is not "
                f"an idempotency record: {type(exc).__name__}: {exc}"
            ) from exc

    def version(self, item: Item, record: Record) -> str:
        """The lease version of an item; items written before versions existed get one made
        of the attributes every claim and renewal changed then."""
        value = item.get(VERSION, {}).get("S")
        if isinstance(value, str):
            return value
        return f"~{record.fence}:{record.lease_expires_at}:{record.updated_at}"

    def with_result(self, record: Record, result: bytes | None) -> Record:
        return msgspec.structs.replace(record, result=result)

    def _describe(self, item: Item) -> str:
        try:
            return repr(self.key_of(item))
        except (KeyError, TypeError):
            return "(without our key attributes)"

    # -- results --------------------------------------------------------------------------

    def pack(self, result: bytes) -> tuple[bytes, str | None]:
        """The bytes to store and their encoding: zstd above the threshold when it helps."""
        if not result:
            return result, EMPTY
        limit = self.settings.compress_above
        if limit is None or len(result) <= limit:
            return result, None
        packed: bytes = self._compressor().ZstdCompressor(level=3).compress(result)
        if len(packed) >= len(result):
            return result, None
        return packed, _ZSTD

    def unpack(self, stored: bytes, encoding: str | None) -> bytes:
        if encoding is None:
            return stored
        if encoding != _ZSTD:
            raise CorruptRecord(f"unknown result encoding {encoding!r}")
        try:
            out: bytes = self._compressor().ZstdDecompressor().decompress(stored)
        except Exception as exc:  # zstandard raises its own ZstdError
            raise CorruptRecord(f"stored result does not decompress: {exc}") from exc
        return out

    def _compressor(self) -> Any:
        if self._zstd is None:
            self._zstd = import_driver("zstandard", "dynamodb")
        return self._zstd

    def _max_result_size(self) -> int:
        """The most bytes of (stored) result an item can hold next to everything else a
        record carries, for the longest key this store accepts: DynamoDB's 400 KB counts
        attribute names and values. Conservative, and the same for every key."""
        s = self.settings
        other = len(s.key_attr.encode()) + 4 * self.max_key_length
        if s.sort_key is not None:
            other += len(s.sort_key.encode()) + len(s.namespace.encode())
        for name in (FENCE, LEASE, EXPIRES, CREATED, UPDATED, s.ttl_attr):
            other += len(name.encode()) + _NUMBER_SIZE
        other += len(STATUS) + len(Status.IN_PROGRESS.value)
        other += len(VERSION) + 16 + len(RESULT) + len(ENCODING) + len(_ZSTD)
        # fingerprint and attempt: the core's are 32-64 characters; keep far more room.
        other += len(FINGERPRINT) + len(ATTEMPT) + _UNSENT_ALLOWANCE
        return (ITEM_LIMIT - other) // 1024 * 1024

    def check_size(self, key: str, result: bytes, stored: bytes) -> None:
        """Refuse, before writing, a result the item cannot hold."""
        limit = self.max_result_size
        if len(stored) <= limit:
            return
        if stored is not result:
            how = f"{len(stored)} bytes after zstd compression"
        elif self.settings.compress_above is None:
            how = "compression is off"
        else:
            how = "not compressed"
        raise ResultNotSerializable(
            f"the result for key {key!r} is {len(result)} bytes ({how}); this DynamoDB store "
            f"stores at most {limit} bytes (max_result_size: the 400 KB item limit less the "
            "record's other attributes); nothing was written and the claim is still held. "
            "Store large results elsewhere (e.g. S3) and return a reference"
            + (", or set compress_above= to compress them." if how == "compression is off" else ".")
        )
