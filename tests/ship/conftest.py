"""The tiny model directory the ship tests load from."""

from __future__ import annotations

import pytest

from tests.helpers import save_tiny_model_dir


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama and its tokenizer saved as a Hugging Face directory."""
    return save_tiny_model_dir(tmp_path)
