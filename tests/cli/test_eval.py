"""``riemix eval``: flags reach ``evaluate_model``; the metrics are printed and written as JSON."""

from __future__ import annotations

import json

import pytest

import riemix.cli.eval as eval_command
from riemix.cli import main


def test_eval_passes_the_flags_to_evaluate_model(monkeypatch, tmp_path, capsys):
    calls = []

    def fake(**kw):
        calls.append(kw)
        return {"dataset": "d", "split": "dev", "examples": 3, "accuracy": 2 / 3}

    monkeypatch.setattr(eval_command, "evaluate_model", fake)
    out = tmp_path / "m.json"
    argv = ["eval", "--model", "m", "--dataset", "d", "--label-words", "no", "yes", "--subset", "3",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert calls == [{"model": "m", "dataset": "d", "label_words": ["no", "yes"], "subset": 3}]
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == fake()


def _never_called(**kw):
    raise AssertionError("evaluate_model must not run")


def test_output_that_is_a_directory_exits_2_before_loading(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(eval_command, "evaluate_model", _never_called)
    assert main(["eval", "--model", "m", "--dataset", "d", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"riemix eval: error: {tmp_path}: --output is a directory; give the path of a JSON file" in err


def test_output_under_a_file_exits_2_before_loading(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(eval_command, "evaluate_model", _never_called)
    blocker = tmp_path / "metrics.json"
    blocker.write_text("{}")
    out = blocker / "sub" / "m.json"
    assert main(["eval", "--model", "m", "--dataset", "d", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"riemix eval: error: {out}: --output cannot be written: {blocker} is a file, not a directory" in err


def test_output_in_a_new_directory_is_created(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(eval_command, "evaluate_model", lambda **kw: {"accuracy": 1.0})
    out = tmp_path / "new" / "dir" / "m.json"
    assert main(["eval", "--model", "m", "--dataset", "d", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"accuracy": 1.0}


def test_an_adapter_of_another_checkpoint_exits_2_unless_forced(tmp_path, mcq_files, capsys):
    from riemix import MoELoRAConfig, add_moe_lora, save_adapter
    from tests.helpers import make_tiny_llama, save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path)
    other = add_moe_lora(make_tiny_llama(seed=7), MoELoRAConfig(num_experts=2, top_k=1, rank=2))
    save_adapter(other, tmp_path / "adapter")  # trained on another checkpoint of the same architecture
    argv = ["eval", "--model", model_dir, "--adapter", str(tmp_path / "adapter"), "--dataset", mcq_files[1],
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "weights differ from those the adapter was trained on" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"Loaded anyway \(force\)"):
        assert main([*argv, "--force"]) == 0
