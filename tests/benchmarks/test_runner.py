"""benchmarks/lib/runner.py: the benchmarks' training loop against a hand-written SGD reference."""

from __future__ import annotations

import pytest
import torch
from lib import runner


class _Quadratic(torch.nn.Module):
    """loss = (w - batch)^2 for a scalar weight: the plain SGD reference is easy to write by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return (self.w - batch) ** 2


def test_train_loop_is_sgd_with_linear_decay_and_calls_after_step():
    model, targets, steps, lr = _Quadratic(), [1.0, 2.0, -1.0, 0.5], 4, 0.1
    seen = []
    loop = runner.train_loop(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        lambda i: torch.tensor(targets[i], dtype=torch.float64),
        steps,
        after_step=seen.append,
    )
    w, losses = 0.0, []
    for i, t in enumerate(targets):  # reference: lr * (steps - i) / steps, the decay to 0 without warm-up
        losses.append((w - t) ** 2)
        w -= lr * (steps - i) / steps * 2 * (w - t)
    assert seen == [0, 1, 2, 3] and loop.diverged_at is None
    assert loop.losses == pytest.approx(losses, rel=1e-12)
    assert model.w.item() == pytest.approx(w, rel=1e-12)
    assert model.training and loop.train_seconds >= 0.0


def test_train_loop_stops_at_a_non_finite_loss():
    model = _Quadratic()
    batches = [torch.tensor(1.0, dtype=torch.float64), torch.tensor(float("inf"), dtype=torch.float64)]
    seen = []
    loop = runner.train_loop(
        model, torch.optim.SGD(model.parameters(), lr=0.1), batches.__getitem__, 5, after_step=seen.append
    )
    assert loop.diverged_at == 1 and len(loop.losses) == 2 and seen == [0]
