"""Connection accounting for the SQL store's tests."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event


class PoolWatch:
    """Counts the pool's checkouts and checkins: the store keeps a few connections checked
    out between calls, so a leak shows as a connection never checked back in after close()."""

    def __init__(self, engine: Any) -> None:
        self.out = 0
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "checkin", self._checkin)

    def _checkout(self, *_: Any) -> None:
        self.out += 1

    def _checkin(self, *_: Any) -> None:
        self.out -= 1


def assert_no_leak(store: Any, watch: PoolWatch) -> None:
    """Between calls only the store's idle connections are out; after close() none is."""
    assert store.engine.pool.checkedout() == store.idle_connections, "a connection leaked"
    store.close()
    assert watch.out == 0, "close() kept a connection"
