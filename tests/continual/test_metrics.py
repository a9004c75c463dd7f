"""The continual-learning metrics against the protocol's formulas written out by hand."""

import pytest

from riemix.continual.metrics import cl_metrics

# R[k][i]: accuracy on task i after task k (0-based); None: not evaluated
MATRIX = [
    [0.9, 0.4, None],
    [0.7, 0.8, 0.5],
    [0.6, 0.7, 0.95],
]
ZERO = [0.1, 0.3, 0.2]


def test_the_four_metrics_follow_the_protocol():
    got = cl_metrics(MATRIX, ZERO)
    assert got["avg"] == pytest.approx((0.6 + 0.7 + 0.95) / 3)
    assert got["avg_incremental"] == pytest.approx((0.9 + (0.7 + 0.8) / 2 + (0.6 + 0.7 + 0.95) / 3) / 3)
    assert got["bwt"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert got["fwt"] == pytest.approx(((0.4 - 0.3) + (0.5 - 0.2)) / 2)


def test_one_task_has_no_transfer():
    assert cl_metrics([[0.5]], [0.2]) == {"avg": 0.5, "avg_incremental": 0.5, "bwt": 0.0, "fwt": 0.0}


def test_a_missing_entry_is_named():
    with pytest.raises(ValueError, match=r"no entry \[1\]\[2\] \(task 3 after task 2\)"):
        cl_metrics([[0.9, 0.4, None], [0.7, 0.8, None], [0.6, 0.7, 0.95]], ZERO)


def test_too_few_zero_shot_entries_are_refused():
    with pytest.raises(ValueError, match="zero_shot has 2 entries for 3 tasks"):
        cl_metrics(MATRIX, ZERO[:2])
