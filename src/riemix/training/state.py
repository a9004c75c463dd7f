"""What a training run holds between steps (``TrainState``) and what one step reports (``StepResult``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from riemix.data import Dataset
from riemix.diagnostics.monitor import RoutingMonitor
from riemix.tasks import TaskSpec
from riemix.training.config import TrainConfig
from riemix.training.guard import DivergenceGuard
from riemix.training.logging import MetricsLogger
from riemix.training.rundir import RunDir

__all__ = ["StepResult", "TrainState"]


@dataclass
class TrainState:
    """Everything a run holds between steps (built by :func:`setup`).

    Attributes:
        cfg: the run's configuration.
        accel: the ``accelerate.Accelerator`` placing the model and batches.
        model: the adapted model (unwrapped: adapters, checkpoints and diagnostics read it).
        task_model: ``TaskModel`` around ``model`` as Accelerate prepared it (forward returns the loss).
        tokenizer: the model's tokenizer.
        specs: one ``TaskSpec`` per training dataset (they also present the evaluation datasets).
        eval_sets: the evaluation datasets.
        items: every encoded training item (``batch_at`` picks the micro-batches).
        optimizer: the optimizer (checkpoints hold its state).
        prepared_optimizer: the optimizer as Accelerate prepared it (it steps).
        scheduler: the learning-rate schedule.
        monitor: routing statistics of the current diagnostics window; None without diagnostics.
        out: the run directory.
        log: console printer (a no-op unless main process and ``verbose``).
        run: the opened, locked run directory (its run id goes into every checkpoint).
        guard: the per-step divergence checks.
        metrics: the ``metrics.jsonl`` / TensorBoard writer.
        start_step: the first step to take (> 0 after a resume).
        extra: what checkpoints carry besides tensors: ``best`` / ``bad_evals`` (early stopping) and
            ``before`` (the zero-shot metrics).
        tokens_seen: non-padding tokens trained on so far (this process).
        padded_seen: token slots trained on so far, padding included.
        trainable: the model's ``(name, parameter)`` pairs that train (set at construction).
        train_time: seconds spent in training steps.
        eval_time: seconds spent evaluating.
    """

    cfg: TrainConfig
    accel: Any
    model: torch.nn.Module
    task_model: torch.nn.Module
    tokenizer: Any
    specs: list[TaskSpec]
    eval_sets: list[Dataset]
    items: list
    optimizer: torch.optim.Optimizer
    prepared_optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    monitor: RoutingMonitor | None
    out: Path
    log: Callable[..., None]
    run: RunDir
    guard: DivergenceGuard
    metrics: MetricsLogger | None = None
    start_step: int = 0
    extra: dict[str, Any] = field(default_factory=lambda: {"best": None, "bad_evals": 0, "before": None})
    tokens_seen: int = 0
    padded_seen: int = 0
    train_time: float = 0.0
    eval_time: float = 0.0

    def __post_init__(self) -> None:
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes files."""
        return self.accel.is_main_process


@dataclass
class StepResult:
    """What one optimizer step reports.

    Attributes:
        loss: the task loss, averaged over the micro-batches.
        aux_logs: the unweighted regulariser terms of the last micro-batch.
        grad_norms: per-layer expert gradient norms before the update (diagnostics steps only, else None).
    """

    loss: float
    aux_logs: dict[str, float]
    grad_norms: dict[str, dict] | None = None
