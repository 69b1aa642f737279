"""moto's server with one request applied at a time (``python -m idem_bench.moto_atomic``).

``moto_server`` serves each request on its own thread with no lock around a table, so a
conditional write's check and its write can interleave with another request's and two racing
conditional puts may both succeed. DynamoDB applies each item write atomically; serialising
the requests gives moto the same guarantee for every system benchmarked on it. Arguments are
moto_server's (``-H HOST -p PORT``).
"""

from __future__ import annotations

import threading
from typing import Any

import moto.server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication


class AtomicApplication(DomainDispatcherApplication):
    _lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self._lock:
            return list(super().__call__(environ, start_response))


if __name__ == "__main__":
    moto.server.DomainDispatcherApplication = AtomicApplication  # type: ignore[attr-defined]
    moto.server.main()
