"""Fixtures of the hub tests: offline, a private cache, and a fake built-in GGUF."""

from __future__ import annotations

import pytest
import torch

from riemix.hub import loading, resolve
from tests.helpers import make_tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RIEMIX_CACHE", str(tmp_path / "riemix-cache"))


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Point smollm2-135m at a dummy file and replace the slow GGUF loader with a tiny factory."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF-not-really")
    monkeypatch.setattr(resolve, "_locate_builtin", lambda spec: gguf)
    calls = []

    def factory(path, dtype=torch.float32):
        calls.append(path)
        return make_tiny_llama(seed=1), tiny_tokenizer()

    monkeypatch.setattr(loading, "_load_from_gguf", factory)
    return calls
