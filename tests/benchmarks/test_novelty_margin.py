"""benchmarks/novelty_margin.py: within- and between-task similarities and the errors counted per threshold."""

from __future__ import annotations

import novelty_margin
import pytest
import torch
from lib import continual_section


def _pools() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centre = {t: torch.randn(16, generator=g) for t in ("a", "b", "amazon", "yelp")}
    centre["yelp"] = centre["amazon"] + 0.01 * torch.randn(16, generator=g)  # one skill: not counted
    return {t: c + 0.3 * torch.randn(40, 16, generator=g) for t, c in centre.items()}  # (40, 16)


def test_margins_separate_tasks_and_count_errors_per_threshold():
    m = novelty_margin.margins(_pools(), n=8, draws=5, thresholds=[-1.0, 0.99, 1.0])
    assert set(m["within"]) == {"a", "b", "amazon", "yelp"} and len(m["between"]) == 6
    assert m["within_min"] > 0.9 > m["between_max"]  # amazon|yelp is left out of between_max
    assert m["between"]["amazon|yelp"]["mean"] > 0.9
    low, high = m["errors"]["-1.0000"], m["errors"]["1.0000"]
    assert low == {"same_task_called_novel": 0, "other_task_called_known": 25, "comparisons": (20, 25)}
    assert high["same_task_called_novel"] == 20 and high["other_task_called_known"] == 0


def test_the_centroid_is_the_normalised_mean():
    emb = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(novelty_margin.centroid(emb), torch.tensor([4.0, 2.0]) / 20**0.5)


def test_the_report_section_lists_errors_and_the_closest_pairs():
    m = novelty_margin.margins(_pools(), n=8, draws=5, thresholds=[0.5, 0.9, 0.95])
    rec = {
        "date": "2026-11-27T00:00:00",
        "machine": {"platform": "x", "cpu_threads": 2, "torch": "2"},
        "args": {"pool": 40, "tasks": "a,b,amazon,yelp", "draws": 5},
        "thresholds_k1_k3_k7": [0.5, 0.9, 0.95],
        "same_skill": [["amazon", "yelp"]],
        "by_samples": {"8": m},
    }
    text = "\n".join(continual_section.novelty_margin_section(rec))
    assert "out of 20 / 25 comparisons" in text and "| 8 |" in text
    assert "amazon–yelp" not in text.split("Closest")[1]


def test_the_pool_must_hold_two_disjoint_samples(monkeypatch):
    monkeypatch.setattr("sys.argv", ["novelty_margin.py", "--samples", "300", "--pool", "512"])
    with pytest.raises(SystemExit, match="--pool 512 is too small for two disjoint samples of 300"):
        novelty_margin.main()
