"""Driver errors of both DynamoDB stores, translated in one place.

Every DynamoDB request of either store goes through its ``_run``, which catches
:data:`Errors.transient` around the request and hands the exception to
:meth:`Errors.reply`: a failed condition the plan expects comes back as :class:`Failed`;
everything else is ``StoreUnavailable`` with the driver's exception as ``__cause__``.
"""

from __future__ import annotations

import importlib
import importlib.util

from idem_core.errors import StoreUnavailable
from idem_core.registry import import_driver

from .plans import NOT_FOUND, Call, Failed
from .settings import Settings
from .wire.protocol import ServiceError


def _optional(module: str, name: str) -> tuple[type[BaseException], ...]:
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return ()
    return (found,) if isinstance(found, type) and issubclass(found, BaseException) else ()


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a request may raise when the server or the path to it fails: botocore's errors
    (connection, timeouts, exhausted retries, error replies), the socket's (``OSError``,
    which ``TimeoutError`` and ``ConnectionError`` are), and what the HTTP layers below may
    let through: http.client and urllib3 (boto3), aiohttp (aiobotocore). The lean path
    raises error replies as ``ServiceError`` and connection failures as ``OSError``."""
    import http.client  # with botocore, which imports it anyway: not in a lean cold start

    exc = import_driver("botocore.exceptions", "dynamodb")
    return (
        ServiceError,
        exc.BotoCoreError,
        exc.ClientError,
        OSError,
        http.client.HTTPException,
        *_optional("urllib3.exceptions", "HTTPError"),
        *_optional("aiohttp", "ClientError"),
    )


#: what the lean path raises: error replies, and broken connections, bad replies (its parser
#: raises ``ConnectionError``s) and timeouts
LEAN_TRANSIENT: tuple[type[BaseException], ...] = (ServiceError, OSError)


def require_driver(module: str) -> None:
    """Fail now, naming the extra, when ``module`` is not installed; without importing it
    (botocore takes a good part of a Lambda cold start, and the lean path may not need it)."""
    if importlib.util.find_spec(module) is None:
        import_driver(module, "dynamodb")  # raises ConfigurationError


class Errors:
    """The translation of one store's driver errors.

    ``transient`` starts with the lean path's errors only, so that a store that never needs
    botocore never imports it; a store calls :meth:`drivers` before it first uses botocore
    (its boto3 client, a given one, or botocore's credential chain). The drivers read
    ``transient`` when an error is being caught, so the larger tuple applies from then on.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transient = LEAN_TRANSIENT

    def drivers(self) -> None:
        """botocore and the HTTP layers below it are in use: their errors are transient too."""
        if self.transient is LEAN_TRANSIENT:
            self.transient = transient_errors()

    def reply(self, call: Call, exc: BaseException) -> Failed:
        """A failed condition ``call`` expects, as ``Failed``; otherwise raises
        ``StoreUnavailable`` from ``exc``."""
        response = getattr(exc, "response", None)
        code = ""
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code and code in call.expect:
                return Failed(code, response, exc)
        raise self.unavailable(exc, code) from exc

    def unavailable(self, exc: BaseException, code: str = "") -> StoreUnavailable:
        """A driver error as StoreUnavailable, with a hint where one helps."""
        table = self.settings.table
        if code == NOT_FOUND:
            return StoreUnavailable(
                f"DynamoDB table {table!r} does not exist; create it with "
                f"`idem setup dynamodb://{table}?...` ({exc})"
            )
        detail = str(exc) or type(exc).__name__
        return StoreUnavailable(f"DynamoDB request on table {table!r} failed: {detail}")
