"""Fixtures of the data tests."""

from __future__ import annotations

import pytest

from riemix.data import DATA_DIR_ENV


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """Datasets resolve without a user's RIEMIX_DATA_DIR (tests that need it set it themselves)."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
