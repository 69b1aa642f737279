"""Integrations of idem-core where duplicates arrive: HTTP (ASGI), AWS Lambda, queue consumers
and OpenTelemetry.

Each module imports its optional dependency only when used, and relies on the public API of
:class:`idem_core.Idempotency` alone, so every integration works with every store URL.
"""
