"""benchmarks/lib/stats.py: hit strings and the majority-class baseline."""

from __future__ import annotations

import pytest
from lib import stats

from riemix.data import load_dataset
from tests.helpers import write_mcq


def test_hits_string_marks_correct_examples():
    assert stats.hits_string([0, 2, 1, 1], [0, 1, 1, 0]) == "1010"
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is shorter than argument 1"):
        stats.hits_string([0, 1], [0])


def test_majority_baseline_is_the_most_frequent_label_share():
    dev = load_dataset("glue/sst2", "dev").subset(50, seed=0)  # packaged with riemix
    targets = [int(t) for t in dev.targets()]
    share = max(targets.count(c) for c in set(targets)) / len(targets)
    assert stats.majority_baseline(dev) == pytest.approx(share)


def test_majority_baseline_is_none_for_multiple_choice(tmp_path):
    assert stats.majority_baseline(load_dataset(write_mcq(tmp_path / "mcq.jsonl", 10, 0), "dev")) is None
