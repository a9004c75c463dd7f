"""Shared fixtures: tiny randomly initialised models, synthetic data files and one tiny training run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports transformers
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from tests.helpers import base_cfg, make_tiny_bert, make_tiny_llama, train_tiny, write_mcq_pair  # noqa: E402


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def mcq_files(tmp_path):
    """(train, dev) synthetic multiple-choice files of 96 and 48 examples."""
    return write_mcq_pair(tmp_path, 96, 48)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 3-step run directory with metrics, diagnostics and regularisers (built once; read only)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = base_cfg(
        tmp,
        write_mcq_pair(tmp, 32, 8),
        max_steps=3,
        log_every=1,
        eval_every=2,
        diagnostics_every=1,
        load_balance_coef=0.01,
        diversity_coef=0.01,
    )
    train_tiny(cfg)
    return tmp / "run"
