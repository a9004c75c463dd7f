"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from riemix.metrics import (
    GLUE_PRIMARY_METRIC,
    accuracy,
    compute_metrics,
    f1,
    glue_metrics,
    matthews_corrcoef,
    pearson,
    rankdata,
    spearman,
)

# Binary example used below (positive class = 1):
#   preds  = [1, 1, 0, 0, 1]
#   labels = [1, 0, 1, 0, 1]
#   index:    TP FP FN TN TP   ->  TP=2, FP=1, FN=1, TN=1
#
#                  pred 1   pred 0
#   label 1          2        1      (TP, FN)
#   label 0          1        1      (FP, TN)
PREDS = [1, 1, 0, 0, 1]
LABELS = [1, 0, 1, 0, 1]


def test_accuracy():
    # matches at positions 0, 2 -> 2/4
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # positions 0, 3, 4 match -> 3/5
    assert accuracy(PREDS, LABELS) == pytest.approx(3 / 5)
    assert accuracy(np.array([2, 2]), np.array([2, 2])) == 1.0
    for fn in (accuracy, f1, matthews_corrcoef, pearson, spearman):  # plain floats, not NumPy scalars
        assert type(fn(np.array(PREDS), np.array(LABELS))) is float, fn.__name__


def test_f1_binary():
    # F1 = 2TP / (2TP + FP + FN) = 4 / (4 + 1 + 1) = 2/3
    assert f1(PREDS, LABELS) == pytest.approx(2 / 3)
    # precision 1/1, recall 1/2 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert f1([1, 0, 0], [1, 1, 0]) == pytest.approx(2 / 3)
    assert f1([1, 1], [1, 1]) == 1.0


def test_f1_no_true_positives_is_zero():
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positives anywhere
    assert f1([1, 1, 0], [0, 0, 1]) == 0.0  # TP = 0


def test_mcc_binary_hand_computed():
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #     = (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1 / 6
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx(1 / 6)
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


def test_mcc_multiclass_hand_computed():
    # labels [0,1,1,2], preds [0,1,2,2]; confusion C (rows = labels, cols = preds):
    #   [[1,0,0],[0,1,1],[0,0,1]]; t = [1,2,1], p = [1,1,2], c = 3, s = 4
    #   cov_yp = 3*4 - (1*1 + 2*1 + 1*2) = 7; s^2 - p.p = 16 - 6 = 10; s^2 - t.t = 16 - 6 = 10
    #   MCC = 7 / sqrt(10 * 10) = 0.7
    assert matthews_corrcoef([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.7)


def test_mcc_arbitrary_label_values():
    # same as the binary example with 0 -> -1 and 1 -> 7: MCC is label-invariant -> 1/6
    p = [7 if v else -1 for v in PREDS]
    y = [7 if v else -1 for v in LABELS]
    assert matthews_corrcoef(p, y) == pytest.approx(1 / 6)


def test_mcc_constant_is_zero():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # constant labels
    assert matthews_corrcoef([1, 1], [1, 1]) == 0.0


def test_pearson_hand_computed():
    # x - mean = [-1.5, -0.5, 0.5, 1.5], y - mean = [-1.5, 0.5, -0.5, 1.5]
    # sum(dx*dy) = 2.25 - 0.25 - 0.25 + 2.25 = 4; sum(dx^2) = sum(dy^2) = 5 -> r = 4/5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_constant_is_zero():
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert pearson([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0
    assert pearson([1.0], [1.0]) == 0.0  # single point: zero variance


def test_rankdata_average_ties():
    assert rankdata([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    # sorted [1,3,3,3]: the 3s take ranks 2,3,4 -> average 3
    assert rankdata([3, 1, 3, 3]).tolist() == [3.0, 1.0, 3.0, 3.0]
    assert rankdata([5.0, 4.0, 3.0]).tolist() == [3.0, 2.0, 1.0]


def test_spearman_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1, 2, 3, 4], both mean 2.5
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, -0.5, 0.5, 1.5]
    # sum(dx*dy) = 4.5, sum(dx^2) = 4.5, sum(dy^2) = 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))


def test_spearman_monotone_and_constant():
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [10, 0, -5, -7]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0  # all tied -> constant ranks


@pytest.mark.parametrize("fn", [accuracy, f1, matthews_corrcoef, pearson, spearman])
def test_invalid_inputs(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="mismatch"):
        fn([1, 0], [1])
    with pytest.raises(ValueError, match="1-D"):
        fn([[1, 0]], [[1, 0]])


def test_non_finite_rejected_for_correlations():
    with pytest.raises(ValueError, match="non-finite"):
        pearson([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        spearman([1.0, 2.0], [float("inf"), 2.0])


def test_glue_metrics_keys_and_values():
    assert glue_metrics("sst2", PREDS, LABELS) == {"accuracy": pytest.approx(0.6)}
    for task in ("rte", "WNLI", "glue/QNLI"):
        assert set(glue_metrics(task, PREDS, LABELS)) == {"accuracy"}
    assert glue_metrics("MRPC", PREDS, LABELS) == {"accuracy": pytest.approx(0.6), "f1": pytest.approx(2 / 3)}
    assert glue_metrics("glue/CoLA", PREDS, LABELS) == {"matthews_corr": pytest.approx(1 / 6)}
    # x = [1,2,3,4], y = [1,4,9,16]: dy = [-6.5,-3.5,1.5,8.5], sum(dx*dy) = 25, sum(dx^2) = 5,
    # sum(dy^2) = 129 -> pearson = 25 / sqrt(645); spearman = 1 (monotone)
    r = 25 / math.sqrt(645)
    out = glue_metrics("STS-B", [1, 2, 3, 4], [1, 4, 9, 16])
    assert out == {
        "pearson": pytest.approx(r),
        "spearman": pytest.approx(1.0),
        "pearson_spearman": pytest.approx((r + 1) / 2),
    }
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("squad", [1], [1])


def test_glue_primary_metric_is_returned():
    for task, primary in GLUE_PRIMARY_METRIC.items():
        preds, labels = ([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) if task == "stsb" else (PREDS, LABELS)
        assert primary in glue_metrics(task, preds, labels)


def test_compute_metrics_names():
    assert compute_metrics("accuracy", PREDS, LABELS) == {"accuracy": pytest.approx(0.6)}
    assert compute_metrics("acc", PREDS, LABELS)["accuracy"] == pytest.approx(0.6)
    assert compute_metrics("f1", PREDS, LABELS)["f1"] == pytest.approx(2 / 3)
    assert compute_metrics("mcc", PREDS, LABELS) == {"matthews_corr": pytest.approx(1 / 6)}
    assert compute_metrics("matthews_corr", PREDS, LABELS)["matthews_corr"] == pytest.approx(1 / 6)
    assert compute_metrics("pearson", [1, 2, 3, 4], [1, 3, 2, 4]) == {"pearson": pytest.approx(0.8)}
    sp = compute_metrics("spearman", [1, 2, 2, 3], [1, 2, 3, 4])
    assert sp == {"spearman": pytest.approx(math.sqrt(0.9))}
    ps = compute_metrics("pearson_spearman", [1, 2, 3, 4], [1, 3, 2, 4])
    assert ps["pearson_spearman"] == pytest.approx(0.8)
    assert compute_metrics("mcq", [0, 3], [0, 2]) == {"accuracy": 0.5}
    assert "pearson_spearman" in compute_metrics("regression", [1.0, 2.0], [1.0, 2.0])
    assert compute_metrics("glue/mrpc", PREDS, LABELS)["f1"] == pytest.approx(2 / 3)
    assert compute_metrics("CoLA", PREDS, LABELS) == {"matthews_corr": pytest.approx(1 / 6)}


def test_compute_metrics_unknown():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics("loss", [1], [1])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics("bleu", [1], [1])
