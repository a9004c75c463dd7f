"""``generate`` / ``generate_text``: the chat template, greedy determinism, streaming, the options checked."""

from __future__ import annotations

import io

import pytest

import riemix.ship.generation as generate_module
from riemix.ship.generation import build_prompt, generate, generate_text
from tests.helpers import tiny_tokenizer
from tests.ship.common import adapted_tiny, write_run

TEMPLATE = (
    "{% for m in messages %}Question: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} Answer:{% endif %}"
)


def test_the_chat_template_is_applied_when_the_tokenizer_has_one():
    tok = tiny_tokenizer()
    assert build_prompt(tok, "what is") == ("what is", False)
    tok.chat_template = TEMPLATE
    assert build_prompt(tok, "what is") == ("Question: what is Answer:", True)
    assert build_prompt(tok, "what is", chat_template=False) == ("what is", False)


def test_greedy_generation_is_deterministic_and_streamed(model_dir):
    model, tok = adapted_tiny(model_dir)
    stream = io.StringIO()
    text = generate_text(model, tok, "what is the best", max_new_tokens=5, stream=stream)
    assert text and stream.getvalue() == text + "\n"
    assert generate_text(model, tok, "what is the best", max_new_tokens=5) == text


def test_sampling_is_seeded(model_dir):
    model, tok = adapted_tiny(model_dir)
    runs = [generate_text(model, tok, "what is", max_new_tokens=8, temperature=1.5, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]


def test_generate_loads_a_run_and_continues_the_prompt(model_dir, tmp_path):
    model, tok = adapted_tiny(model_dir)
    run = write_run(tmp_path / "run", model_dir, model)
    want = generate_text(model, tok, "what is", max_new_tokens=4)
    stream = io.StringIO()
    assert generate("what is", adapter=str(run), max_new_tokens=4, stream=stream) == want
    assert stream.getvalue() == want + "\n"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prompt": "  "}, "the prompt is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
        ({"temperature": -1.0}, r"temperature must be >= 0 and finite, got -1.0"),
        ({"temperature": float("nan")}, "temperature must be >= 0 and finite, got nan"),
    ],
)
def test_bad_options_are_refused_before_loading(kwargs, match, monkeypatch):
    monkeypatch.setattr(generate_module, "load_adapted", lambda *a: pytest.fail("must not load"))
    with pytest.raises(ValueError, match=match):
        generate(**{"prompt": "what is", "model": "m", **kwargs})


def test_a_model_without_a_tokenizer_is_refused(tmp_path):
    from tests.helpers import make_tiny_llama

    make_tiny_llama().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="bare' has no tokenizer files; generate needs one"):
        generate("what is", model=str(tmp_path / "bare"))


def test_generate_loads_the_base_quantized_when_asked(model_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import riemix.ship.loading as loading
    from riemix import load_adapter
    from riemix.hub.loading import load_model

    asked = []

    def spy(*args, **kwargs):
        asked.append(kwargs["quantization"])
        return load_model(*args, **kwargs)

    monkeypatch.setattr(loading, "load_model", spy)
    model, _ = adapted_tiny(model_dir)
    run = write_run(tmp_path / "run", model_dir, model)
    nf4, tok = load_model(model_dir, quantization="nf4")
    load_adapter(nf4, run / "adapter")
    want = generate_text(nf4.eval(), tok, "what is", max_new_tokens=4)
    assert generate("what is", adapter=str(run), max_new_tokens=4, quantization="nf4") == want
    assert asked == ["nf4"]
