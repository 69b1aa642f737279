"""Celery: tasks that apply once per key, with steps that resume after a crash.

::

    from idem_core.integrations.celery import IdempotentTask

    @app.task(bind=True, base=IdempotentTask, idem=idem, idem_key="order_id")
    def place_order(self, order_id: str) -> str:
        self.step("stock", lambda: reserve(order_id))
        charge = self.step("charge", lambda: pay(order_id, key=self.key_for("charge")))
        ...
        return charge["id"]

What the base class does around the task's body (``run``):

* Claims the key: ``idem_key`` names an argument (positional by the task's signature, or
  keyword), or is a callable ``(*args, **kwargs) -> key``; the default is the task id, which
  is what a redelivery of the same message carries. The task's name is the key's scope.
* A completed key returns the stored result without running (a duplicate message, or a
  redelivery after the worker died between completing and acknowledging).
* A key held by another worker right now (``AlreadyInProgress``) is retried with
  ``self.retry`` after ``idem_in_progress_countdown`` seconds (default: the lease); if that
  worker died, its lease lapses and the retry takes the key over.
* Steps (``self.step``/``self.key_for``, or ``current_call()`` from any code the task calls)
  are recorded under the claim's fence: the retry after a crash skips the recorded ones and
  resumes at the first unrecorded step.
* An exception releases the key (recorded steps are kept) and propagates, so Celery's own
  ``autoretry_for``/``retry`` runs the task again from the first unrecorded step.
  ``PayloadMismatch`` (the same key with other arguments) fails the task for good.

``acks_late = True`` and ``reject_on_worker_lost = True`` are set: a message is acknowledged
only after the record is completed, and a worker killed mid-task gives its message back to the
broker, so nothing is lost; duplicates that this causes are exactly what the key recognises.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Task

from .. import steps as _steps
from ..errors import AlreadyInProgress, ConfigurationError, KeyMissing

if TYPE_CHECKING:
    from ..api import Idempotency
    from ..call import Call

T = TypeVar("T")

__all__ = ["IdempotentTask"]


class IdempotentTask(Task):  # type: ignore[misc]  # celery ships no type information
    """A Celery task base class that applies the task once per key (see the module)."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    #: the :class:`~idem_core.Idempotency` holding the records (a task option)
    idem: Idempotency | None = None
    #: the argument naming the key, a callable ``(*args, **kwargs) -> key``, or None (task id)
    idem_key: str | Callable[..., Any] | None = None
    #: per-task settings passed to ``idem.claim`` (``lease``, ``ttl``, ``result_type``...)
    idem_settings: dict[str, Any] | None = None
    #: seconds before a task that found its key in progress runs again (None: the lease)
    idem_in_progress_countdown: float | None = None
    #: how many times a task that found its key in progress is retried before failing
    idem_in_progress_retries: int = 100

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        idem = self.idem
        if idem is None:
            raise ConfigurationError(
                f"task {self.name!r}: give the Idempotency to use, e.g. "
                "@app.task(base=IdempotentTask, idem=idem)"
            )
        key = self._idem_key_of(args, kwargs)
        settings = dict(self.idem_settings or {})
        call = idem.claim(
            key, payload=self._idem_payload(args, kwargs), scope=self.name, **settings
        )
        try:
            call.enter()
        except AlreadyInProgress as exc:
            countdown = self.idem_in_progress_countdown
            if countdown is None:
                countdown = call.opts.lease
            raise self.retry(
                exc=exc, countdown=countdown, max_retries=self.idem_in_progress_retries
            ) from exc
        if call.replayed:
            return call.result
        token = _steps.enter(call)
        try:
            if self.request.id:  # run by a worker (or apply): the request is in place
                value = self.run(*args, **kwargs)
            else:  # called directly: Task.__call__ sets up a request
                value = super().__call__(*args, **kwargs)
        except BaseException as exc:
            call._abort(exc)  # releases the key (or stores a cached error); never raises
            raise
        finally:
            _steps.leave(token)
        call.complete(value)
        return value

    def _idem_payload(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The arguments by name, so ``f(x)`` and ``f(order_id=x)`` are the same request."""
        try:
            bound = inspect.signature(self.run).bind(*args, **kwargs)
        except (TypeError, ValueError):
            return {"args": list(args), "kwargs": kwargs}
        bound.apply_defaults()
        return dict(bound.arguments)

    def _idem_key_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spec = self.idem_key
        if spec is None:
            task_id = self.request.id
            if not task_id:
                raise KeyMissing(f"task {self.name!r} has no task id to key it by")
            return task_id
        if callable(spec):
            return spec(*args, **kwargs)
        if spec in kwargs:
            return kwargs[spec]
        try:
            bound = inspect.signature(self.run).bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise KeyMissing(f"task {self.name!r}: cannot find argument {spec!r}: {exc}") from exc
        if spec not in bound.arguments:
            raise KeyMissing(f"task {self.name!r} was called without its key argument {spec!r}")
        return bound.arguments[spec]

    # -- steps, for the task's body ---------------------------------------------------------

    @property
    def call(self) -> Call:
        """The claim of the task running now in this thread (see ``current_call``)."""
        return _steps.current_call()

    def step(self, name: str, fn: Callable[[], T], **options: Any) -> T:
        """``current_call().step(name, fn)``: run ``fn`` once per key and step."""
        return _steps.current_call().step(name, fn, **options)

    def key_for(self, step: str) -> str:
        """The derived key of ``step``, the same on every retry, for third-party APIs."""
        return _steps.current_call().key_for(step)
