"""Scores of a run (primary metric, per-example hits, the majority baseline), timing medians, a table cell."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from riemix.metrics import compute_metrics

__all__ = ["hits_string", "majority_baseline", "medians", "pct", "primary_score"]


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """``name -> median`` of each candidate's timings (the figure the speed benchmarks report)."""
    return {name: statistics.median(t) for name, t in times.items()}


def pct(entry: dict[str, Any], point: str) -> str:
    """``entry[point]`` as a percentage with ``± entry[point + "_std"]`` when there is one; "-" if absent."""
    if point not in entry:
        return "-"
    std = entry.get(f"{point}_std")
    return f"{100 * entry[point]:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def hits_string(preds, targets) -> str:
    """Per-example correctness as a compact string: ``"1"`` where ``preds[i] == targets[i]``, else ``"0"``."""
    return "".join("1" if int(p) == int(t) else "0" for p, t in zip(preds, targets, strict=True))


def primary_score(metric: str, preds, targets) -> float:
    """The task's primary score (``metric``'s own key, else the first one ``compute_metrics`` reports)."""
    metrics = compute_metrics(metric, preds, targets)
    return metrics[metric] if metric in metrics else next(iter(metrics.values()))


def majority_baseline(dataset) -> float | None:
    """Primary metric of always predicting the most frequent label of ``dataset`` (classification only).

    A trained candidate that scores this has learned nothing usable: it predicts one class.
    """
    if dataset.task != "classification":
        return None
    targets = dataset.targets()
    top = Counter(int(t) for t in targets).most_common(1)[0][0]
    return primary_score(dataset.metric, [top] * len(targets), targets)
