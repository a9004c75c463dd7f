"""benchmarks/report.py: paired tests, noise verdicts and the tables and sentences of the quality report."""

from __future__ import annotations

import math

import pytest
import report

from tests.helpers import result_row


def _mcnemar_reference(b: int, c: int) -> float:
    """Two-sided exact binomial test of b successes in b + c fair-coin flips, summed over all outcomes."""
    n = b + c
    probs = [math.comb(n, i) * 0.5**n for i in range(n + 1)]
    return min(1.0, sum(q for q in probs if q <= probs[b] * (1 + 1e-12)))


@pytest.mark.parametrize("only_a,only_b,both", [(5, 0, 3), (7, 2, 10), (4, 4, 1), (0, 0, 6), (1, 12, 0)])
def test_mcnemar_p_matches_exact_binomial_reference(only_a, only_b, both):
    hits_a = "1" * only_a + "0" * only_b + "1" * both + "00"
    hits_b = "0" * only_a + "1" * only_b + "1" * both + "00"
    assert report.mcnemar_p(hits_a, hits_b) == pytest.approx(_mcnemar_reference(only_a, only_b))
    assert report.mcnemar_p(hits_b, hits_a) == pytest.approx(report.mcnemar_p(hits_a, hits_b))


def test_mcnemar_p_hand_values_and_length_error():
    assert report.mcnemar_p("11111", "00000") == pytest.approx(2 / 32)  # 5 vs 0 discordant
    assert report.mcnemar_p("1100", "1100") == 1.0
    with pytest.raises(ValueError, match="hits differ in length: 3 vs 2"):
        report.mcnemar_p("110", "11")


def test_paired_p_uses_final_runs_at_the_reported_lr_and_shared_seeds():
    runs = [
        {**result_row("final", "a", 1e-3, 0, 0.5), "final_hits": "11110"},
        {**result_row("final", "a", 1e-3, 1, 0.5), "final_hits": "10000"},
        {**result_row("final", "a", 3e-3, 0, 0.5), "final_hits": "00000"},  # not at the reported lr
        {**result_row("final", "b", 1e-2, 0, 0.5), "final_hits": "00000"},
    ]
    rec = {"runs": runs, "summary": {"a": {"lr": 1e-3}, "b": {"lr": 1e-2}}}
    assert report._paired_p(rec, "a", "b") == [pytest.approx(2 * 1 / 16)]


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


def test_difference_of_correlations_uses_the_correlation_standard_error():
    a = {"seeds": [0], "final_all": [-0.02], "final": -0.02}  # negative scores must not break the noise
    b = {"seeds": [0], "final_all": [0.06], "final": 0.06}
    mean, noise, within = report._difference(a, b, n=250, metric="pearson_spearman")
    r = (-0.02 + 0.06) / 2
    assert mean == pytest.approx(-0.08)
    assert noise == pytest.approx(math.sqrt(2) * (1 - r * r) / math.sqrt(249))
    assert within is True


def test_quality_overview_rows_and_gated_tally():
    def rec(task, summary, majority=None):
        args = {"task": task, "model": "m", "format": "cloze", "steps": 9, "eval_subset": 1000}
        summary = {c: {"final": v, "final_all": [v], "seeds": [0]} for c, v in summary.items()}
        return {"args": args, "formulation": "cloze", "summary": summary, "majority_baseline": majority}

    records = {
        "quality_m_t1_cloze.json": rec("t1", {"rsgd": 0.50, "grsgd_p0.5": 0.60, "radamw": 0.7}, majority=0.55),
        "quality_m_t2_cloze.json": rec("t2", {"rsgd": 0.50, "grsgd_p0.5": 0.49, "gradamw_p0": 0.9, "grsgd_p0": 0.5}),
    }
    lines = report.quality_overview(records)
    header = "| task (formulation), model, steps | majority | rsgd | grsgd_p0.5 | grsgd_p0 | radamw | gradamw_p0 |"
    assert lines[2] == header
    assert lines[4] == "| t1 (cloze), m, 9 steps | 55.0 | 50.0 | 60.0 | - | 70.0 | - |"
    assert lines[5] == "| t2 (cloze), m, 9 steps | - | 50.0 | 49.0 | 50.0 | - | 90.0 |"
    # t1: +10 points on n=1000 is beyond noise; t2: -1 point is not; grsgd_p0 ties; gradamw_p0 has no radamw
    assert lines[7] == (
        "Gate-rescaled candidate vs its p=1 base (same optimizer and task): "
        "1 better (1 beyond noise: t1 (cloze), m, 9 steps: grsgd_p0.5), 1 worse (0 beyond noise), 1 exactly equal."
    )


def test_report_says_when_a_sweep_could_not_choose():
    args = {
        "task": "glue/cola",
        "model": "m",
        "format": "cloze",
        "steps": 300,
        "batch_size": 16,
        "eval_subset": 250,
        "early_step": 100,
        "sweep_steps": 150,
        "sweep_subset": 200,
        "lr": {},
    }
    rec = {
        "args": args,
        "formulation": "head",
        "machine": {"platform": "p", "cpu_threads": 1, "torch": "t"},
        "date": "2026-11-22T00:00:00+00:00",
        "summary": {},
        "runs": [result_row("sweep", "rsgd", lr, 0, 0.0) for lr in (0.01, 0.03, 0.1)]
        + [result_row("sweep", "radamw", lr, 0, f) for lr, f in ((1e-3, 0.1), (3e-3, 0.2), (1e-2, 0.3))],
        "chosen_lr": {"rsgd": 0.01, "radamw": 0.01},
    }
    text = "\n".join(report.quality_section("x.json", rec))
    assert "rsgd 0.01 (every grid point tied, so the smallest was taken)" in text
    assert "radamw 0.01 (at the edge of its grid)" in text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("quality_m_glue_sst2_labelwords.json", "glue/sst2 (label words), m, 150 steps"),
        ("quality_m_glue_sst2_labelwords_150steps.json", "glue/sst2 (label words), m, 150 steps"),
        ("quality_m_glue_sst2_labelwords_rsgd_lr1e-3.json", "glue/sst2 (label words), m, 150 steps, rsgd lr1e-3"),
    ],
)
def test_quality_title_names_a_variant_file(name, expected):
    rec = {"args": {"task": "glue/sst2", "model": "m", "format": "cloze", "steps": 150}, "formulation": "labelwords"}
    assert report._quality_title(name, rec) == expected
    assert report._quality_title(name, rec, short=True) == expected.replace("label words", "labelwords")


def test_lr_source_finds_the_sweep_that_chose_fixed_learning_rates():
    def rec(task, model, lr, chosen, swept):
        runs = [result_row("sweep", "rsgd", 0.01, 0, 0.5)] if swept else []
        return {"args": {"task": task, "model": model, "steps": 9, "lr": lr}, "runs": runs, "chosen_lr": chosen}

    source = rec("a", "m", {}, {"rsgd": 0.01, "radamw": 1e-3}, swept=True)
    other_model = rec("b", "n", {}, {"rsgd": 0.03}, swept=True)
    fixed = rec("c", "m", {"rsgd": 0.01}, {"rsgd": 0.01}, swept=False)
    by_hand = rec("d", "m", {"rsgd": 0.03}, {"rsgd": 0.03}, swept=False)
    records = {"a": source, "b": other_model, "c": fixed, "d": by_hand}
    assert report._lr_source(fixed, records) == "chosen by the a sweep, 9-step protocol"
    assert report._lr_source(by_hand, records) == "set by hand, not chosen by a sweep"


def test_overview_marks_a_gated_candidate_at_another_lr_than_its_base():
    summary = {
        "rsgd": {"final": 0.40, "final_all": [0.40], "seeds": [0], "lr": 3e-3},
        "grsgd_p0.5_ownlr": {"final": 0.60, "final_all": [0.60], "seeds": [0], "lr": 1e-3},
    }
    args = {"task": "t", "model": "m", "format": "cloze", "steps": 9, "eval_subset": 1000}
    rec = {"args": args, "formulation": "cloze", "summary": summary, "majority_baseline": None}
    tally = report.quality_overview({"quality_m_t_cloze.json": rec})[-2]
    assert "1 better (1 beyond noise: t (cloze), m, 9 steps: grsgd_p0.5_ownlr (at another lr than its base))" in tally


def test_speed_sections_render_every_committed_speed_result(monkeypatch):
    """Each speed/memory JSON in benchmarks/results becomes its section, with its numbers and the old rows."""
    import lib.speed_sections as speed

    monkeypatch.setattr(speed, "bar", lambda *a, **k: None)  # no plots written by the test
    text = "\n".join(speed.speed_sections())
    layer = speed.load("layer_speed_float32.json")
    assert f"{layer['ratios']['riemix_over_base']:.2f}" in text
    for heading in ("## Layer:", "### The sparse path", "### Activation memory", "## Optimizer step", "## End to end"):
        assert heading in text
    before = speed.load("before_issue16/optimizer_speed.json")
    assert f"{before['ratios']['riemix_radamw_over_torch_adamw_fused']:.2f}" in text
