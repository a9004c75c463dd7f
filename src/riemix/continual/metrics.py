"""Continual-learning metrics of an accuracy matrix (the O-LoRA protocol; docs/continual.md).

``matrix[k][i]`` is the accuracy on task ``i``'s test split after training task ``k`` (0-based; None where
not evaluated) and ``zero_shot[i]`` the accuracy of the untrained model.  With N tasks, in the 1-based
notation of the protocol (R[0] = the untrained model):

- Avg = (1/N) Σᵢ R[N][i]
- average incremental accuracy = (1/N) Σₖ (1/k) Σ_{i≤k} R[k][i]
- BWT = (1/(N−1)) Σ_{i<N} (R[N][i] − R[i][i])          (negative = forgetting)
- FWT = (1/(N−1)) Σ_{i>1} (R[i−1][i] − R[0][i])
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["average_accuracy", "average_incremental_accuracy", "backward_transfer", "cl_metrics", "forward_transfer"]

Matrix = Sequence[Sequence[float | None]]


def _entry(matrix: Matrix, k: int, i: int) -> float:
    value = matrix[k][i] if k < len(matrix) and i < len(matrix[k]) else None
    if value is None:
        raise ValueError(f"accuracy matrix has no entry [{k}][{i}] (task {i + 1} after task {k + 1})")
    return float(value)


def average_accuracy(matrix: Matrix) -> float:
    """Avg: the mean accuracy over every task after the last one."""
    n = len(matrix)
    return sum(_entry(matrix, n - 1, i) for i in range(n)) / n


def average_incremental_accuracy(matrix: Matrix) -> float:
    """The mean over tasks k of the mean accuracy on tasks 1..k after task k."""
    n = len(matrix)
    return sum(sum(_entry(matrix, k, i) for i in range(k + 1)) / (k + 1) for k in range(n)) / n


def backward_transfer(matrix: Matrix) -> float:
    """BWT: mean change of each earlier task's accuracy from just after it to after the last task (0 for one task)."""
    n = len(matrix)
    if n < 2:
        return 0.0
    return sum(_entry(matrix, n - 1, i) - _entry(matrix, i, i) for i in range(n - 1)) / (n - 1)


def forward_transfer(matrix: Matrix, zero_shot: Sequence[float]) -> float:
    """FWT: mean gain on each later task, before training it, over the untrained model (0 for one task)."""
    n = len(matrix)
    if n < 2:
        return 0.0
    if len(zero_shot) < n:
        raise ValueError(f"zero_shot has {len(zero_shot)} entries for {n} tasks")
    return sum(_entry(matrix, i - 1, i) - float(zero_shot[i]) for i in range(1, n)) / (n - 1)


def cl_metrics(matrix: Matrix, zero_shot: Sequence[float]) -> dict[str, float]:
    """``{"avg", "avg_incremental", "bwt", "fwt"}`` of a complete N×N accuracy matrix (N = ``len(matrix)``).

    Raises:
        ValueError: a needed entry is missing (None), naming it.
    """
    return {
        "avg": average_accuracy(matrix),
        "avg_incremental": average_incremental_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix, zero_shot),
    }
