"""The quality benchmark's bookkeeping (learning-rate choice, seed summaries, noise verdicts) and one tiny run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from test_train import save_tiny_model_dir, write_mcq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality_compare as qc  # noqa: E402
import report  # noqa: E402


def _row(stage, cand, lr, seed, final, early=None):
    row = {"stage": stage, "candidate": cand, "lr": lr, "seed": seed, "final": final, "trainable_params": 10}
    if early is not None:
        row["early"] = early
    return row


def test_choose_lrs_best_held_out_ties_to_smaller_and_skips_diverged():
    rows = [
        _row("sweep", "rsgd", 0.01, 0, 0.40),
        _row("sweep", "rsgd", 0.03, 0, 0.40),  # tie: the smaller lr wins
        _row("sweep", "rsgd", 0.1, 0, float("nan")),  # diverged: never chosen
        _row("sweep", "adamw", 1e-3, 0, 0.30),
        _row("sweep", "adamw", 3e-3, 0, 0.35),
        _row("sweep", "grsgd_p0.5", 1.0, 0, 0.99),  # not a family's base member: ignored
        _row("final", "adamw", 1e-2, 0, 0.99),  # final runs never choose
    ]
    assert qc.choose_lrs(rows) == {"rsgd": 0.01, "adamw": 3e-3}


def test_summarize_mean_and_sample_std_over_seeds():
    rec = {
        "runs": [
            _row("final", "rsgd", 0.01, 0, 0.50, 0.40),
            _row("final", "rsgd", 0.01, 1, 0.60, 0.44),
            _row("final", "zero_shot", 0.0, 0, 0.30),
            _row("sweep", "rsgd", 0.01, 0, 0.99),
        ]
    }
    s = qc.summarize(rec)
    assert s["rsgd"]["final"] == pytest.approx(0.55)
    assert s["rsgd"]["final_std"] == pytest.approx(math.sqrt(((0.05**2) * 2) / 1))
    assert s["rsgd"]["early"] == pytest.approx(0.42)
    assert s["rsgd"]["seeds"] == [0, 1]
    assert s["zero_shot"]["final_std"] is None and "early" not in s["zero_shot"]
    rec["runs"].append(_row("final", "grsgd_p0", 0.03, 0, 0.9))  # a run at a no-longer-chosen lr
    rec["runs"].append(_row("final", "grsgd_p0", 0.01, 0, 0.2))
    rec["chosen_lr"] = {"rsgd": 0.01}
    s = qc.summarize(rec)
    assert s["grsgd_p0"]["final_all"] == [0.2] and s["rsgd"]["final"] == pytest.approx(0.55)


def test_difference_noise_is_larger_of_seed_sd_and_binomial_se():
    a = {"seeds": [0, 1], "final_all": [0.5, 0.6], "final": 0.55}
    b = {"seeds": [0, 1], "final_all": [0.4, 0.4], "final": 0.4}
    mean, noise, within = report._difference(a, b, n=100)
    p = (0.55 + 0.4) / 2
    binom = math.sqrt(2 * p * (1 - p) / 100)
    seed_sd = math.sqrt(((0.1 - 0.15) ** 2 + (0.2 - 0.15) ** 2) / 1)
    assert mean == pytest.approx(0.15)
    assert noise == pytest.approx(max(binom, seed_sd))
    assert within is False  # 0.15 > 2 * 0.0707
    _, _, within_small = report._difference(a, {**b, "final_all": [0.45, 0.58], "final": 0.515}, n=100)
    assert within_small is True
    assert report._difference(a, {"seeds": [5], "final_all": [0.1], "final": 0.1}, n=100) is None


def test_check_protocol_refuses_to_mix_protocols():
    saved = {"args": {"steps": 150, "batch_size": 8, "adapter": {}, "data_dir": "a"}}
    qc.check_protocol(saved, {"steps": 150, "batch_size": 8, "adapter": {}, "data_dir": "b"}, Path("r.json"))
    with pytest.raises(SystemExit, match=r"r.json holds runs made with other steps=150; resuming would mix"):
        qc.check_protocol(saved, {"steps": 10, "batch_size": 8, "adapter": {}, "data_dir": "a"}, Path("r.json"))
    qc.check_protocol({}, {"steps": 10}, Path("new.json"))  # a new file has nothing to mix with


@pytest.mark.parametrize("candidate", ["grsgd_p0", "peft_adamw"])
def test_run_job_trains_and_scores_a_tiny_model(tmp_path, candidate):
    model_dir = save_tiny_model_dir(tmp_path)
    data = write_mcq(tmp_path / "mcq.jsonl", 40, 0)
    job = {
        "task": data,
        "format": "cloze",
        "model": model_dir,
        "model_kind": "causal_lm",
        "data_dir": None,
        "adapter": {"num_experts": 4, "rank": 2},
        "eval_batch_size": 8,
        "batch_size": 4,
        "stage": "final",
        "candidate": candidate,
        "lr": 1e-2,
        "seed": 0,
        "steps": 4,
        "early_step": 2,
        "eval_subset": 12,
    }
    row = qc.run_job(job)
    assert row["candidate"] == candidate and row["steps"] == 4
    assert 0.0 <= row["early"] <= 1.0 and 0.0 <= row["final"] <= 1.0
    assert math.isfinite(row["final_loss"]) and row["trainable_params"] > 0
    sweep = qc.run_job({**job, "stage": "sweep", "early_step": 0})
    assert "early" not in sweep and 0.0 <= sweep["final"] <= 1.0
