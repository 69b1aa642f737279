"""Shared test plumbing: real servers are required under CI=true and skipped loudly otherwise."""

from __future__ import annotations

import os
import socket
import warnings

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def server_missing(name: str, reason: str) -> None:
    """Skip locally with a loud reason; fail under CI=true, where every server must be up."""
    msg = f"{name} is not reachable: {reason}"
    if IN_CI:
        pytest.fail(f"{msg} (CI=true requires it)", pytrace=False)
    warnings.warn(f"SKIPPING {msg}", stacklevel=2)
    pytest.skip(f"SKIPPED LOUDLY: {msg}")
