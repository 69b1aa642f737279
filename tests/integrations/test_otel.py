"""OpenTelemetry metrics and span events with the SDK's in-memory readers; structured logs."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from idem_core import AlreadyInProgress, Idempotency, PayloadMismatch
from idem_core.integrations.otel import OpenTelemetry


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def test_metrics_and_span_events(store_url: str) -> None:
    reader = InMemoryMetricReader()
    otel = OpenTelemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracer_provider.get_tracer("test")
    idem = Idempotency.from_url(
        store_url,
        namespace=f"t{uuid.uuid4().hex[:12]}",
        on_event=otel.on_event,
        instrument=otel.instrument,
    )

    @idem.idempotent(key="order")
    def pay(order: str, amount: int) -> str:
        return f"paid {amount}"

    with tracer.start_as_current_span("request"):
        pay("o1", 5)
        pay("o1", 5)
        with pytest.raises(PayloadMismatch):
            pay("o1", 6)
    with idem.claim("busy") as call:
        with pytest.raises(AlreadyInProgress):
            idem.claim("busy").enter()
        call.complete(1)
    idem.close()

    found = points(reader)
    events: dict[str, int] = {}
    for p in found["idem.events"]:
        events[p.attributes["idem.event"]] = events.get(p.attributes["idem.event"], 0) + p.value
    assert events["claimed"] == 2
    assert events["completed"] == 2
    assert events["replayed"] == 1
    assert events["mismatch"] == 1
    assert events["in_progress"] == 1
    attrs = next(
        p.attributes for p in found["idem.events"] if p.attributes["idem.event"] == "replayed"
    )
    assert attrs["idem.namespace"] == idem.namespace
    assert attrs["idem.function"].endswith("pay")

    durations = {p.attributes["idem.operation"]: p for p in found["idem.store.duration"]}
    assert durations["claim"].count >= 5
    assert durations["complete"].count == 2
    assert all(p.sum >= 0 for p in durations.values())
    stores = {p.attributes["idem.store"] for p in durations.values()}
    assert len(stores) == 1
    assert next(iter(stores)).endswith("Store")

    (span,) = exporter.get_finished_spans()
    names = [e.name for e in span.events]
    assert names == [
        "idem.claimed",
        "idem.completed",
        "idem.replayed",
        "idem.mismatch",
    ]
    assert span.events[0].attributes is not None
    assert span.events[0].attributes["idem.key"].endswith(":o1")
    assert span.events[0].attributes["idem.fence"] >= 1


async def test_async_store_operations_are_timed() -> None:
    reader = InMemoryMetricReader()
    otel = OpenTelemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    idem = Idempotency.from_url("memory://", on_event=otel.on_event, instrument=otel.instrument)

    @idem.idempotent(key="k")
    async def work(k: str) -> int:
        return 1

    await work("a")
    await work("a")
    found = points(reader)
    ops = {p.attributes["idem.operation"]: p.count for p in found["idem.store.duration"]}
    assert ops["claim"] == 2
    assert ops["complete"] == 1


def test_store_errors_are_labelled() -> None:
    from idem_core import StoreUnavailable
    from idem_core.memory import MemoryStore
    from idem_core.testing import FaultyStore

    reader = InMemoryMetricReader()
    otel = OpenTelemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    faulty = FaultyStore(MemoryStore())
    idem = Idempotency(faulty, on_event=otel.on_event, instrument=otel.instrument, retries=0)
    faulty.fail_next("claim", "before")
    with pytest.raises(StoreUnavailable):
        idem.claim("x").enter()
    found = points(reader)
    failed = [p for p in found["idem.store.duration"] if "error.type" in p.attributes]
    assert failed
    assert failed[0].attributes["error.type"] == "StoreUnavailable"
    kinds = {p.attributes["idem.event"] for p in found["idem.events"]}
    assert "store_error" in kinds


def test_every_decision_is_a_structured_log_record(caplog: pytest.LogCaptureFixture) -> None:
    idem = Idempotency.from_url("memory://", namespace="logs")

    @idem.idempotent(key="k")
    def work(k: str, v: int) -> int:
        return v

    with caplog.at_level(logging.DEBUG, logger="idem_core"):
        work("a", 1)
        work("a", 1)
        with pytest.raises(PayloadMismatch):
            work("a", 2)
    records = [r for r in caplog.records if hasattr(r, "idem_event")]
    assert [r.idem_event for r in records] == ["claimed", "completed", "replayed", "mismatch"]
    assert all(r.idem_key == "logs:" + r.idem_key.split(":", 1)[1] for r in records)
    assert records[-1].levelno == logging.WARNING
