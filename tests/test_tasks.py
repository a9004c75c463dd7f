"""Task encoding: training items, packing, collation and the answer-token loss."""

from __future__ import annotations

import pytest
import torch

from riemix.data import load_dataset
from riemix.tasks import LMItem, TaskModel, TaskSpec, check_label_words, collate_lm, encode_train, pack_items
from tests.helpers import make_tiny_llama, tiny_tokenizer, write_mcq


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


def test_pack_items_and_collate_loss_positions():
    items = [LMItem([1, 2, 3], [4]), LMItem([5], [6, 7]), LMItem([8, 9, 10, 11], [12, 13])]
    rows = pack_items(items, max_length=8)
    # sizes 4, 3, 6 with room 8, first-fit decreasing: [6] and [4, 3]
    assert [sum(len(i.prompt) + len(i.target) for i in row) for row in rows] == [6, 7]
    batch = collate_lm(rows, pad_id=0)
    flat_ids = batch["input_ids"].reshape(-1)
    # every loss position predicts the token that follows it
    assert torch.equal(flat_ids[batch["loss_index"] + 1], batch["loss_target"])
    assert sorted(batch["loss_target"].tolist()) == [4, 6, 7, 12, 13]


def _cls_spec(words):
    return TaskSpec(model_kind="causal_lm", task="classification", label_words=words)


@pytest.mark.parametrize(
    ("words", "match"),
    [
        (["good apple", "good pear"], r"label words \['good apple', 'good pear'\] all start with the token 'good'"),
        (["good", "zebra"], r"label word 'zebra' starts with the unknown token '<unk>'"),
        (["good", ""], r"label word '' encodes to no token"),
    ],
)
def test_label_words_the_scoring_cannot_tell_apart_are_refused(words, match):
    with pytest.raises(ValueError, match=match):
        check_label_words(_cls_spec(words), tiny_tokenizer())


def test_distinct_label_words_and_other_tasks_pass():
    check_label_words(_cls_spec(["good", "bad"]), tiny_tokenizer())
    check_label_words(TaskSpec(model_kind="causal_lm", task="mcq"), tiny_tokenizer())
