"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own qspec cache folder: tests never read or write the user's
    ~/.cache/qspec (latency measurements from a test run would be served to real compiles)."""
    folder: Path = tmp_path_factory.mktemp("qspec-cache")
    monkeypatch.setenv("QSPEC_CACHE_DIR", str(folder))
    return folder
