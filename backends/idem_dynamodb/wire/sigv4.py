"""AWS Signature Version 4 for one service and region, as DynamoDB's JSON requests need it.

Only what a ``POST /`` with a JSON body signs: no query string, a signed payload (its
SHA-256, also over TLS, as botocore does for DynamoDB), and the headers the request carries
except ``user-agent`` (which botocore never signs either). The signing key depends on the
secret and the day only, so it is derived once a day per secret.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from typing import NamedTuple
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"


class Frozen(NamedTuple):
    """One consistent set of credentials (botocore's ``ReadOnlyCredentials`` has this shape)."""

    access_key: str
    secret_key: str
    token: str | None


def amz_date(epoch: float | None = None) -> str:
    """``YYYYMMDDTHHMMSSZ`` in UTC: the request's ``X-Amz-Date``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class Signer:
    def __init__(self, region: str, service: str = "dynamodb", path: str = "/") -> None:
        self.region = region
        self.service = service
        # The canonical URI: each segment percent-encoded once (``~`` and ``/`` kept).
        self.uri = quote(path or "/", safe="/~")
        self._keys: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def _key(self, secret: str, day: str) -> bytes:
        found = self._keys.get((secret, day))
        if found is None:
            key = _hmac(("AWS4" + secret).encode(), day)
            for part in (self.region, self.service, "aws4_request"):
                key = _hmac(key, part)
            with self._lock:
                if len(self._keys) > 8:  # old days and rotated secrets
                    self._keys.clear()
                self._keys[(secret, day)] = found = key
        return found

    def sign(
        self, creds: Frozen, headers: dict[str, str], body: bytes, when: str
    ) -> dict[str, str]:
        """``headers`` (lower-case names, ``host`` included) plus ``x-amz-date``, the token
        when there is one, and ``authorization``: a new dict, ready to send."""
        signed = dict(headers)
        signed["x-amz-date"] = when
        if creds.token:
            signed["x-amz-security-token"] = creds.token
        names = sorted(signed)
        canonical_headers = "".join(f"{n}:{' '.join(signed[n].split())}\n" for n in names)
        signed_names = ";".join(names)
        canonical = "\n".join(
            (
                "POST",
                self.uri,
                "",
                canonical_headers,
                signed_names,
                hashlib.sha256(body).hexdigest(),
            )
        )
        day = when[:8]
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"{ALGORITHM}\n{when}\n{scope}\n" + hashlib.sha256(canonical.encode()).hexdigest()
        signature = hmac.new(
            self._key(creds.secret_key, day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        signed["authorization"] = (
            f"{ALGORITHM} Credential={creds.access_key}/{scope}, "
            f"SignedHeaders={signed_names}, Signature={signature}"
        )
        return signed
