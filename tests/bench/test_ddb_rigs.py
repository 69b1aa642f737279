"""The bench's idem-core rigs on DynamoDB take the lean path (:mod:`idem_dynamodb.wire`), as a
store opened from its URL does: botocore never sends a request of the timed calls, and round
trips are counted on the lean client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from idem_bench import rigs
from idem_bench.targets import Target


def _no_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any request through botocore (boto3 or aiobotocore) from here on fails the test."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a botocore request on the hot path: {args[1:2]}")

    from aiobotocore.client import AioBaseClient
    from botocore.client import BaseClient

    monkeypatch.setattr(BaseClient, "_make_api_call", refused)
    monkeypatch.setattr(AioBaseClient, "_make_api_call", refused)


def test_sync_rig_takes_the_lean_path(ddb_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = rigs.run_tag()
    rig = rigs.ours_sync(ddb_target, tag, counting=True)
    try:
        _no_botocore(monkeypatch)
        assert rig.round_trips is not None and rig.floor is not None
        rig.call(f"{tag}k")
        first = rig.round_trips.n
        rig.call(f"{tag}k")
        replay = rig.round_trips.n - first
        assert first >= 2 and replay >= 1, (first, replay)
        rig.floor()
    finally:
        monkeypatch.undo()
        rig.close()


def test_async_rig_takes_the_lean_path(ddb_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> tuple[int, int]:
        tag = rigs.run_tag()
        rig = await rigs.ours_async(ddb_target, tag, counting=True)
        try:
            _no_botocore(monkeypatch)
            assert rig.round_trips is not None and rig.floor is not None
            await rig.call(f"{tag}k")
            first = rig.round_trips.n
            await rig.call(f"{tag}k")
            await rig.floor()
            return first, rig.round_trips.n - first
        finally:
            monkeypatch.undo()
            await rig.close()

    first, replay = asyncio.run(main())
    assert first >= 2 and replay >= 1, (first, replay)
