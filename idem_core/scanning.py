"""What ``scan`` (the optional store method behind ``idem ls`` and ``idem stuck``) selects.

A store's ``scan(where, page_size)`` yields pages (lists) of at most ``page_size`` records,
without their results, whatever the number of records: SQL stores page by key (keyset
pagination, one short query per page), Redis ``SCAN``s (each primary of a Cluster in turn),
DynamoDB runs a paginated ``Scan``. A store may apply only part of the filter on the server;
callers keep the records for which :meth:`ScanFilter.matches` is true.
"""

from __future__ import annotations

import msgspec

from .record import RELEASED, Record, Status


class ScanFilter(msgspec.Struct, frozen=True):
    """Which records a scan selects; times are microseconds since the epoch."""

    #: only records in this status
    status: Status | None = None
    #: only keys that start with this (compared exactly, case included)
    prefix: str = ""
    #: only records last written before this time
    updated_before: int | None = None
    #: only records created before this time
    created_before: int | None = None
    #: only records not expired at this time (``expires_at > alive_at``)
    alive_at: int | None = None
    #: only records in progress whose lease lapsed at or before this time (not released)
    lapsed_at: int | None = None

    def matches(self, rec: Record) -> bool:
        if self.status is not None and rec.status is not self.status:
            return False
        if self.prefix and not rec.key.startswith(self.prefix):
            return False
        if self.updated_before is not None and rec.updated_at >= self.updated_before:
            return False
        if self.created_before is not None and rec.created_at >= self.created_before:
            return False
        if self.alive_at is not None and rec.expires_at <= self.alive_at:
            return False
        if self.lapsed_at is None:
            return True
        return (
            rec.status is Status.IN_PROGRESS
            and rec.lease_expires_at != RELEASED
            and rec.lease_expires_at <= self.lapsed_at
        )


#: records per page when the caller does not say
DEFAULT_PAGE = 500
