"""riemix.hub.gguf_cache: the dequantised built-in is cached atomically, reused, and safe under crashes and races.

The real GGUF is never dequantised here: ``fake_gguf`` (conftest.py) stands in a tiny factory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from riemix.hub import ModelLoadError, gguf_cache, load_model, resolve
from riemix.io import fileio
from tests.helpers import make_tiny_llama, tiny_tokenizer

DEAD_PID = 4_194_305  # above Linux's PID_MAX_LIMIT, so never a live process
IDS = torch.tensor([[3, 4, 5, 6, 7, 1]])


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.name.startswith("."))


def test_gguf_cache_built_atomically_and_reused(fake_gguf, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    renames = []
    real_rename = os.rename

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", spy)
    model1, tok1 = load_model("smollm2-135m", cache_dir=cache)
    final = cache / "models" / "smollm2-135m"
    assert len(fake_gguf) == 1
    assert final.is_dir() and (final / "riemix_cache.json").is_file()
    assert (final / "model.safetensors").is_file()
    (src, dst), *_ = renames
    assert dst == final and src.parent == final.parent and src.name.startswith(".smollm2-135m.tmp.")
    assert _leftovers(final.parent) == []

    model2, tok2 = load_model("smollm2-135m", cache_dir=cache)
    assert len(fake_gguf) == 1  # reused: the factory is not called again
    with torch.no_grad():
        assert torch.equal(model1(IDS).logits, model2(IDS).logits)
        assert torch.equal(model2(IDS).logits, make_tiny_llama(seed=1)(IDS).logits)
    assert tok2.pad_token == "<pad>" and tok2.padding_side == "right"

    # RIEMIX_CACHE is the default cache root.
    load_model("smollm2-135m")
    assert (Path(os.environ["RIEMIX_CACHE"]) / "models" / "smollm2-135m" / "riemix_cache.json").is_file()


def test_gguf_cache_crash_leaves_nothing_loadable(fake_gguf, monkeypatch, tmp_path):
    cache = tmp_path / "cache"

    def crash(directory):
        raise RuntimeError("simulated crash while writing the cache")

    monkeypatch.setattr(fileio, "fsync_tree", crash)
    with pytest.raises(ModelLoadError, match="simulated crash"):
        load_model("smollm2-135m", cache_dir=cache)
    models_dir = cache / "models"
    assert not (models_dir / "smollm2-135m").exists()
    assert _leftovers(models_dir) == []


def test_gguf_cache_ignores_and_cleans_leftovers(fake_gguf, tmp_path):
    models_dir = tmp_path / "cache" / "models"
    host = fileio._host_tag()
    # A hard crash (kill -9) of a build on this host: half-written temp dir, dead pid.
    dead = models_dir / f".smollm2-135m.tmp.{host}.{DEAD_PID}.deadbeef"
    dead.mkdir(parents=True)
    (dead / "config.json").write_text("{}")
    # An old build from another host sharing the cache, and a recent (maybe running) one.
    old_remote = models_dir / ".smollm2-135m.tmp.otherhost.123.cafecafe"
    old_remote.mkdir()
    os.utime(old_remote, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    live_remote = models_dir / ".smollm2-135m.tmp.otherhost.456.feedfeed"
    live_remote.mkdir()
    # A final directory without the completion marker is never trusted.
    final = models_dir / "smollm2-135m"
    final.mkdir()
    (final / "config.json").write_text('{"garbage": true}')

    model, _ = load_model("smollm2-135m", cache_dir=tmp_path / "cache")
    assert len(fake_gguf) == 1
    assert (final / "riemix_cache.json").is_file()
    assert _leftovers(models_dir) == [live_remote.name]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, make_tiny_llama(seed=1)(IDS).logits)


def test_gguf_cache_concurrent_writer_wins(fake_gguf, monkeypatch, tmp_path):
    """Another process publishes the cache while we build ours: we use theirs and discard ours."""
    cache = tmp_path / "cache"
    final = cache / "models" / "smollm2-135m"
    spec = resolve._BUILTINS["smollm2-135m"]
    real_save = fileio.fsync_tree

    def other_writer_first(directory):
        real_save(directory)
        other = make_tiny_llama(seed=2)
        other.save_pretrained(final)
        tiny_tokenizer().save_pretrained(final)
        identity = gguf_cache._source_identity(spec, resolve._locate_builtin(spec))
        (final / "riemix_cache.json").write_text(json.dumps({"format": 1, "source": identity}))

    monkeypatch.setattr(fileio, "fsync_tree", other_writer_first)
    model, _ = load_model("smollm2-135m", cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, make_tiny_llama(seed=2)(IDS).logits)
    assert _leftovers(final.parent) == []
