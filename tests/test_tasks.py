"""Task encoding and scoring: length-grouped evaluation returns predictions in dataset order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import GOOD, tiny_tokenizer, write_mcq
from tiny import make_tiny_bert, make_tiny_llama

from riemix.data import ClassificationExample, Dataset, load_dataset
from riemix.evaluate import predict
from riemix.tasks import TaskModel, TaskSpec, collate_lm, encode_train


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


def test_lm_loss_uses_answer_tokens_only(tmp_path):
    ds = load_dataset(write_mcq(tmp_path / "d.jsonl", 4, 0), "train")
    spec = TaskSpec.for_dataset(ds, "causal_lm", format="cloze")
    tok = tiny_tokenizer()
    items = [encode_train(ex, spec, tok) for ex in ds.examples]
    batch = collate_lm(items, tok.pad_token_id)
    model = make_tiny_llama()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    flat = logits.reshape(-1, logits.shape[-1])
    want = torch.nn.functional.cross_entropy(flat[batch["loss_index"]], batch["loss_target"])
    torch.testing.assert_close(TaskModel(model, "causal_lm")(batch), want)
    assert batch["loss_target"].numel() == sum(len(it.target) for it in items)
