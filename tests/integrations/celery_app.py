"""The Celery app of the Celery tests, run by a real worker process (``celery -A celery_app``).

Everything comes from the environment the test gives the worker: the broker (RabbitMQ), the
result backend and idempotency store (Redis), the queue (unique per test), the file where
each step writes its side effect, and a flag file that makes the task hang after step 2.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu import Queue

from idem_core import Idempotency
from idem_core.integrations.celery import IdempotentTask

QUEUE = os.environ["IDEM_CELERY_QUEUE"]
LOG = os.environ["IDEM_CELERY_LOG"]
HANG = os.environ["IDEM_CELERY_HANG"]

app = Celery(
    "celery_app",
    broker=os.environ.get("IDEM_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("IDEM_CELERY_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    # The queue goes away two minutes after its last use: tests leave nothing behind.
    task_queues=[Queue(QUEUE, queue_arguments={"x-expires": 120_000})],
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    result_expires=600,
    broker_connection_retry_on_startup=True,
)

idem = Idempotency.from_url(os.environ["IDEM_CELERY_STORE"], namespace=QUEUE)


def effect(order_id: str, step: str) -> str:
    """A step's side effect: one line in the log, synced, so a SIGKILL cannot lose it."""
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {order_id} {step}\n")
        f.flush()
        os.fsync(f.fileno())
    return f"{step} by {os.getpid()}"


@app.task(
    bind=True,
    base=IdempotentTask,
    idem=idem,
    idem_key="order_id",
    idem_settings={"lease": 2.0},
    idem_in_progress_countdown=1.0,
)
def place_order(self: IdempotentTask, order_id: str) -> list[str]:
    done = []
    for i in range(1, 5):
        done.append(self.step(f"step{i}", lambda i=i: effect(order_id, f"step{i}")))
        if i == 2 and os.path.exists(HANG):
            effect(order_id, "hanging")
            time.sleep(600)
    return done
