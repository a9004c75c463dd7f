"""``RiemixTrainer``: ``transformers.Trainer`` (or TRL's ``SFTTrainer``) with what ``riemix train`` does per step.

``RiemixTrainerMixin`` goes before any ``Trainer`` class in the bases (``RiemixTrainer`` is the mixin over
``Trainer``; ``class RiemixSFTTrainer(RiemixTrainerMixin, SFTTrainer)`` is TRL's) and adds, as
``riemix.training.recipe`` does them:

- the schedules (scale warm-up, router temperature) and diagnostics of a ``RiemixCallback`` it adds itself;
- the regularisers (``RiemixOptions.regularizers``) and the expert-scale anchor in ``compute_loss``: in loss
  mode added to the training loss (scaled for gradient accumulation as ``Trainer`` scales the task loss), in
  inject mode their gradients added to ``.grad`` (``riemix.core.regularizers.apply_regularizers``);
- the riemix optimizer with its router / LoRA+ groups when no optimizer is passed (``create_optimizer``; the
  learning-rate schedule stays ``Trainer``'s, from ``TrainingArguments``; ``riemix_optimizer`` gives riemix's);
- adapter-only ``save_model`` and checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``, which
  ``riemix.load_adapter`` reads onto a fresh base model; ``Trainer`` adds its optimizer, scheduler, RNG and
  state files to a checkpoint), restored into the model by ``train(resume_from_checkpoint=...)`` and by
  ``load_best_model_at_end``;
- the regulariser values (``aux/<name>``, unweighted means over the micro-batches since the last log), the
  schedule values the logged step trained with (``riemix/adapter_scale_factor``,
  ``riemix/router_temperature``) and the diagnostics summary (``diag/*``) in every training log.  ``loss`` is
  what was back-propagated: it includes the weighted regularisers in loss mode.

Single-process and DDP runs are covered; FSDP and DeepSpeed ZeRO-3 shard the parameters, which the
adapter-only saving reads whole, and are not supported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from riemix.core.regularizers import apply_regularizers, scale_anchor_loss, uses_router_regularizers
from riemix.core.tuner import iter_moe_lora_layers, set_record_routing
from riemix.integrations.callback import RiemixCallback
from riemix.integrations.options import RiemixOptions
from riemix.integrations.save import is_adapter_dir, load_adapter_weights, save_trainer_adapter
from riemix.optim import build_optimizer

__all__ = ["RiemixTrainer", "RiemixTrainerMixin"]


class RiemixTrainerMixin:
    """riemix's training step, optimizer and adapter-only saving for a ``transformers.Trainer`` subclass.

    Args:
        *args: The ``Trainer`` class's positional arguments.
        riemix_options: The riemix options (regularisers, diagnostics, optimizer groups); None: defaults.
        **kwargs: The ``Trainer`` class's keyword arguments (``optimizers=riemix_optimizer(...)`` included).

    Attributes:
        riemix_options: The options.
        riemix_callback: The ``RiemixCallback`` it added (its ``last_diagnostics`` holds the last window).

    Raises:
        ValueError: ``riemix_options`` not a ``RiemixOptions``, a model without MoE-LoRA adapters, a
            ``RiemixCallback`` passed in ``callbacks`` (this trainer adds its own: set
            ``RiemixOptions.diagnostics_every`` instead), or ``regularizer_mode="inject"`` with ``fp16`` (the
            loss scaler would unscale injected gradients it never scaled).
    """

    def __init__(self, *args: Any, riemix_options: RiemixOptions | None = None, **kwargs: Any) -> None:
        riemix_options = RiemixOptions() if riemix_options is None else riemix_options
        if not isinstance(riemix_options, RiemixOptions):
            raise ValueError(f"riemix_options must be a RiemixOptions, got {type(riemix_options).__name__}")
        self.riemix_options = riemix_options
        self.riemix_callback = RiemixCallback(riemix_options.diagnostics_every)
        self.riemix_callback._in_riemix_trainer = True
        self._aux_sums: dict[str, float] = {}
        self._aux_count = 0
        super().__init__(*args, **kwargs)
        if any(isinstance(cb, RiemixCallback) for cb in self.callback_handler.callbacks):
            raise ValueError(
                f"{type(self).__name__} adds its own RiemixCallback; remove the one passed in callbacks and set "
                "RiemixOptions(diagnostics_every=...) instead"
            )
        if self.model is None or next(iter_moe_lora_layers(self.model), None) is None:
            raise ValueError(
                f"{type(self).__name__} needs a model carrying MoE-LoRA adapters, got {type(self.model).__name__}; "
                "call riemix.add_moe_lora(model, config) (or riemix.load_adapter) first"
            )
        if riemix_options.regularizer_mode == "inject" and self.args.fp16:
            raise ValueError(
                "regularizer_mode='inject' cannot train with fp16: the loss scaler would unscale the injected "
                "gradients, which it never scaled; use bf16 or regularizer_mode='loss'"
            )
        self.add_callback(self.riemix_callback)
        if uses_router_regularizers(riemix_options.coefs()):
            set_record_routing(self.model)  # the router regularisers read each layer's last logits

    # ---------------------------------------------------------------- optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The riemix optimizer (``RiemixOptions.optimizer``) when none was passed.

        Its param groups are ``riemix.build_optimizer``'s; the learning rate, weight decay, betas and eps are
        ``TrainingArguments``'.  An ``optimizer_cls_and_kwargs`` given to the trainer is built by ``Trainer``.
        """
        if self.optimizer is None and self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        if self.optimizer is None:
            opts, args = self.riemix_options, self.args
            target = self.accelerator.unwrap_model(self.model if model is None else model)
            self.optimizer = build_optimizer(
                target,
                opts.optimizer,
                lr=args.learning_rate,
                gate_lr=opts.gate_lr,
                reg=opts.reg,
                weight_decay=args.weight_decay,
                loraplus_ratio=opts.loraplus_ratio,
                gate_max_grad_norm=opts.gate_max_grad_norm,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
            )
        return self.optimizer

    # ---------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The parent's loss plus, in training, the regularisers and the expert-scale anchor."""
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        extra = self._auxiliary_loss(model, mask, num_items_in_batch)
        if extra is not None:
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def _auxiliary_loss(
        self, model: nn.Module, mask: torch.Tensor | None, num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor | None:
        """Regularisers (a loss, or injected gradients: None) and anchor of this micro-batch's forward.

        ``Trainer`` divides a per-micro-batch loss by the accumulation steps itself, but not a loss already
        normalised over the whole accumulated batch (``num_items_in_batch``): then the micro-batch means added
        here are divided by the steps, so that every case adds ``mean over micro-batches`` as the recipe does.
        """
        inner = self.accelerator.unwrap_model(model)
        steps = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        opts = self.riemix_options
        aux, logs = apply_regularizers(inner, opts.coefs(), opts.regularizer_mode, mask, steps)
        for name, value in logs.items():
            self._aux_sums[name] = self._aux_sums.get(name, 0.0) + value
        self._aux_count += 1
        terms = [t for t in (aux, scale_anchor_loss(inner)) if t is not None]
        if not terms:
            return None
        extra = sum(terms)
        return extra / steps if self._loss_scaled_for_accumulation(num_items_in_batch) else extra

    def _loss_scaled_for_accumulation(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Whether ``Trainer.training_step`` leaves this loss undivided by the accumulation steps (its own test)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    # ---------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the regulariser means, schedule values and diagnostics summary to a training log."""
        if "loss" in logs:
            count, sums = max(self._aux_count, 1), self._aux_sums
            extra = {f"aux/{name}": value / count for name, value in sums.items()}
            self._aux_sums, self._aux_count = {}, 0
            logs = {**logs, **extra, **self.riemix_callback.pop_logs()}
        super().log(logs, start_time)

    # ---------------------------------------------------------------- saving and loading
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter only (``save_trainer_adapter``), the tokenizer and the training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_trainer_adapter(model, output_dir, extra={"global_step": self.state.global_step})
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore the adapter of an adapter-only checkpoint (others: ``Trainer``'s loading)."""
        if not is_adapter_dir(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(
            self.accelerator.unwrap_model(self.model if model is None else model), resume_from_checkpoint
        )

    def _load_best_model(self) -> None:
        """Restore the best checkpoint's adapter (``load_best_model_at_end``)."""
        best = self.state.best_model_checkpoint
        if best is None or not is_adapter_dir(best):
            return super()._load_best_model()
        load_adapter_weights(self.accelerator.unwrap_model(self.model), best)


class RiemixTrainer(RiemixTrainerMixin, Trainer):
    """``transformers.Trainer`` with riemix's schedules, regularisers, diagnostics, optimizer and saving.

    See ``RiemixTrainerMixin``; for TRL, ``class RiemixSFTTrainer(RiemixTrainerMixin, SFTTrainer)``.
    """
