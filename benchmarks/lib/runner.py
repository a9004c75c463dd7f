"""The benchmarks' training protocol: a plain loop over riemix's seeded batches.

Why not ``riemix.training.recipe.train_step``: the benchmark protocol is deliberately plainer than the
recipe (one micro-batch per step, no Accelerate, no regularisers or progress schedules, the same loop for
PEFT and riemix candidates, and a divergence is recorded rather than raised), so the loop stays here; its
pieces (``batch_at``, ``collate``, ``linear_schedule``) are riemix's own, so both see the same batches in
the same order under the same learning-rate schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from riemix.core.schedules import linear_schedule
from riemix.training.data import batch_at, collate

__all__ = ["LoopResult", "batch_source", "train_loop"]


def batch_source(
    items: list, tokenizer, model_kind: str, max_length: int, batch_size: int, seed: int
) -> Callable[[int], dict[str, torch.Tensor]]:
    """``step -> batch``: the recipe's micro-batch ``step`` (single process, no accumulation), collated."""

    def batch(step: int) -> dict[str, torch.Tensor]:
        return collate(batch_at(items, step, batch_size, seed), tokenizer, model_kind, max_length)

    return batch


@dataclass
class LoopResult:
    """What :func:`train_loop` did.

    Attributes:
        losses: training loss of every step taken.
        train_seconds: time in forward, backward and optimizer steps (batch assembly excluded).
        diverged_at: index of the step whose loss was NaN/inf (the loop stopped there), else ``None``.
    """

    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    diverged_at: int | None = None


def train_loop(
    task_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_at: Callable[[int], Any],
    steps: int,
    after_step: Callable[[int], None] | None = None,
) -> LoopResult:
    """``steps`` optimizer steps with a linear decay to 0 (no warm-up), the benchmarks' shared protocol.

    Each step: ``loss = task_model(batch_at(step))``, backward, ``optimizer.step()``, schedule step,
    ``zero_grad(set_to_none=True)``. A non-finite loss stops the loop (``diverged_at``); otherwise
    ``after_step(step)`` runs after each step (e.g. an evaluation at an early checkpoint). The model is
    put in train mode first; what ``after_step`` changes (eval mode) it must restore.

    Args:
        task_model: module returning a scalar loss for a batch.
        optimizer: its optimizer (any torch.optim contract optimizer).
        batch_at: the batch of step ``i`` (e.g. :func:`batch_source`).
        steps: number of steps (also the schedule's length).
        after_step: optional callback with the finished step's index.

    Returns:
        The per-step losses, the training time and the divergence step, if any.
    """
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(0, steps))
    result = LoopResult()
    task_model.train()
    for step in range(steps):
        batch = batch_at(step)
        t0 = time.time()
        loss = task_model(batch)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.train_seconds += time.time() - t0
        result.losses.append(loss.item())
        if not math.isfinite(result.losses[-1]):
            result.diverged_at = step
            break
        if after_step is not None:
            after_step(step)
    return result
