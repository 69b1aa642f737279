"""``scan`` for the sync Redis store: ``SCAN`` with ``MATCH`` on the key prefix.

``SCAN`` walks the whole keyspace of the database, a few keys per round trip (``MATCH``
filters after the walk, on the server): a listing reads as many slots as the database has
keys, but the client holds one page whatever their number. On a Cluster, each primary is
scanned in turn through its own connection (keys live on exactly one primary). The heads of
each page's records (never their results) are read with one pipelined ``GETRANGE`` per page
(and ``HMGET`` for records of the earlier layout, hashes, not converted yet). Status, times
and the rest of :class:`~idem_core.scanning.ScanFilter` are applied here, in the client;
keys that hold something else than a record are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from idem_core.record import Record
from idem_core.scanning import ScanFilter

from . import records
from .common import translate

_MARKS = (records.IN_PROGRESS, records.COMPLETED)
#: bytes read of each record: its header and ids (a longer head is read again whole)
_HEAD = 1024
NOTE = (
    "Redis lists with SCAN: a full walk of the keyspace (MATCH on the key prefix), a page "
    "at a time; on a Cluster, each primary in turn"
)


def glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _nodes(store: Any) -> list[Any]:
    """One plain client per place to scan: the store's client, or each Cluster primary's."""
    client = store.client
    if not store.cluster:
        return [client]
    with translate("scan", store._budget):
        return [client.get_redis_connection(node) for node in client.get_primaries()]


def scan_pages(store: Any, where: ScanFilter, page_size: int) -> Iterator[list[Record]]:
    head: str = store.prefix
    match = glob_escape(head + where.prefix) + "*"
    for node in _nodes(store):
        cursor = 0
        while True:
            with translate("scan", store._budget):
                cursor, keys = node.scan(cursor, match=match, count=page_size)
            # COUNT is a hint: a reply may hold more keys than asked, so it is cut in pages.
            for start in range(0, len(keys), page_size):
                page = _read(store, node, head, keys[start : start + page_size], where)
                if page:
                    yield page
            if int(cursor) == 0:
                break


def _read(store: Any, node: Any, head: str, keys: list[Any], where: ScanFilter) -> list[Record]:
    from redis.exceptions import ResponseError

    names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    found: list[Record | None] = [None] * len(names)
    with translate("scan", store._budget):
        pipe = node.pipeline(transaction=False)
        for name in names:
            pipe.getrange(name, 0, _HEAD - 1)
        values = pipe.execute(raise_on_error=False)
        legacy = [i for i, v in enumerate(values) if isinstance(v, ResponseError)]
        if legacy:  # records of the earlier layout (or other types, skipped)
            pipe = node.pipeline(transaction=False)
            for i in legacy:
                pipe.hmget(names[i], records.LEGACY_FIELDS)
            for i, fields in zip(legacy, pipe.execute(raise_on_error=False), strict=True):
                if not isinstance(fields, ResponseError):
                    found[i] = records.decode_legacy(names[i][len(head) :], fields)
        for i, value in enumerate(values):
            # b"": expired or deleted since the SCAN; a string of ours starts with its kind
            if isinstance(value, bytes) and value[:1] and value[0] in _MARKS:
                if len(value) == _HEAD and records.head_size(value) > _HEAD:
                    value = node.get(names[i])
                    if value is None:  # deleted meanwhile
                        continue
                found[i] = records.decode(names[i][len(head) :], value, result=False)
    return [rec for rec in found if rec is not None and where.matches(rec)]
