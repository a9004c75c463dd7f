"""Evaluation: predictions and metrics of a ``TaskModel`` on a ``Dataset``."""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import Dataset
from .metrics import compute_metrics
from .tasks import TaskModel, TaskSpec, eval_batches

__all__ = ["predict", "evaluate"]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def predict(
    task_model: TaskModel,
    dataset: Dataset,
    spec: TaskSpec,
    tokenizer,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Score every example of ``dataset``.

    Returns:
        ``{"preds": array}`` (class/choice indices, or regression values) for scored tasks, or
        ``{"loss": mean token loss}`` for SFT.
    """
    was_training = task_model.training
    task_model.eval()
    device = torch.device(device)
    preds: list = [None] * len(dataset)
    total_nll, total_tokens = 0.0, 0
    try:
        for kind, batch, idx in eval_batches(dataset, spec, tokenizer, batch_size):
            batch = _to(batch, device)
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
            ):
                batch_preds: list = []
                if kind == "choice":
                    batch_preds = task_model(batch, mode="choice").argmax(-1).tolist()
                elif kind == "encoder":
                    logits = task_model(batch, mode="logits").float()  # (B, C)
                    batch_preds = logits.squeeze(-1).tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()
                elif kind == "cloze":
                    lp = task_model(batch, mode="token_logprobs").float()  # (P,)
                    rows = batch["input_ids"].shape[0]
                    sums = torch.zeros(rows, device=device).index_add_(0, batch["loss_owner"], lp)
                    counts = torch.zeros(rows, device=device).index_add_(
                        0, batch["loss_owner"], torch.ones_like(lp)
                    )
                    scores = (sums / counts).tolist()
                    start = 0
                    for n in batch["num_choices"].tolist():
                        batch_preds.append(int(np.argmax(scores[start : start + n])))
                        start += n
                else:  # sft
                    lp = task_model(batch, mode="token_logprobs").float()
                    total_nll -= lp.sum().item()
                    total_tokens += lp.numel()
                for j, pred in zip(idx, batch_preds, strict=kind != "sft"):
                    preds[j] = pred
    finally:
        task_model.train(was_training)
    if dataset.task == "sft":
        return {"loss": total_nll / max(total_tokens, 1)}
    return {"preds": np.asarray(preds)}


def evaluate(
    task_model: TaskModel,
    dataset: Dataset,
    spec: TaskSpec,
    tokenizer,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Metrics of ``task_model`` on ``dataset`` (its primary metric, plus loss/perplexity for SFT)."""
    out = predict(task_model, dataset, spec, tokenizer, batch_size, device, autocast_dtype)
    if "loss" in out:
        return {"loss": out["loss"], "perplexity": math.exp(min(out["loss"], 50.0))}
    return compute_metrics(dataset.metric, out["preds"], dataset.targets())
