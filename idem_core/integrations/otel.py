"""OpenTelemetry metrics and span events for every idempotency decision and store operation.

::

    from idem_core.integrations.otel import OpenTelemetry

    otel = OpenTelemetry()
    idem = Idempotency(url=..., on_event=otel.on_event, instrument=otel.instrument)

Instruments (meter ``idem_core``):

* ``idem.events`` (counter, ``{event}``): one per decision, with attributes ``idem.event``
  (claimed, took_over, replayed, in_progress, waiting, mismatch, completed, released,
  lease_lost, store_error, fail_open), ``idem.namespace`` and, for decorated functions,
  ``idem.function``.
* ``idem.store.duration`` (histogram, seconds): every store operation, with attributes
  ``idem.operation`` (claim, claim_many, complete, release, renew, get, delete), ``idem.store``
  (the store's class) and ``error.type`` when it raised.

Each decision is also added as a span event ``idem.<event>`` to the current span, with
``idem.key``, ``idem.fence`` and ``idem.namespace``.

Needs the ``otel`` extra (``opentelemetry-api``); without an SDK configured every call is a
no-op.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

from ..events import Event
from ..registry import import_driver

#: store operations that are timed; others (``wait_for_change``, ``now``) pass through
OPERATIONS = ("claim", "claim_many", "complete", "release", "renew", "get", "delete")


class OpenTelemetry:
    """Hooks for :class:`~idem_core.Idempotency`: ``on_event`` and ``instrument``."""

    def __init__(
        self,
        *,
        meter_provider: Any = None,
        tracer_provider: Any = None,
        span_events: bool = True,
    ) -> None:
        import_driver("opentelemetry.metrics", "otel")
        from opentelemetry import metrics, trace

        from .. import __version__

        meter = metrics.get_meter("idem_core", __version__, meter_provider=meter_provider)
        self._trace = trace
        self._tracer_provider = tracer_provider
        self.span_events = span_events
        self.events = meter.create_counter(
            "idem.events", unit="{event}", description="Idempotency decisions, by kind"
        )
        self.duration = meter.create_histogram(
            "idem.store.duration",
            unit="s",
            description="Duration of idempotency store operations",
        )

    def on_event(self, event: Event) -> None:
        attrs = {"idem.event": event.kind.value, "idem.namespace": event.namespace}
        if event.function:
            attrs["idem.function"] = event.function
        self.events.add(1, attrs)
        if not self.span_events:
            return
        span = self._trace.get_current_span()
        if span.is_recording():
            detail: dict[str, Any] = {"idem.key": event.key, "idem.namespace": event.namespace}
            if event.fence is not None:
                detail["idem.fence"] = event.fence
            if event.function:
                detail["idem.function"] = event.function
            if event.error is not None:
                detail["error.type"] = type(event.error).__qualname__
            span.add_event(f"idem.{event.kind.value}", detail)

    def instrument(self, store: Any) -> Any:
        """A proxy of ``store`` (sync or async) that times each operation."""
        return InstrumentedStore(store, self.duration)


class InstrumentedStore:
    """Times the operations in :data:`OPERATIONS`; everything else is the wrapped store's."""

    def __init__(self, store: Any, histogram: Any) -> None:
        self._store = store
        self._histogram = histogram
        self._name = type(store).__name__
        for op in OPERATIONS:
            method = getattr(store, op, None)
            if method is not None:
                setattr(self, op, self._timed(op, method))
        if hasattr(store, "bind"):
            # A bound view (SQL transactions) is measured like the store itself.
            self.bind = lambda connection: InstrumentedStore(store.bind(connection), histogram)

    @property
    def wrapped(self) -> Any:
        return self._store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _timed(self, op: str, method: Callable[..., Any]) -> Callable[..., Any]:
        record = self._histogram.record
        base = {"idem.operation": op, "idem.store": self._name}

        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def atimed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    result = await method(*args, **kwargs)
                except BaseException as exc:
                    record(time.perf_counter() - start, {**base, "error.type": _etype(exc)})
                    raise
                record(time.perf_counter() - start, base)
                return result

            return atimed

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = method(*args, **kwargs)
            except BaseException as exc:
                record(time.perf_counter() - start, {**base, "error.type": _etype(exc)})
                raise
            record(time.perf_counter() - start, base)
            return result

        return timed


def _etype(exc: BaseException) -> str:
    return type(exc).__qualname__
