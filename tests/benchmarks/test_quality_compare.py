"""benchmarks/quality_compare.py: learning-rate choice, seed summaries, protocol checks and one tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import quality_compare as qc

from tests.helpers import result_row, save_tiny_model_dir, write_mcq


def test_choose_lrs_best_held_out_ties_to_smaller_and_skips_diverged():
    rows = [
        result_row("sweep", "rsgd", 0.01, 0, 0.40),
        result_row("sweep", "rsgd", 0.03, 0, 0.40),  # tie: the smaller lr wins
        result_row("sweep", "rsgd", 0.1, 0, float("nan")),  # diverged: never chosen
        result_row("sweep", "adamw", 1e-3, 0, 0.30),
        result_row("sweep", "adamw", 3e-3, 0, 0.35),
        result_row("sweep", "grsgd_p0.5", 1.0, 0, 0.99),  # not a family's base member: ignored
        result_row("final", "adamw", 1e-2, 0, 0.99),  # final runs never choose
    ]
    assert qc.choose_lrs(rows) == {"rsgd": 0.01, "adamw": 3e-3}


def test_ownlr_candidates_are_their_own_family_with_their_own_sweep():
    assert qc.CANDIDATES["grsgd_p0_ownlr"] == ("grsgd_p0_ownlr", "rsgd", 0.0)
    assert qc.CANDIDATES["grsgd_p0.5_ownlr"][1:] == ("rsgd", 0.5)
    rows = [
        result_row("sweep", "rsgd", 3e-3, 0, 0.50),
        result_row("sweep", "grsgd_p0_ownlr", 3e-3, 0, 0.20),
        result_row("sweep", "grsgd_p0_ownlr", 1e-3, 0, 0.45),
    ]
    assert qc.choose_lrs(rows) == {"rsgd": 3e-3, "grsgd_p0_ownlr": 1e-3}
    rec = {"runs": [result_row("final", "grsgd_p0_ownlr", 1e-3, 0, 0.4)], "chosen_lr": qc.choose_lrs(rows)}
    assert qc.summarize(rec)["grsgd_p0_ownlr"]["lr"] == 1e-3


def test_summarize_mean_and_sample_std_over_seeds():
    rec = {
        "runs": [
            result_row("final", "rsgd", 0.01, 0, 0.50, 0.40),
            result_row("final", "rsgd", 0.01, 1, 0.60, 0.44),
            result_row("final", "zero_shot", 0.0, 0, 0.30),
            result_row("sweep", "rsgd", 0.01, 0, 0.99),
        ]
    }
    s = qc.summarize(rec)
    assert s["rsgd"]["final"] == pytest.approx(0.55)
    assert s["rsgd"]["final_std"] == pytest.approx(math.sqrt(((0.05**2) * 2) / 1))
    assert s["rsgd"]["early"] == pytest.approx(0.42)
    assert s["rsgd"]["seeds"] == [0, 1]
    assert s["zero_shot"]["final_std"] is None and "early" not in s["zero_shot"]
    rec["runs"].append(result_row("final", "grsgd_p0", 0.03, 0, 0.9))  # a run at a no-longer-chosen lr
    rec["runs"].append(result_row("final", "grsgd_p0", 0.01, 0, 0.2))
    rec["chosen_lr"] = {"rsgd": 0.01}
    s = qc.summarize(rec)
    assert s["grsgd_p0"]["final_all"] == [0.2] and s["rsgd"]["final"] == pytest.approx(0.55)


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
    for point in ("early", "final"):  # each score is the share of its hits over the 12 examples
        assert set(row[f"{point}_hits"]) <= {"0", "1"} and len(row[f"{point}_hits"]) == 12
        assert row[f"{point}_hits"].count("1") / 12 == pytest.approx(row[point])
    # tiny Llama, 2 blocks of q/k/v/o (in 32; out 32, 16, 16, 32): E·r·(in + out) factors per module for
    # both (PEFT gets rank E·r = 8), plus the MoE router's E·in = 128 per module
    factors = 2 * 4 * 2 * sum(32 + out for out in (32, 16, 16, 32))
    assert row["trainable_params"] == factors + (2 * 4 * 4 * 32 if candidate == "grsgd_p0" else 0)
    assert math.isfinite(row["final_loss"])
    sweep = qc.run_job({**job, "stage": "sweep", "early_step": 0})
    assert "early" not in sweep and sweep["trainable_params"] == row["trainable_params"]
    # a sweep scores the 10 % of the training file it held out (4 of 40), never the dev set
    assert len(sweep["final_hits"]) == 4 and sweep["final_hits"].count("1") / 4 == pytest.approx(sweep["final"])
