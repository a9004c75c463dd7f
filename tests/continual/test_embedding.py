"""riemix.continual.embedding: texts -> the mean of the final hidden state over their non-padding tokens."""

from __future__ import annotations

import pytest
import torch

from riemix.continual import NoveltyDetector, embed_texts
from tests.helpers import make_tiny_llama, tiny_tokenizer

TEXTS = ["what is the best pick", "apple", "the tasty fig here today", "rock sand iron"]


def _one_by_one(model, tokenizer, texts):
    """Each text alone (no padding): the mean over its tokens of base_model's last hidden state."""
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state  # (1, T, H), after LlamaModel.norm
        rows.append(hidden[0].mean(0))  # (H,)
    return torch.stack(rows)  # (n, H)


def test_padded_batches_give_each_text_its_own_mean():
    model, tokenizer = make_tiny_llama(), tiny_tokenizer()
    want = _one_by_one(model, tokenizer, TEXTS)
    for batch_size in (1, 3, 4):
        got = embed_texts(model, tokenizer, TEXTS, batch_size=batch_size)
        assert got.shape == (4, 32) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_final_norm_is_included_and_max_length_truncates():
    model, tokenizer = make_tiny_llama(), tiny_tokenizer()
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # the final RMSNorm's gain scales the embedding
    got = embed_texts(model, tokenizer, TEXTS[:1])
    torch.testing.assert_close(got, _one_by_one(model, tokenizer, TEXTS[:1]))
    cut = embed_texts(model, tokenizer, ["what is the best pick"], max_length=2)
    torch.testing.assert_close(cut, _one_by_one(model, tokenizer, ["what is"]))


def test_the_detector_embeds_with_the_same_function_and_restores_the_mode():
    model, tokenizer = make_tiny_llama().train(), tiny_tokenizer()
    got = NoveltyDetector.embed(model, tokenizer, TEXTS, batch_size=2)
    assert model.training
    torch.testing.assert_close(got, embed_texts(model.eval(), tokenizer, TEXTS))


@pytest.mark.parametrize(
    ("texts", "kwargs", "match"),
    [
        ([], {}, "texts must be a non-empty sequence of strings"),
        ("apple", {}, "texts must be a non-empty sequence of strings"),
        (["apple", 3], {}, "texts must be a non-empty sequence of strings"),
        (["apple"], {"batch_size": 0}, "batch_size must be an int >= 1"),
        (["apple"], {"batch_size": True}, "batch_size must be an int >= 1"),
        (["apple"], {"max_length": 0}, "max_length must be an int >= 1"),
        (["apple"], {"max_length": 2.5}, "max_length must be an int >= 1"),
    ],
)
def test_invalid_arguments_are_refused(texts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        embed_texts(make_tiny_llama(), tiny_tokenizer(), texts, **kwargs)


def test_a_tokenizer_without_pad_token_is_refused():
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        embed_texts(make_tiny_llama(), tiny_tokenizer(pad=False), ["apple"])
