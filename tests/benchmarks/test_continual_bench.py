"""benchmarks/continual.py and its report section: means over seeds, the table, the targets checked."""

from __future__ import annotations

import argparse
import json

import continual
import pytest
from lib import continual_section


def run(avg, bwt, matrix):
    return {
        "avg": avg,
        "avg_incremental": avg,
        "bwt": bwt,
        "fwt": 0.0,
        "seconds": 10.0,
        "trainable_params": 100,
        "matrix": matrix,
        "zero_shot": [0.1, 0.2],
        "experts": [1, 2],
        "decisions": [{"task": "a", "reason": "first", "similarities": [], "threshold": 0.95}],
        "growth_seconds": [0.03],
    }


def test_mean_entry_averages_metrics_and_matrices_over_seeds():
    per_seed = {"0": run(0.5, -0.2, [[0.8, 0.3], [0.4, 0.6]]), "1": run(0.7, -0.1, [[0.6, 0.1], [0.6, 0.8]])}
    mean = continual.mean_entry(per_seed)
    assert mean["seeds"] == [0, 1] and mean["avg"] == pytest.approx(0.6) and mean["bwt"] == pytest.approx(-0.15)
    assert [pytest.approx(row) for row in ([0.7, 0.2], [0.5, 0.7])] == mean["matrix"]


def test_the_section_checks_the_targets(monkeypatch, tmp_path):
    monkeypatch.setattr(continual_section, "IMG", tmp_path)
    raw = {
        "peft_seq": {"0": run(0.50, -0.20, [[0.8, 0.3], [0.4, 0.6]])},
        "riemix_dynamic": {"0": run(0.58, -0.08, [[0.8, 0.3], [0.7, 0.6]])},
    }
    rec = {
        "stream": ["a", "b"],
        "date": "2026-11-26T00:00:00",
        "raw": raw,
        "machine": {"platform": "x", "cpu_threads": 2, "torch": "2"},
        "args": {
            "steps": 3,
            "batch_size": 8,
            "train_subset": 40,
            "max_length": 96,
            "eval_subset": 10,
            "rank": 8,
            "replay": 4,
        },
        "lr_selection": {"peft:0.001": 0.5},
        "lr": {"peft": 0.001},
        "candidates": {name: continual.mean_entry(r) for name, r in raw.items()},
    }
    text = "\n".join(continual_section.section("continual_a_b", rec))
    assert "| riemix_dynamic | 58.0 | 58.0 | -8.0 | +0.0 | 100 | 10 | 0 |" in text
    assert "Avg +8.0 points (target ≥ +5: met)" in text and "ratio 0.40 (target ≤ 0.5: met)" in text
    assert (tmp_path / "continual_a_b_riemix_dynamic.png").is_file()


def _args(**kw):
    base = {"stream": "a,b,c", "steps": 3, "batch_size": 8, "max_length": 96, "train_subset": 40, "rank": 8}
    return argparse.Namespace(**{**base, **kw})


def test_the_lr_stage_is_reused_only_from_the_same_computation(tmp_path):
    other = tmp_path / "continual_a_b.json"
    args = {k: v for k, v in vars(_args()).items() if k != "stream"}
    other.write_text(json.dumps({"stream": ["a", "b"], "args": args, "lr_selection": {"peft:0.001": 0.5}}))
    assert continual.reused_lrs(_args(), other) == {"peft:0.001": 0.5}
    with pytest.raises(SystemExit, match="its stream starts with 'a', not 'c'"):
        continual.reused_lrs(_args(stream="c,a"), other)
    with pytest.raises(SystemExit, match="its steps is 3, not 5"):
        continual.reused_lrs(_args(steps=5), other)
