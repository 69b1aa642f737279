"""Every setting is checked once, where it is given, with a ConfigurationError naming it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from idem_core import ConfigurationError, Idempotency, IdempotencyError
from idem_core.memory import MemoryStore

TEN_YEARS = 10 * 365 * 86400

BAD_SECONDS = [0, 0.0, -1, math.nan, math.inf, -math.inf, "60", True, 1e13, TEN_YEARS + 1]


def test_configuration_error_is_an_idempotency_error() -> None:
    assert issubclass(ConfigurationError, IdempotencyError)


@pytest.fixture
def idem() -> Idempotency:
    return Idempotency(MemoryStore(), namespace="shop")


def _construct(**settings: Any) -> Callable[[], Any]:
    return lambda: Idempotency(MemoryStore(), **settings)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("ttl", v) for v in [*BAD_SECONDS, None]]
    + [("lease", v) for v in [*BAD_SECONDS, None]]
    + [("retries", v) for v in [-1, 1.5, "1", True, None, 101]]
    + [("local_cache", v) for v in [-1, 1.5, "10", None]]
    + [("namespace", v) for v in [123, "", None, "a:b", "a\\b", "a\x00b", "a\udc80", "n" * 65]]
    + [("on_store_error", v) for v in ["open", None, "FAIL"]]
    + [("on_event", v) for v in [5, [5], "hook"]]
    + [("instrument", 5), ("store_options", [1])],
)
def test_idempotency_settings(setting: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        Idempotency(MemoryStore(), **{setting: value})
    with pytest.raises(ConfigurationError, match=setting):
        Idempotency.from_url("memory://", **{setting: value})


def test_ttl_zero_is_refused_not_read_as_a_day(idem: Idempotency) -> None:
    # Before: ttl=0 (and lease=0) silently became the object's default (24 h / 30 s).
    with pytest.raises(ConfigurationError, match=r"ttl must be .*> 0.*got 0"):
        idem.claim("k", ttl=0)
    with pytest.raises(ConfigurationError, match="lease"):
        idem.claim("k", lease=0)
    with pytest.raises(ConfigurationError, match="ttl"):
        idem.idempotent(key="k", ttl=0)(lambda k: k)
    with pytest.raises(ConfigurationError, match="ttl"):
        Idempotency(MemoryStore(), ttl=0)


def test_accepted_edges() -> None:
    idem = Idempotency(
        MemoryStore(),
        namespace="n" * 64,
        ttl=TEN_YEARS,
        lease=0.001,
        retries=0,
        local_cache=0,
        on_event=[lambda e: None],
    )
    with idem.claim("k", ttl=1, lease=TEN_YEARS) as call:
        call.complete(1)
    assert Idempotency(MemoryStore(), retries=100, ttl=60, lease=5).retries == 100


CALL_SETTINGS = (
    [("ttl", v) for v in BAD_SECONDS]
    + [("lease", v) for v in BAD_SECONDS]
    + [("wait_timeout", v) for v in [0, -1, math.nan, math.inf, "1", None, 1e13]]
    + [("renew_every", v) for v in [0, -1, math.nan, "1", 30, 31]]
    + [("on_in_progress", v) for v in ["block", None, 1]]
    + [("cache_errors", v) for v in [ValueError, ("x",), [ValueError]]]
)


@pytest.mark.parametrize(("setting", "value"), CALL_SETTINGS)
def test_call_settings(idem: Idempotency, setting: str, value: Any) -> None:
    runs: list[str] = []

    def work(k: str) -> str:
        runs.append(k)
        return k

    async def awork(k: str) -> str:
        return k

    settings: Any = {setting: value}
    with pytest.raises(ConfigurationError, match=setting):
        idem.idempotent(key="k", **settings)(work)
    with pytest.raises(ConfigurationError, match=setting):
        idem.idempotent(key="k", **settings)(awork)
    with pytest.raises(ConfigurationError, match=setting):
        idem.claim("k", **settings)
    with pytest.raises(ConfigurationError, match=setting):
        idem.aclaim("k", **settings)
    with pytest.raises(ConfigurationError, match=setting):
        idem.claim_many([("k", None)], **settings)
    assert runs == []


async def test_call_settings_aclaim_many(idem: Idempotency) -> None:
    with pytest.raises(ConfigurationError, match="ttl"):
        await idem.aclaim_many([("k", None)], ttl=math.nan)
    with pytest.raises(ConfigurationError, match="tll"):
        await idem.aclaim_many([("k", None)], tll=5)  # type: ignore[call-arg]


def test_unknown_settings_are_named(idem: Idempotency) -> None:
    with pytest.raises(ConfigurationError, match="tll"):
        idem.claim("k", tll=5)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="tll"):
        Idempotency.from_url("memory://", tll=5)
    with pytest.raises(ConfigurationError, match="url"):
        Idempotency.from_url(5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="var"):
        Idempotency.from_env(var="")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"key": 5}, "key"),
        ({"key": []}, "key"),
        ({"key": ["k", 5]}, "key"),
        ({"key": "k", "payload": 5}, "payload"),
        ({"key": "k", "scope": ""}, "scope"),
        ({"key": "k", "scope": 5}, "scope"),
        ({"key": "k", "scope": "a\x00"}, "scope"),
    ],
)
def test_decorator_specs(idem: Idempotency, spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        idem.idempotent(**spec)(lambda k: k)


def test_claim_scope_must_be_a_string(idem: Idempotency) -> None:
    with pytest.raises(ConfigurationError, match="scope"):
        idem.claim("k", scope=5)  # type: ignore[arg-type]
