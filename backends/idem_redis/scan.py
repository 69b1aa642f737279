"""``scan`` for the sync Redis store: ``SCAN`` with ``MATCH`` on the key prefix.

``SCAN`` walks the whole keyspace of the database, a few keys per round trip (``MATCH``
filters after the walk, on the server): a listing reads as many slots as the database has
keys, but the client holds one page whatever their number. On a Cluster, each primary is
scanned in turn through its own connection (keys live on exactly one primary). The fields
of each page's records (never their results) are read with one pipelined ``HMGET`` per page.
Status, times and the rest of :class:`~idem_core.scanning.ScanFilter` are applied here, in
the client; ``MATCH`` with ``TYPE hash`` skips keys that are not records.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from idem_core.record import Record
from idem_core.scanning import ScanFilter

from .common import decode, translate

FIELDS = ("s", "p", "f", "l", "e", "a", "c", "u")
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
                cursor, keys = node.scan(cursor, match=match, count=page_size, _type="hash")
            # COUNT is a hint: a reply may hold more keys than asked, so it is cut in pages.
            for start in range(0, len(keys), page_size):
                page = _read(store, node, head, keys[start : start + page_size], where)
                if page:
                    yield page
            if int(cursor) == 0:
                break


def _read(store: Any, node: Any, head: str, keys: list[Any], where: ScanFilter) -> list[Record]:
    names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    with translate("scan", store._budget):
        pipe = node.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, FIELDS)
        replies = pipe.execute()
    page = []
    for name, fields in zip(names, replies, strict=True):
        rec = decode(name[len(head) :], fields)  # None: expired or deleted since the SCAN
        if rec is not None and where.matches(rec):
            page.append(rec)
    return page
