"""``riemix eval``: flags reach ``evaluate_model``; the metrics are printed and written as JSON."""

from __future__ import annotations

import json

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
