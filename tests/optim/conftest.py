"""Fixtures of the optimizer tests."""

from __future__ import annotations

import pytest

import riemix.optim.precondition


@pytest.fixture(params=["per_pair", "stacked"])
def matmul_path(request, monkeypatch):
    """Run a test on both the CPU per-pair path and the stacked (accelerator) path."""
    monkeypatch.setattr(riemix.optim.precondition, "_stack_matmuls", lambda device: request.param == "stacked")
    return request.param
