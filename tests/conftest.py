"""Shared fixtures: tiny randomly initialised Hugging Face models built in the test process."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from tiny import make_tiny_bert, make_tiny_llama  # noqa: E402


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()
