"""Evaluation: length-grouped scoring returns predictions in dataset order, whatever the batch size."""

from __future__ import annotations

import numpy as np
import pytest

from riemix.data import ClassificationExample, Dataset, load_dataset
from riemix.evaluate import evaluate_model, predict
from riemix.tasks import TaskModel, TaskSpec
from tests.helpers import GOOD, make_tiny_bert, make_tiny_llama, tiny_tokenizer, write_mcq


@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_mcq_predictions_do_not_depend_on_batching(tmp_path, fmt):
    ds = load_dataset(write_mcq(tmp_path / "d.jsonl", 23, 3), "dev")
    spec = TaskSpec.for_dataset(ds, "causal_lm", format=fmt)
    tm = TaskModel(make_tiny_llama(), "causal_lm")
    one = predict(tm, ds, spec, tiny_tokenizer(), batch_size=1)["preds"]
    many = predict(tm, ds, spec, tiny_tokenizer(), batch_size=9)["preds"]
    assert np.array_equal(one, many) and len(one) == 23


def test_encoder_predictions_do_not_depend_on_batching():
    rng = np.random.default_rng(0)
    exs = [
        ClassificationExample(" ".join(rng.choice(GOOD, size=int(rng.integers(1, 6)))), None, i % 2) for i in range(17)
    ]
    ds = Dataset("toy", "classification", exs, label_names=("a", "b"))
    spec = TaskSpec.for_dataset(ds, "sequence_classification")
    tm = TaskModel(make_tiny_bert(), "sequence_classification")
    one = predict(tm, ds, spec, tiny_tokenizer(), batch_size=1)["preds"]
    many = predict(tm, ds, spec, tiny_tokenizer(), batch_size=5)["preds"]
    assert np.array_equal(one, many)


def test_encoder_max_length_beyond_the_model_positions_is_capped_with_a_warning():
    exs = [ClassificationExample(" ".join([GOOD[i % 4]] * (30 + 20 * i)), None, i % 2) for i in range(4)]
    ds = Dataset("toy", "classification", exs, label_names=("a", "b"))  # up to 90 tokens; the model has 64
    tm = TaskModel(make_tiny_bert(), "sequence_classification")
    long = TaskSpec.for_dataset(ds, "sequence_classification", max_length=1024)
    with pytest.warns(UserWarning, match=r"max_length 1024 exceeds the 64 positions of BertForSequenceClassification"):
        capped = predict(tm, ds, long, tiny_tokenizer(), batch_size=2)["preds"]
    fitted = TaskSpec.for_dataset(ds, "sequence_classification", max_length=64)
    assert np.array_equal(capped, predict(tm, ds, fitted, tiny_tokenizer(), batch_size=2)["preds"])


def test_bad_template_is_refused_before_the_model_loads(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("riemix.evaluate.load_model", no_load)
    monkeypatch.setattr("riemix.evaluate.load_dataset", no_load)
    with pytest.raises(ValueError, match=r"template '\{text\} \{foo\}' has an unknown placeholder \{foo\}"):
        evaluate_model(model="tiny", dataset="toy.jsonl", template="{text} {foo}")


def test_evaluation_shows_a_progress_bar_of_the_examples(tmp_path, capsys):
    ds = load_dataset(write_mcq(tmp_path / "d.jsonl", 23, 3), "dev")
    spec = TaskSpec.for_dataset(ds, "causal_lm")
    tm = TaskModel(make_tiny_llama(), "causal_lm")
    quiet = predict(tm, ds, spec, tiny_tokenizer(), batch_size=9)["preds"]
    assert capsys.readouterr().err == ""
    shown = predict(tm, ds, spec, tiny_tokenizer(), batch_size=9, progress="eval d")["preds"]
    err = capsys.readouterr().err
    assert "eval d" in err and "0/23" in err  # examples done / total
    assert np.array_equal(quiet, shown)
