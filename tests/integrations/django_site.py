"""A minimal Django project for the Django integration's tests: settings, views and URLs in one
module, used in process (``configure()``) and by a real server in a subprocess
(``DJANGO_SETTINGS_MODULE=django_site``, served by waitress).

Business writes go to a table of the run's own (``IDEM_TEST_ORDERS``); the idempotency
records to ``IDEM_TEST_RECORDS``, in the same PostgreSQL database.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

PG = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "test",
    "USER": "postgres",
    "HOST": "127.0.0.1",
    "PORT": "5432",
}

# -- settings (read by Django when this module is DJANGO_SETTINGS_MODULE) ---------------------
SECRET_KEY = "idem-core-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "django_site"
DATABASES = {"default": PG}
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

ORDERS = os.environ.get("IDEM_TEST_ORDERS", "orders_unset")
RECORDS_URL = os.environ.get("IDEM_TEST_RECORDS_URL", "")
PAUSE_FILE = os.environ.get("IDEM_TEST_PAUSE_FILE", "")


def configure() -> None:
    """Configure Django in this process (the tests' own) from this module's settings."""
    from django.conf import settings

    if settings.configured and getattr(settings, "ROOT_URLCONF", None) != ROOT_URLCONF:
        # Configured before by another user of this pytest process (the documentation's
        # Django page runs in process, with no database): start Django's settings and
        # database connections over with ours.
        from django.db import connections
        from django.utils.connection import Local  # type: ignore[attr-defined]
        from django.utils.functional import empty

        connections.close_all()
        connections.__dict__.pop("settings", None)
        connections._settings = None
        connections._connections = Local(connections.thread_critical)
        settings._wrapped = empty
    if not settings.configured:
        settings.configure(
            SECRET_KEY=SECRET_KEY,
            DEBUG=DEBUG,
            ALLOWED_HOSTS=ALLOWED_HOSTS,
            ROOT_URLCONF=ROOT_URLCONF,
            DATABASES=DATABASES,
            INSTALLED_APPS=INSTALLED_APPS,
            MIDDLEWARE=MIDDLEWARE,
            USE_TZ=USE_TZ,
            DEFAULT_AUTO_FIELD=DEFAULT_AUTO_FIELD,
        )
        import django

        django.setup()


_idem: Any = None


def idem() -> Any:
    global _idem
    if _idem is None:
        from idem_core import Idempotency

        _idem = Idempotency.from_url(
            RECORDS_URL or os.environ["IDEM_TEST_RECORDS_URL"], namespace="django"
        )
    return _idem


def _order(request: Any) -> Any:
    """Write an order; when asked (``X-Pause``), stop after the write and before the
    response is stored, so the test can kill the server right there."""
    from django.db import connection
    from django.http import JsonResponse

    body = json.loads(request.body or b"{}")
    order_id = uuid.uuid4().hex
    with connection.cursor() as cur:
        cur.execute(
            f"INSERT INTO {ORDERS} (id, key, amount) VALUES (%s, %s, %s)",
            [order_id, request.headers.get("Idempotency-Key", ""), body.get("amount", 0)],
        )
    if request.headers.get("X-Pause") and PAUSE_FILE:
        Path(PAUSE_FILE).write_text(order_id)
        time.sleep(60)  # the test kills the process here
    response = JsonResponse({"order": order_id, "amount": body.get("amount")}, status=201)
    response.set_cookie("last_order", order_id)
    response["X-Order"] = order_id
    return response


def _views() -> dict[str, Any]:
    from django.views.decorators.csrf import csrf_exempt

    from idem_core.integrations.django import idempotent_view

    transactional = idempotent_view(idem())
    separate = idempotent_view(idem(), transactional=False)
    return {
        "tx": csrf_exempt(transactional(_order)),
        "plain": csrf_exempt(separate(_order)),
    }


def _urls() -> list[Any]:
    from django.urls import path

    views = _views()
    return [path("orders/tx", views["tx"]), path("orders/plain", views["plain"])]


def __getattr__(name: str) -> Any:
    # URLs built on first use: the views need the store URL, set after import in the tests.
    if name == "urlpatterns":
        return _urls()
    raise AttributeError(name)
