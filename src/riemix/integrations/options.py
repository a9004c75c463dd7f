"""What riemix adds to a ``transformers.Trainer`` run: ``RiemixOptions`` and ``riemix_optimizer``.

``RiemixOptions`` holds the riemix parts of a training run that ``TrainingArguments`` has no field for (the
regularisers and their mode, the diagnostics period, the optimizer name and its router / LoRA+ groups), with
the CLI's defaults (``riemix.training.config.TrainConfig``).  ``riemix_optimizer`` builds the riemix optimizer
and learning-rate schedule for ``Trainer(optimizers=...)``.  Neither imports ``transformers``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from riemix.core.config import REGULARIZER_MODES
from riemix.core.regularizers import REGULARIZERS
from riemix.core.schedules import linear_schedule
from riemix.optim import OPTIMIZER_NAMES, build_optimizer

__all__ = ["LR_SCHEDULES", "RiemixOptions", "riemix_optimizer"]

#: Learning-rate schedules of ``riemix_optimizer`` (``riemix.core.schedules.linear_schedule``): after the
#: linear warm-up, a linear decay to 0 at ``max_steps`` or a constant rate.
LR_SCHEDULES: tuple[str, ...] = ("linear", "constant")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RiemixOptions:
    """The riemix options of a ``RiemixTrainer`` run (``TrainingArguments`` keeps everything else).

    Attributes:
        regularizers: ``{name: coefficient}`` for names in ``riemix.core.regularizers.REGULARIZERS``
            (``load_balance``, ``z_loss``, ``uniform_prior``, ``diversity``, ``orthogonality``; >= 0, 0: off).
        regularizer_mode: ``"loss"`` (added to the task loss in ``compute_loss``) or ``"inject"`` (their
            gradients go straight to ``.grad``: router statistics to the routers, parameter losses to A and B).
        diagnostics_every: Routing / expert diagnostics every this many optimizer steps (0: never), logged
            through ``Trainer.log`` (``diag/*``) and written in full to ``<output_dir>/diagnostics.json``.
        optimizer: The optimizer ``create_optimizer`` builds when none is passed: one of
            ``riemix.optim.OPTIMIZER_NAMES`` (``radamw``, ``rsgd``: Riemannian preconditioned; ``adamw``,
            ``sgd``: plain); its lr, weight decay and betas come from ``TrainingArguments``.
        gate_lr: Learning rate of the router group (>= 0); None: the learning rate.
        loraplus_ratio: LoRA+ multiplier of the B learning rate (> 0; 1: plain).
        reg: Ridge term of the Riemannian preconditioner (>= 0).
        gate_max_grad_norm: Gradient-norm clip of the router group (> 0); None: no clipping.
    """

    regularizers: Mapping[str, float] = field(default_factory=dict)
    regularizer_mode: str = "loss"
    diagnostics_every: int = 0
    optimizer: str = "radamw"
    gate_lr: float | None = None
    loraplus_ratio: float = 1.0
    reg: float = 1e-6
    gate_max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.regularizers, Mapping):
            raise ValueError(f"regularizers must be a mapping {{name: coefficient}}, got {self.regularizers!r}")
        unknown = sorted(set(self.regularizers) - set(REGULARIZERS))
        if unknown:
            raise ValueError(f"unknown regulariser(s) {unknown}; valid: {list(REGULARIZERS)}")
        for name, coef in self.regularizers.items():
            if not _is_number(coef) or coef < 0:
                raise ValueError(f"regularizers[{name!r}] must be a finite number >= 0, got {coef!r}")
        object.__setattr__(self, "regularizers", {k: float(v) for k, v in self.regularizers.items()})
        if self.regularizer_mode not in REGULARIZER_MODES:
            raise ValueError(f"regularizer_mode must be one of {REGULARIZER_MODES}, got {self.regularizer_mode!r}")
        if not _is_int(self.diagnostics_every) or self.diagnostics_every < 0:
            raise ValueError(f"diagnostics_every must be an int >= 0, got {self.diagnostics_every!r}")
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES}, got {self.optimizer!r}")
        if self.gate_lr is not None and (not _is_number(self.gate_lr) or self.gate_lr < 0):
            raise ValueError(f"gate_lr must be a finite number >= 0 or None, got {self.gate_lr!r}")
        if not _is_number(self.loraplus_ratio) or self.loraplus_ratio <= 0:
            raise ValueError(f"loraplus_ratio must be a finite number > 0, got {self.loraplus_ratio!r}")
        if not _is_number(self.reg) or self.reg < 0:
            raise ValueError(f"reg must be a finite number >= 0, got {self.reg!r}")
        if self.gate_max_grad_norm is not None and (
            not _is_number(self.gate_max_grad_norm) or self.gate_max_grad_norm <= 0
        ):
            raise ValueError(f"gate_max_grad_norm must be a finite number > 0 or None, got {self.gate_max_grad_norm!r}")

    def coefs(self) -> dict[str, float]:
        """``{name: coefficient}`` of every regulariser (0 where off), as ``apply_regularizers`` takes them."""
        return {name: self.regularizers.get(name, 0.0) for name in REGULARIZERS}


def riemix_optimizer(
    model: nn.Module,
    lr: float,
    max_steps: int,
    optimizer: str = "radamw",
    gate_lr: float | None = None,
    loraplus_ratio: float = 1.0,
    weight_decay: float = 0.0,
    reg: float = 1e-6,
    gate_max_grad_norm: float | None = 1.0,
    warmup_steps: int = 0,
    schedule: str = "linear",
    **kwargs: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The riemix optimizer and learning-rate schedule of a model, for ``Trainer(optimizers=...)``.

    The optimizer is ``riemix.build_optimizer`` (param groups ``lora_A``, ``lora_B`` at ``lr *
    loraplus_ratio``, ``router`` at ``gate_lr`` with its own clip, ``other``); the schedule is riemix's
    (``linear_schedule``: linear warm-up, then linear decay to 0 at ``max_steps`` or constant), stepped once
    per optimizer step as ``Trainer`` does.  Its defaults are the CLI's (``riemix train``).

    Args:
        model: A model carrying MoE-LoRA adapters.
        lr: Base learning rate (>= 0).
        max_steps: Optimizer steps of the run (int >= 1; where the linear decay reaches 0).
        optimizer: One of ``riemix.optim.OPTIMIZER_NAMES``.
        gate_lr: Router learning rate; None: ``lr``.
        loraplus_ratio: LoRA+ multiplier of the B learning rate (> 0).
        weight_decay: Weight decay of every group.
        reg: Ridge term of the Riemannian preconditioner.
        gate_max_grad_norm: Gradient-norm clip of the router group (None: none).
        warmup_steps: Steps of linear learning-rate warm-up (int >= 0).
        schedule: One of ``LR_SCHEDULES``.
        **kwargs: Further options of ``riemix.build_optimizer`` (``betas``, ``eps``, ``momentum`` ...).

    Returns:
        ``(optimizer, scheduler)``.

    Raises:
        ValueError: ``max_steps``, ``warmup_steps`` or ``schedule`` out of range, or what ``build_optimizer``
            refuses (unknown name, bad learning rates, a model without adapters).
    """
    if not _is_int(max_steps) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    opt = build_optimizer(
        model,
        optimizer,
        lr=lr,
        gate_lr=gate_lr,
        reg=reg,
        weight_decay=weight_decay,
        loraplus_ratio=loraplus_ratio,
        gate_max_grad_norm=gate_max_grad_norm,
        **kwargs,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(warmup_steps, max_steps, schedule))
