"""Where the lean path sends and with which credentials: what boto3 would use.

Credentials: the environment's (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``: a Lambda function's, read without loading botocore, as botocore's
first provider reads them) unless a profile is named; otherwise botocore's whole chain
(profiles, SSO, assumed roles, web identity, container and instance metadata), whose
refreshable credentials refresh themselves before they expire.

Region: the URL's, else ``AWS_DEFAULT_REGION``, else the profile's. Endpoint: the URL's
``endpoint_url``, else ``AWS_ENDPOINT_URL_DYNAMODB`` or ``AWS_ENDPOINT_URL``, else the
region's public endpoint in the ``aws``, ``aws-cn`` and ``aws-us-gov`` partitions. Anything
else (FIPS or dual-stack endpoints, endpoints set in the config file, other partitions) is
left to botocore's endpoint rules: :attr:`Resolved.endpoint` is None and the store asks its
boto3 client.
"""

from __future__ import annotations

import os
import re
from typing import Any

import msgspec

from idem_core.errors import ConfigurationError

from ..settings import Settings
from .sigv4 import Frozen

_AWS = re.compile(r"^(us|eu|ap|sa|ca|me|af|il|mx)-\w+-\d+$")
_GOV = re.compile(r"^us-gov-\w+-\d+$")
_CN = re.compile(r"^cn-\w+-\d+$")
_TRUE = {"true", "1", "yes"}
# Config-file keys that change the endpoint (botocore's names).
_ENDPOINT_KEYS = ("endpoint_url", "services", "use_fips_endpoint", "use_dualstack_endpoint")


class Credentials:
    """Static credentials, or botocore's (refreshed by botocore when they near expiry)."""

    def __init__(self, static: Frozen | None = None, botocore: Any = None) -> None:
        self._static = static
        self._botocore = botocore
        self.refreshable = hasattr(botocore, "refresh_needed")

    def frozen(self) -> Frozen:
        if self._static is not None:
            return self._static
        creds = self._botocore.get_frozen_credentials()
        return Frozen(creds.access_key, creds.secret_key, creds.token or None)

    def stale(self) -> bool:
        """Whether ``frozen()`` may refresh them now (a request to STS, SSO, metadata...)."""
        return bool(self.refreshable and self._botocore.refresh_needed())


class Resolved(msgspec.Struct, frozen=True):
    region: str | None
    #: None: only botocore's endpoint rules know it
    endpoint: str | None
    credentials: Credentials


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _config_file() -> bool:
    path = os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"
    return os.path.isfile(os.path.expanduser(path))


def env_credentials(settings: Settings) -> Frozen | None:
    """The environment's credentials when botocore's first provider would return them."""
    env = os.environ
    if settings.profile is not None or env.get("AWS_CREDENTIAL_EXPIRATION"):
        return None  # a named profile skips them; an expiry makes them refreshable
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        return None
    token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None
    return Frozen(access, secret, token)


def public_endpoint(region: str) -> str | None:
    if _AWS.match(region) or _GOV.match(region):
        return f"https://dynamodb.{region}.amazonaws.com"
    if _CN.match(region):
        return f"https://dynamodb.{region}.amazonaws.com.cn"
    return None


def _endpoint(settings: Settings, region: str | None, config: dict[str, Any]) -> str | None:
    if settings.endpoint_url:
        return settings.endpoint_url
    ignore = _env_true("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or (
        str(config.get("ignore_configured_endpoint_urls", "")).lower() in _TRUE
    )
    if not ignore:
        for name in ("AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL"):
            if os.environ.get(name):
                return os.environ[name]
    if _env_true("AWS_USE_FIPS_ENDPOINT") or _env_true("AWS_USE_DUALSTACK_ENDPOINT"):
        return None
    if any(k in config for k in _ENDPOINT_KEYS):
        return None
    return public_endpoint(region) if region else None


def fast(settings: Settings) -> Resolved | None:
    """Resolved from the URL and the environment alone, or None: botocore is needed (a
    named profile, a config file, or credentials that are not in the environment)."""
    creds = env_credentials(settings)
    if creds is None or _config_file():
        return None
    region = settings.region or os.environ.get("AWS_DEFAULT_REGION") or None
    return Resolved(region, _endpoint(settings, region, {}), Credentials(static=creds))


def slow(settings: Settings) -> Resolved:
    """Through a botocore session: its configuration, its credential chain. May block (it
    may fetch credentials)."""
    import botocore.exceptions
    import botocore.session

    try:
        session = botocore.session.Session(profile=settings.profile)
        config: dict[str, Any] = session.get_scoped_config()
        region = settings.region or session.get_config_variable("region") or None
    except botocore.exceptions.BotoCoreError as exc:  # a missing profile, a broken file
        raise ConfigurationError(f"cannot create a DynamoDB client: {exc}") from exc
    static = env_credentials(settings)
    if static is not None:
        credentials = Credentials(static=static)
    else:
        found = session.get_credentials()
        if found is None:
            raise botocore.exceptions.NoCredentialsError()
        credentials = Credentials(botocore=found)
    return Resolved(region, _endpoint(settings, region, config), credentials)
