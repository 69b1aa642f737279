"""A worker process for the kill tests: an order of four steps in an ``@idempotent`` function.

    python steps_worker.py URL NAMESPACE ORDER LOG HANG

Each step appends ``<pid> <step>`` to LOG (flushed and synced) as its side effect. With
HANG=1 the worker prints ``after step2`` once step 2 is recorded and then hangs, to be
killed. It prints ``outcome <claim outcome>`` and ``result <value>`` at the end.
"""

from __future__ import annotations

import os
import sys
import time

from idem_core import Idempotency, current_call


def main() -> None:
    url, namespace, order, log, hang = sys.argv[1:6]
    idem = Idempotency.from_url(url, namespace=namespace, lease=1.0)
    pid = os.getpid()

    def effect(name: str) -> str:
        with open(log, "a") as f:
            f.write(f"{pid} {name}\n")
            f.flush()
            os.fsync(f.fileno())
        return f"{name} by {pid}"

    @idem.idempotent(key="order", on_in_progress="wait", wait_timeout=60)
    def process(order: str) -> list[str]:
        call = current_call()
        print("outcome", call.outcome.value if call.outcome else None, flush=True)
        done = []
        for i in range(1, 5):
            done.append(call.step(f"step{i}", lambda i=i: effect(f"step{i}")))  # type: ignore[misc]
            if i == 2 and hang == "1":
                print("after step2", flush=True)
                time.sleep(600)
        return done

    print("result", "|".join(process(order)), flush=True)
    idem.close()


if __name__ == "__main__":
    main()
