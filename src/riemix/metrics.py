"""Evaluation metrics: pure numpy functions returning Python floats.

Inputs are 1-D array-likes of equal, non-zero length (lists, numpy arrays, CPU tensors);
classification metrics compare discrete labels, correlation metrics take real values.

Conventions for degenerate inputs (no warnings are emitted):

* Empty inputs or inputs of different lengths raise ``ValueError``.
* :func:`f1` is 0.0 when there are no true positives (including when neither predictions nor
  labels contain the positive class).
* :func:`matthews_corrcoef` is 0.0 when predictions or labels are constant (the denominator is
  zero), as in scikit-learn.
* :func:`pearson` and :func:`spearman` are 0.0 when either input is constant (zero variance),
  rather than NaN; non-finite inputs raise ``ValueError``.

:func:`compute_metrics` maps a metric or GLUE task name to a ``dict`` of scores; for a metric
name ``m`` the result always contains key ``m`` (the primary score).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "accuracy",
    "f1",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "rankdata",
    "glue_metrics",
    "compute_metrics",
    "GLUE_TASKS",
    "GLUE_PRIMARY_METRIC",
    "METRIC_NAMES",
]

#: Primary metric per GLUE task (the key of :func:`glue_metrics` to report / select on).
GLUE_PRIMARY_METRIC: dict[str, str] = {
    "sst2": "accuracy",
    "cola": "matthews_corr",
    "mrpc": "f1",
    "stsb": "pearson_spearman",
    "rte": "accuracy",
    "wnli": "accuracy",
    "qnli": "accuracy",
    "mnli": "accuracy",
    "qqp": "f1",
}
GLUE_TASKS: tuple[str, ...] = tuple(GLUE_PRIMARY_METRIC)


def _pair(preds, labels, *, real: bool = False) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"expected 1-D inputs, got shapes {p.shape} and {y.shape}")
    if p.shape != y.shape:
        raise ValueError(f"length mismatch: {p.shape[0]} predictions vs {y.shape[0]} labels")
    if p.size == 0:
        raise ValueError("empty input: need at least one prediction")
    if real:
        p, y = p.astype(np.float64), y.astype(np.float64)
        if not (np.isfinite(p).all() and np.isfinite(y).all()):
            raise ValueError("non-finite values in input")
    return p, y


def accuracy(preds, labels) -> float:
    """Fraction of predictions equal to the labels.

    Raises:
        ValueError: On empty or mismatched inputs.
    """
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1(preds, labels) -> float:
    """Binary F1 of the positive class ``1``: ``2*TP / (2*TP + FP + FN)``; 0.0 if ``TP == 0``.

    Raises:
        ValueError: On empty or mismatched inputs.
    """
    p, y = _pair(preds, labels)
    p, y = p == 1, y == 1
    tp = int(np.sum(p & y))
    if tp == 0:
        return 0.0
    fp, fn = int(np.sum(p & ~y)), int(np.sum(~p & y))
    return 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin, 2004).

    With confusion matrix ``C`` (rows: labels, columns: predictions), ``t = C.sum(1)``,
    ``p = C.sum(0)``, ``c = trace(C)``, ``s = C.sum()``:
    ``MCC = (c*s - t.p) / sqrt((s^2 - p.p) * (s^2 - t.t))``; 0.0 when the denominator is 0.

    Raises:
        ValueError: On empty or mismatched inputs.
    """
    p, y = _pair(preds, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k, n = len(classes), len(y)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (inv[:n], inv[n:]), 1.0)
    t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    cov_yp = c * s - t_sum @ p_sum
    cov_pp = s * s - p_sum @ p_sum
    cov_yy = s * s - t_sum @ t_sum
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_pp * cov_yy))


def pearson(preds, labels) -> float:
    """Pearson correlation; 0.0 if either input is constant.

    Raises:
        ValueError: On empty, mismatched or non-finite inputs.
    """
    p, y = _pair(preds, labels, real=True)
    p, y = p - p.mean(), y - y.mean()
    denom = np.sqrt((p @ p) * (y @ y))
    if denom == 0:
        return 0.0
    return float(np.clip((p @ y) / denom, -1.0, 1.0))


def rankdata(x) -> np.ndarray:
    """Ranks starting at 1, ties receiving the average of the ranks they span.

    Example: ``rankdata([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]``.
    """
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(x))
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    dense = np.cumsum(new_group)[inv]  # 1-based group id of each element
    # group g occupies sorted positions bounds[g-1] .. bounds[g]-1 (0-based)
    bounds = np.r_[np.nonzero(new_group)[0], len(x)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(preds, labels) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties averaged).

    Raises:
        ValueError: On empty, mismatched or non-finite inputs.
    """
    p, y = _pair(preds, labels, real=True)
    return pearson(rankdata(p), rankdata(y))


def _normalize_task(task: str) -> str:
    key = task.strip().lower()
    if key.startswith("glue/"):
        key = key[5:]
    return key.replace("-", "").replace("_", "")


def glue_metrics(task: str, preds, labels) -> dict[str, float]:
    """Standard GLUE scores for ``task``.

    Args:
        task: GLUE task, e.g. ``"sst2"``, ``"SST-2"``, ``"glue/sts-b"`` (case, ``-``, ``_`` and a
            ``glue/`` prefix are ignored).
        preds: Predicted class indices, or scores for STS-B.
        labels: Gold class indices, or scores for STS-B.

    Returns:
        SST-2/RTE/WNLI/QNLI/MNLI: ``accuracy``; MRPC/QQP: ``accuracy`` and ``f1``; CoLA:
        ``matthews_corr``; STS-B: ``pearson``, ``spearman`` and their mean ``pearson_spearman``.

    Raises:
        ValueError: For an unknown task or invalid inputs.
    """
    key = _normalize_task(task)
    if key not in GLUE_PRIMARY_METRIC:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {', '.join(GLUE_TASKS)}")
    if key == "cola":
        return {"matthews_corr": matthews_corrcoef(preds, labels)}
    if key == "stsb":
        return _pearson_spearman(preds, labels)
    if key in ("mrpc", "qqp"):
        return {"accuracy": accuracy(preds, labels), "f1": f1(preds, labels)}
    return {"accuracy": accuracy(preds, labels)}


def _pearson_spearman(preds, labels) -> dict[str, float]:
    pr, sp = pearson(preds, labels), spearman(preds, labels)
    return {"pearson": pr, "spearman": sp, "pearson_spearman": (pr + sp) / 2}


_BY_METRIC: dict[str, Callable[..., dict[str, float]]] = {
    "accuracy": lambda p, y: {"accuracy": accuracy(p, y)},
    "f1": lambda p, y: {"accuracy": accuracy(p, y), "f1": f1(p, y)},
    "matthews_corr": lambda p, y: {"matthews_corr": matthews_corrcoef(p, y)},
    "pearson": lambda p, y: {"pearson": pearson(p, y)},
    "spearman": lambda p, y: {"spearman": spearman(p, y)},
    "pearson_spearman": _pearson_spearman,
}
_ALIASES = {
    "acc": "accuracy",
    "mcc": "matthews_corr",
    "matthews_corrcoef": "matthews_corr",
    "mcq": "accuracy",
    "classification": "accuracy",
    "regression": "pearson_spearman",
}
#: Names accepted by :func:`compute_metrics` besides GLUE task names.
METRIC_NAMES: tuple[str, ...] = tuple(_BY_METRIC) + tuple(_ALIASES)


def compute_metrics(name: str, preds, labels) -> dict[str, float]:
    """Compute the scores for a metric name, a task type or a GLUE task name.

    Args:
        name: A metric (``"accuracy"``, ``"f1"``, ``"matthews_corr"``, ``"pearson"``,
            ``"spearman"``, ``"pearson_spearman"``; aliases ``acc``, ``mcc``), a task type
            (``"mcq"``/``"classification"`` -> accuracy, ``"regression"`` -> pearson_spearman),
            or a GLUE task (see :func:`glue_metrics`). Typically ``dataset.metric``.
        preds: Predictions (class/answer indices or scores).
        labels: Gold labels, e.g. ``dataset.targets()``.

    Returns:
        Scores by name. For a metric name the dict contains that name as the primary key
        (``"f1"`` also reports ``"accuracy"``; ``"pearson_spearman"`` also ``"pearson"`` and
        ``"spearman"``).

    Raises:
        ValueError: For an unknown name (e.g. ``"loss"`` of SFT datasets) or invalid inputs.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _BY_METRIC:
        return _BY_METRIC[key](preds, labels)
    if _normalize_task(name) in GLUE_PRIMARY_METRIC:
        return glue_metrics(name, preds, labels)
    raise ValueError(
        f"unknown metric or task {name!r}; expected one of {', '.join(METRIC_NAMES)} "
        f"or a GLUE task ({', '.join(GLUE_TASKS)})"
    )
