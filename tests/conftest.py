"""Fixtures every level shares. Integration fixtures live in tests/integration/conftest.py."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_detfleet_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests start from defaults: no DETFLEET_ variable or .env of the developer's leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("DETFLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
