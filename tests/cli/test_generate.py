"""``riemix generate``: greedy output streamed to stdout and nothing else; the prompt from --prompt or stdin."""

from __future__ import annotations

import io

import pytest

import riemix.cli.generate as generate_command
from riemix.cli import main
from riemix.ship.generation import generate_text
from tests.helpers import save_tiny_model_dir, tiny_tokenizer
from tests.ship.common import adapted_tiny, write_run

TEMPLATE = (
    "{% for m in messages %}Question: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} Answer:{% endif %}"
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def run_dir(tmp_path):
    """A run directory whose adapter is a random one on the tiny model, and that adapted model and tokenizer."""
    model_dir = save_tiny_model_dir(tmp_path)
    model, tok = adapted_tiny(model_dir)
    return write_run(tmp_path / "run", model_dir, model), model, tok


def test_greedy_output_is_deterministic_and_only_the_text(run_dir, capsys):
    run, model, tok = run_dir
    want = generate_text(model, tok, "what is the best", max_new_tokens=5)
    argv = ["generate", "--adapter", str(run), "--prompt", "what is the best", "--max-new-tokens", "5"]
    outs = []
    for _ in range(2):
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == want + "\n"


def test_the_prompt_is_read_from_stdin(run_dir, capsys, monkeypatch):
    run, model, tok = run_dir
    monkeypatch.setattr("sys.stdin", io.StringIO("what is\n"))
    assert main(["generate", "--adapter", str(run / "adapter"), "--model", str(run.parent / "tiny-model"),
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert capsys.readouterr().out == generate_text(model, tok, "what is", max_new_tokens=4) + "\n"


def test_no_prompt_and_a_terminal_stdin_is_an_error(capsys, monkeypatch):
    monkeypatch.setattr(generate_command, "generate", lambda *a, **k: pytest.fail("must not load"))
    monkeypatch.setattr("sys.stdin", _Terminal())
    assert main(["generate", "--model", "m"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "riemix generate: error: no prompt: give --prompt TEXT or pipe the prompt on stdin" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["generate", "--model", "m"]) == 2
    assert "riemix generate: error: the prompt is empty (--prompt or stdin)" in capsys.readouterr().err


def test_the_chat_template_applies_unless_disabled(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path)
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    model, loaded_tok = adapted_tiny(model_dir)
    assert loaded_tok.chat_template == TEMPLATE
    run = write_run(tmp_path / "run", model_dir, model)
    for flags, templated in (([], True), (["--no-chat-template"], False)):
        assert main(["generate", "--adapter", str(run), "--prompt", "what is", "--max-new-tokens", "3", *flags]) == 0
        want = generate_text(model, loaded_tok, "what is", max_new_tokens=3, chat_template=templated)
        assert capsys.readouterr().out == want + "\n"


def test_bad_options_exit_2(capsys):
    assert main(["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "riemix generate: error: max_new_tokens must be an int >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x"]) == 2
    assert r"riemix generate: error: no adapter given: name the base model (--model)" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--prompt", "--model", "--adapter", "--max-new-tokens", "--temperature",
                                        "--no-chat-template"))  # fmt: skip
