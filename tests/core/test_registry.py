"""Stores found by URL scheme: idem-core's own schemes from its own distribution's entry
points (without listing every installed distribution's), third-party schemes from the
``idem_core.stores`` entry points of theirs, and errors that name what to install."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from idem_core import ConfigurationError, Idempotency, registry
from idem_core.memory import MemoryStore


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing loaded yet, as in a new process."""
    monkeypatch.setattr(registry, "_loaded", {})


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None) -> Iterator[None]:
    """An installed distribution 'acme-store' declaring the schemes 'acme' and
    'redis+acme' (a variant of one of ours) in the ``idem_core.stores`` group."""
    (tmp_path / "acme_store.py").write_text(
        "from idem_core.memory import MemoryBackend\nBACKEND = MemoryBackend()\n"
    )
    info = tmp_path / "acme_store-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-store\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[idem_core.stores]\nacme = acme_store:BACKEND\nredis+acme = acme_store:BACKEND\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("acme_store", None)


def test_own_schemes_read_only_our_entry_points(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []
    original = importlib.metadata.PathDistribution.read_text

    def spy(self: importlib.metadata.PathDistribution, filename: str) -> str | None:
        if filename == "entry_points.txt":
            read.append(self._path.name)  # type: ignore[attr-defined]
        return original(self, filename)

    monkeypatch.setattr(importlib.metadata.PathDistribution, "read_text", spy)
    assert isinstance(Idempotency.from_url("memory://").store, MemoryStore)
    assert type(registry.backend_for("redis+cluster://h:1")).__module__ == "idem_redis.backend"
    assert all(name.startswith("idem_core-") for name in read), read


def test_own_schemes_resolve_through_importlib_metadata_too(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where our ``.dist-info`` is not a folder on sys.path (a zip, an egg)."""
    monkeypatch.setattr(registry, "_own_entry_points_text", lambda: None)
    assert isinstance(Idempotency.from_url("memory://").store, MemoryStore)
    assert type(registry.backend_for("redis+cluster://h:1")).__module__ == "idem_redis.backend"


@pytest.mark.usefixtures("third_party")
def test_a_third_party_scheme_resolves_through_its_entry_points() -> None:
    assert "acme_store" not in sys.modules
    assert isinstance(Idempotency.from_url("acme://").store, MemoryStore)
    assert registry.backend_for("acme://") is sys.modules["acme_store"].BACKEND
    # 'acme+tls' falls back to 'acme'; 'redis+acme' is theirs, not our 'redis'
    assert registry.backend_for("acme+tls://") is sys.modules["acme_store"].BACKEND
    assert registry.backend_for("redis+acme://h") is sys.modules["acme_store"].BACKEND
    with pytest.raises(ConfigurationError, match=r"registered schemes: .*acme.*memory"):
        registry.backend_for("nope://x")


def test_a_known_scheme_whose_store_cannot_import_names_the_extra(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "idem_dynamodb.backend", None)  # import fails
    with pytest.raises(ConfigurationError, match=r"pip install 'idem-core\[dynamodb\]'"):
        registry.backend_for("dynamodb://t")


def test_an_unknown_scheme_lists_the_registered_ones(fresh: None) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown store URL scheme 'nope'.*dynamodb"):
        registry.backend_for("nope://x")
