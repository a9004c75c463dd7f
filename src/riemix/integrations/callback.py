"""``RiemixCallback``: riemix's per-step schedules and diagnostics in any ``transformers.Trainer`` loop.

What ``riemix.training.recipe.train_step`` does around the optimizer step, as ``TrainerCallback`` events:

- ``on_train_begin`` / ``on_step_end``: ``set_training_progress(model, global_step, max_steps)``, the scale
  warm-up factor and the router temperature as a function of the optimizer step (so a resumed run goes on
  exactly); without it a ``scale_warmup_steps`` adapter keeps ``scale_factor = 0`` and trains nothing;
- with ``diagnostics_every``: a forward hook feeds a ``RoutingMonitor`` from every training forward, the
  expert gradient norms are read before the optimizer step, and every ``diagnostics_every`` steps
  ``collect_diagnostics`` closes the window: a flat summary (``diag/*``) for ``Trainer.log`` and the full
  per-layer record in ``<output_dir>/diagnostics.json``, as the CLI writes it.

``RiemixTrainer`` adds one itself and logs its values through ``Trainer.log``; added to a plain ``Trainer``,
its values are merged into the logs every ``on_log`` sees (``trainer.state.log_history`` and the callbacks
after it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from riemix.core.schedules import advance_maturity, set_training_progress
from riemix.core.tuner import iter_moe_lora_layers, set_record_routing
from riemix.diagnostics.monitor import RoutingMonitor, collect_diagnostics, model_grad_norms
from riemix.integrations.save import is_save_protected
from riemix.io.fileio import atomic_write_json

__all__ = ["DIAGNOSTICS_NAME", "RiemixCallback", "flat_diagnostics"]

#: The full diagnostics of the last window, in ``TrainingArguments.output_dir``.
DIAGNOSTICS_NAME = "diagnostics.json"
_OVERALL = ("entropy", "usage_entropy", "load_cv", "dead_experts", "similar_pairs", "effective_rank_mean", "grad_norm")


def flat_diagnostics(diagnostics: dict) -> dict[str, float]:
    """The model-wide numbers of ``collect_diagnostics`` output as scalar logs ``diag/<name>``.

    Args:
        diagnostics: ``riemix.diagnostics.monitor.collect_diagnostics`` output.

    Returns:
        ``{"diag/entropy", "diag/usage_entropy", "diag/load_cv", "diag/dead_experts", "diag/similar_pairs",
        "diag/effective_rank_mean", "diag/grad_norm"}``, those present (see docs/diagnostics.md).
    """
    overall = diagnostics.get("overall", {})
    return {f"diag/{key}": float(overall[key]) for key in _OVERALL if key in overall}


def _adapted(model: nn.Module | None) -> nn.Module:
    if model is None or next(iter_moe_lora_layers(model), None) is None:
        raise ValueError(
            f"RiemixCallback needs a model carrying MoE-LoRA adapters, got {type(model).__name__}; call "
            "riemix.add_moe_lora(model, config) before building the Trainer"
        )
    return model


class RiemixCallback(TrainerCallback):
    """Advances riemix's schedules every optimizer step and collects routing / expert diagnostics.

    Args:
        diagnostics_every: Close a diagnostics window every this many optimizer steps (int >= 0; 0: never).

    Attributes:
        last_diagnostics: The full ``collect_diagnostics`` record of the last window (None before).

    Raises:
        ValueError: ``diagnostics_every`` not an int >= 0; at ``on_train_begin``, a model without adapters,
            or (on a plain ``Trainer``) checkpointing enabled for a model whose ``save_pretrained`` refuses
            (``riemix.integrations.protect_save_pretrained``): use ``RiemixTrainer``, whose checkpoints hold the
            adapter, or ``save_strategy="no"``.
    """

    def __init__(self, diagnostics_every: int = 0) -> None:
        if not isinstance(diagnostics_every, int) or isinstance(diagnostics_every, bool) or diagnostics_every < 0:
            raise ValueError(f"diagnostics_every must be an int >= 0, got {diagnostics_every!r}")
        self.diagnostics_every = diagnostics_every
        self.monitor = RoutingMonitor() if diagnostics_every else None
        self.last_diagnostics: dict | None = None
        self._model: nn.Module | None = None
        self._hook = None
        self._grad_norms: dict | None = None
        self._pending: dict[str, float] = {}
        self._in_force: dict[str, float] = {}
        self._in_riemix_trainer = False  # set by RiemixTrainerMixin: it checkpoints the adapter and logs these values

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        """Set the schedules for the step training starts (or resumes) at; start the diagnostics window."""
        model = _adapted(model)
        strategy = getattr(args.save_strategy, "value", args.save_strategy)
        if not self._in_riemix_trainer and strategy != "no" and is_save_protected(model):
            raise ValueError(
                f"save_strategy={strategy!r}: a plain Trainer checkpoints with save_pretrained, which "
                "this adapted model refuses; train with riemix.integrations.RiemixTrainer (adapter-only "
                "checkpoints that resume) or pass save_strategy='no'"
            )
        self._model = model
        self._in_force = {}
        self._progress(state)
        if self.monitor is not None:
            set_record_routing(model)
            self.monitor.reset()
            self._remove_hook()
            self._hook = model.register_forward_hook(self._observe, with_kwargs=True)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs: Any):
        """Read the experts' gradient norms when this step closes a diagnostics window."""
        if self._due(state.global_step + 1):
            self._grad_norms = model_grad_norms(self._model)
        return control

    def on_step_end(self, args, state, control, **kwargs: Any):
        """Schedules for the next step; close the diagnostics window when due (and ask Trainer to log)."""
        advance_maturity(self._model, state.global_step)  # expert ages (maturity routing), once per step
        self._progress(state)
        if self._due(state.global_step):
            diag = collect_diagnostics(
                iter_moe_lora_layers(self._model), self.monitor, self._grad_norms, state.global_step
            )
            self.monitor.reset()
            self._grad_norms = None
            self.last_diagnostics = diag
            if state.is_world_process_zero:
                atomic_write_json(Path(args.output_dir) / DIAGNOSTICS_NAME, diag)
            self._pending.update(flat_diagnostics(diag))
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        """On a plain ``Trainer``: merge the pending values into a training log (and its history entry)."""
        if self._in_riemix_trainer or logs is None or "loss" not in logs:
            return control
        values = self.pop_logs()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        return control

    def on_train_end(self, args, state, control, **kwargs: Any):
        """Remove the diagnostics hook."""
        self._remove_hook()
        return control

    # ---------------------------------------------------------------- helpers
    def pop_logs(self) -> dict[str, float]:
        """The values gathered since the last call, then forgotten: the schedule values the last step trained
        with (``riemix/adapter_scale_factor``, ``riemix/router_temperature``) and the last diagnostics summary."""
        values, self._pending = self._pending, {}
        return values

    def _progress(self, state) -> None:
        """Set the schedules for the next step; log the values the step just taken used."""
        self._pending.update(self._in_force)
        values = set_training_progress(self._model, state.global_step, state.max_steps)
        self._in_force = {f"riemix/{key}": float(value) for key, value in values.items()}

    def _due(self, step: int) -> bool:
        return self.monitor is not None and step > 0 and step % self.diagnostics_every == 0

    def _observe(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook: feed the monitor with a training forward's gates (masked by its attention mask)."""
        if module.training and torch.is_grad_enabled():
            self.monitor.update_model(iter_moe_lora_layers(module), kwargs.get("attention_mask"))

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
