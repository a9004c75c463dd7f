"""Task encoding: training items, packing, collation and the answer-token loss."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from riemix.data import ClassificationExample, load_dataset
from riemix.tasks import (
    DEFAULT_TEMPLATES,
    LMItem,
    TaskModel,
    TaskSpec,
    check_label_words,
    check_template,
    collate_encoder,
    collate_lm,
    encode_train,
    fit_max_length,
    max_positions,
    pack_items,
)
from tests.helpers import make_tiny_bert, make_tiny_llama, tiny_tokenizer, write_mcq


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


ALLOWED = re.escape("allowed placeholders: {text}, {text_pair}")


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{text} {foo}", r"template '\{text\} \{foo\}' has an unknown placeholder \{foo\}; " + ALLOWED),
        ("{}: {text}", r"template '\{\}: \{text\}' has an unknown placeholder \{\}; " + ALLOWED),
        ("{0}", r"template '\{0\}' has an unknown placeholder \{0\}; " + ALLOWED),
        ("{text!r}", r"template '\{text!r\}' has an unsupported placeholder \{text!r\} \(no conversion"),
        ("{text:>9}", r"template '\{text:>9\}' has an unsupported placeholder \{text:>9\}"),
        ("{text", r"template '\{text' is malformed: expected '\}' before end of string; " + ALLOWED),
        ("a } {text}", r"template 'a \} \{text\}' is malformed: Single '\}' encountered in format string; " + ALLOWED),
    ],
)
def test_template_with_bad_placeholder_is_refused(template, match):
    with pytest.raises(ValueError, match=match):
        TaskSpec(model_kind="causal_lm", task="classification", template=template)


def test_template_must_be_a_string():
    with pytest.raises(ValueError, match="template must be a string, got int"):
        check_template(3)


@pytest.mark.parametrize("template", [*DEFAULT_TEMPLATES.values(), "{text}", "{{literal}} {text_pair} / {text}"])
def test_valid_templates_pass(template):
    check_template(template)
    TaskSpec(model_kind="causal_lm", task="classification", template=template)


def _long_examples(words: int) -> list[ClassificationExample]:
    return [ClassificationExample(" ".join(["apple"] * words), None, 0), ClassificationExample("pear", None, 1)]


def test_max_positions_of_encoders():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    assert max_positions(make_tiny_bert()) == 64
    roberta = RobertaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=66, pad_token_id=1,
    )  # fmt: skip
    assert max_positions(RobertaForSequenceClassification(roberta)) == 64  # positions start at pad + 2
    assert max_positions(torch.nn.Linear(2, 2)) is None


def test_encoder_max_length_is_capped_to_the_model_positions_with_a_warning():
    spec = TaskSpec(model_kind="sequence_classification", task="classification", max_length=1024)
    with pytest.warns(UserWarning, match=r"max_length 1024 exceeds the 64 positions of BertForSequenceClassification"):
        fitted = fit_max_length(spec, make_tiny_bert())
    assert fitted.max_length == 64 and spec.max_length == 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = TaskSpec(model_kind="sequence_classification", task="classification", max_length=64)
        assert fit_max_length(short, make_tiny_bert()) is short
        lm = TaskSpec(model_kind="causal_lm", task="classification", max_length=1024)
        assert fit_max_length(lm, make_tiny_llama()) is lm  # causal LMs are left alone
    batch = collate_encoder(_long_examples(100), tiny_tokenizer(), fitted.max_length, regression=False)
    assert batch["input_ids"].shape[-1] == 64
    assert TaskModel(make_tiny_bert(), "sequence_classification")(batch, mode="logits").shape == (2, 2)


def test_encoder_batch_longer_than_the_model_positions_is_refused():
    batch = collate_encoder(_long_examples(100), tiny_tokenizer(), 1024, regression=False)
    match = r"a batch of 100 tokens is longer than the 64 positions of BertForSequenceClassification.*max_length to 64"
    with pytest.raises(ValueError, match=match):
        TaskModel(make_tiny_bert(), "sequence_classification")(batch)
