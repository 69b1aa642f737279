"""Operators' tools on memory:// (issue 15): the API, the commands, keys of every surface,
events in logs and OpenTelemetry, and the one-line errors."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from idem_core import Idempotency, Record, open_store
from idem_core.cli_ops import duration
from idem_core.memory import MemoryStore

sys.path.insert(0, str(Path(__file__).parent.parent))

from ops_scenarios import api_scenario, bulk_scenario, cli, errors_scenario


def _memory_loader(store: MemoryStore) -> Any:
    def load(records: Sequence[Record]) -> None:
        # The in-process store has no bulk write: records go straight into its dict, under
        # their keys' locks, as its own operations leave them.
        for rec in records:
            stripe = store._stripe(rec.key)
            with stripe.lock:
                store._records[rec.key] = rec
                stripe.last_fence = max(stripe.last_fence, rec.fence)

    return load


@pytest.fixture
def mem_url() -> str:
    return f"memory://ops-{uuid.uuid4().hex[:8]}"


def test_api_on_memory() -> None:
    api_scenario(MemoryStore())


def test_commands_on_10000_memory_records(mem_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(mem_url)
    bulk_scenario(mem_url, store, _memory_loader(store), capsys, "bulk:")


def test_errors_on_memory(mem_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    errors_scenario(mem_url, capsys)


def test_bad_url_and_no_scan_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "ls", "nosuch://x")
    assert code == 2 and err.startswith("idem: ls nosuch://x:") and err.count("\n") == 1
    code, _out, err = cli(capsys, "stuck", "redis://127.0.0.1:1/0?connect_timeout=0.5")
    assert code == 2 and "StoreUnavailable" in err and err.count("\n") == 1


def test_a_store_without_scan_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from idem_core.operate import ScanUnsupported, scan
    from idem_core.scanning import ScanFilter

    class NoScan:
        pass

    with pytest.raises(ScanUnsupported, match="cannot list"):
        list(scan(NoScan(), ScanFilter()))  # type: ignore[arg-type]


def test_durations() -> None:
    assert [duration(t) for t in ("90", "90s", "10m", "2h", "1d", "500ms")] == [
        90,
        90,
        600,
        7200,
        86400,
        0.5,
    ]
    with pytest.raises(Exception, match="not a duration"):
        duration("ten minutes")


def test_key_of_every_surface(mem_url: str) -> None:
    idem = Idempotency.from_url(mem_url, namespace="shop")

    class Orders:
        @idem.idempotent(key=("customer", "order_id"))
        def pay(self, customer: str, order_id: str) -> int:
            return 1

    orders = Orders()
    key = idem.key_of(orders.pay, "a:b", "42")
    orders.pay("a:b", "42")
    scope = f"{Orders.pay.__module__}.{Orders.pay.__qualname__}"
    assert key == f"shop:{scope}:a\\:b:42"  # the parts escaped, joined with ':'
    assert idem.inspect(key).status == "completed"

    with idem.claim("42", scope="refunds") as call:
        call.complete(1)
    assert idem.key_for("42", scope="refunds") == call.key == "shop:refunds:42"
    assert idem.http_key("k-1", identity="user:7").startswith("shop:http:")

    @idem.lambda_handler(event_key="order_id", name="orders-fn")
    def handler(event: dict[str, Any], context: Any) -> str:
        return "ok"

    handler({"order_id": "9"}, None)
    assert idem.key_of(handler, {"order_id": "9"}) == "shop:orders-fn:9"
    assert idem.inspect("shop:orders-fn:9").status == "completed"

    @idem.consumer(dedup_id=lambda m: m["id"], name="mails")
    def on_message(message: dict[str, str]) -> str:
        return "sent"

    on_message({"id": "m1"})
    assert idem.key_of(on_message, {"id": "m1"}) == "shop:mails:m1"
    assert idem.inspect("shop:mails:m1").status == "completed"

    @idem.batch_handler(record_key="messageId", name="batch")
    def on_record(record: dict[str, Any]) -> None:
        return None

    assert idem.key_of(on_record, {"messageId": "x"}) == "shop:batch:x"
    other = Idempotency.from_url(mem_url, namespace="other")
    with pytest.raises(Exception, match="another Idempotency"):
        other.key_of(orders.pay, "a", "b")
    with pytest.raises(Exception, match="not an idempotent"):
        idem.key_of(len, "a")


def test_async_key_of_is_the_decorators(mem_url: str) -> None:
    import asyncio

    idem = Idempotency.from_url(mem_url, namespace="shop")

    @idem.idempotent(key="order_id")
    async def pay(order_id: str) -> int:
        return 1

    asyncio.run(pay("7"))
    assert idem.inspect(idem.key_of(pay, "7"), int).result == 1


def test_operator_events_are_logged(
    mem_url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    idem = Idempotency.from_url(mem_url, namespace="ev")
    with idem.claim("k") as call:
        call.complete(1)
    with caplog.at_level(logging.INFO, logger="idem_core"):
        code, out, _ = cli(capsys, "forget", mem_url, "ev:k")
    assert code == 0 and out == "forgot ev:k\n"
    kinds = [r.__dict__.get("idem_event") for r in caplog.records]
    assert "forgotten" in kinds


def test_operator_events_reach_opentelemetry(mem_url: str) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from idem_core.integrations.otel import OpenTelemetry

    reader = InMemoryMetricReader()
    otel = OpenTelemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    idem = Idempotency.from_url(mem_url, namespace="ot", on_event=otel.on_event)
    call = idem.claim("k", lease=0.2).__enter__()
    idem.release("ot:k", fence=call.fence)
    idem.forget("ot:k")
    data = json.loads(reader.get_metrics_data().to_json())
    kinds = set()
    for rm in data["resource_metrics"]:
        for sm in rm["scope_metrics"]:
            for m in sm["metrics"]:
                for point in m["data"].get("data_points", []):
                    kinds.add(point["attributes"].get("idem.event"))
    assert {"released_by_operator", "forgotten", "claimed"} <= kinds


def test_ls_prints_before_the_second_page_is_read(
    mem_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``idem ls`` streams: its first line is written while the store has handed out one
    page of 100 records, not the 10,000 it holds."""
    import argparse

    from ops_scenarios import bulk_records

    from idem_core import cli_ops

    store = open_store(mem_url)
    _memory_loader(store)(bulk_records("s:", store.now()))
    pages: list[int] = []
    real_scan = store.scan

    def counting_scan(where: Any, page_size: int) -> Any:
        for page in real_scan(where, page_size):
            pages.append(len(page))
            yield page

    store.scan = counting_scan  # type: ignore[method-assign]

    class Out:
        def __init__(self) -> None:
            self.first_write_after: list[int] = []

        def write(self, text: str) -> None:
            if not self.first_write_after:
                self.first_write_after.append(len(pages))

        def flush(self) -> None:
            pass

    args = argparse.Namespace(
        command="ls",
        url=mem_url,
        status=None,
        older_than=None,
        created_before=None,
        prefix="s:",
        limit=None,
        page_size=100,
        json=True,
    )
    out = Out()
    assert cli_ops.run(args, out=out) == 0
    assert out.first_write_after == [1]
    assert len(pages) == 100 and max(pages) == 100


def test_async_api_on_memory(mem_url: str) -> None:
    import asyncio

    from ops_scenarios import async_api_scenario

    asyncio.run(async_api_scenario(Idempotency.from_url(mem_url, namespace="aops")))
