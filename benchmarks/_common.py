"""Shared pieces of the benchmark scripts: the record header (date, machine) every result JSON carries, and
the plain training loop the quality benchmarks share."""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

__all__ = ["LoopResult", "pct", "record_header", "train_loop"]


def record_header(benchmark: str) -> dict[str, Any]:
    """``{"benchmark", "date", "machine"}`` for a result JSON (UTC date; platform, threads, torch)."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }


def pct(entry: dict[str, Any], point: str) -> str:
    """``entry[point]`` as a percentage with ``± entry[point + "_std"]`` when there is one; "-" if absent."""
    if point not in entry:
        return "-"
    std = entry.get(f"{point}_std")
    return f"{100 * entry[point]:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


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
        batch_at: the batch of step ``i``.
        steps: number of steps (also the schedule's length).
        after_step: optional callback with the finished step's index.

    Returns:
        The per-step losses, the training time and the divergence step, if any.
    """
    from riemix.training.recipe import linear_schedule

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
