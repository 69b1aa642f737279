"""The pytest plugin registered under ``pytest11``: the ``idempotency`` and ``lambda_context``
fixtures, available in any project that installs idem-core."""

from __future__ import annotations

from .assertions import idempotency, lambda_context

__all__ = ["idempotency", "lambda_context"]
