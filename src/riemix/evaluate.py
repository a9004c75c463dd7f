"""Evaluation: predictions and metrics of a ``TaskModel`` on a ``Dataset``, and of a saved model.

``predict``/``evaluate`` score a model already in memory (the trainer's evaluations);
``evaluate_model`` loads a base model, optionally an adapter, and a dataset by name (``riemix eval``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from riemix.data import Dataset, load_dataset
from riemix.hub import load_model, num_labels_for
from riemix.io.adapter import load_adapter
from riemix.metrics import compute_metrics
from riemix.tasks import TaskModel, TaskSpec, check_label_words, check_template, eval_batches, fit_max_length

__all__ = ["predict", "evaluate", "evaluate_model"]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _progress_bar(progress: bool | str, total: int):
    """A tqdm bar over ``total`` examples (``progress``: True, or the bar's label), else None."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else "eval"
    return tqdm(total=total, desc=label, unit="ex", leave=False, dynamic_ncols=True)


@torch.no_grad()
def predict(task_model: TaskModel, dataset: Dataset, spec: TaskSpec, tokenizer, batch_size: int = 16,
            device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
            progress: bool | str = False) -> dict:
    """Score every example of ``dataset``.

    Args:
        task_model: The model and its head.
        dataset: The examples (with targets for the scored tasks).
        spec: How the examples are prompted and scored (``TaskSpec.for_dataset``).
        tokenizer: The model's tokenizer.
        batch_size: Examples per batch.
        device: Where the batches go (the model's device).
        autocast_dtype: Autocast to this dtype (None: no autocast).
        progress: Show a progress bar of the examples scored (a string labels it); False: none.

    Returns:
        ``{"preds": array}`` (class/choice indices, or regression values) for scored tasks, or
        ``{"loss": mean token loss, "nll": summed, "tokens": count}`` for SFT.

    An encoder's ``spec.max_length`` beyond its position embeddings is lowered to them, with a warning
    (``riemix.tasks.fit_max_length``).
    """
    spec = fit_max_length(spec, getattr(task_model, "module", task_model).model)  # unwrap DDP
    was_training = task_model.training
    task_model.eval()
    device = torch.device(device)
    preds: list = [None] * len(dataset)
    total_nll, total_tokens = 0.0, 0
    bar = _progress_bar(progress, len(dataset))
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
            if bar is not None:
                bar.update(len(idx))
    finally:
        task_model.train(was_training)
        if bar is not None:
            bar.close()
    if dataset.task == "sft":
        return {"loss": total_nll / max(total_tokens, 1), "nll": total_nll, "tokens": total_tokens}
    return {"preds": np.asarray(preds)}


def evaluate(task_model: TaskModel, dataset: Dataset, spec: TaskSpec, tokenizer, batch_size: int = 16,
             device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
             progress: bool | str = False, shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Metrics of ``task_model`` on ``dataset`` (its primary metric, plus loss/perplexity for SFT).

    The other arguments are those of ``predict``.

    Args:
        shard: ``(rank, world)``: with ``world > 1`` (a running process group) this process scores the
            examples ``rank::world`` and every process's predictions are gathered back in dataset order
            (SFT: the summed losses and token counts), so every process returns the metrics of the whole
            dataset, equal to a single process's.
    """
    rank, world = shard
    part = dataset if world == 1 else dataclasses.replace(dataset, examples=dataset.examples[rank::world])
    out = predict(task_model, part, spec, tokenizer, batch_size, device, autocast_dtype, progress)
    if world > 1:
        outs: list = [None] * world
        torch.distributed.all_gather_object(outs, out)  # every process's predictions, in rank order
        if dataset.task == "sft":
            nll, tokens = sum(o["nll"] for o in outs), sum(o["tokens"] for o in outs)
            out = {"loss": nll / max(tokens, 1)}
        else:
            preds = np.empty(len(dataset), dtype=outs[0]["preds"].dtype)
            for r, o in enumerate(outs):
                preds[r::world] = o["preds"]
            out = {"preds": preds}
    if "loss" in out:
        return {"loss": out["loss"], "perplexity": math.exp(min(out["loss"], 50.0))}
    return compute_metrics(dataset.metric, out["preds"], dataset.targets())


def evaluate_model(
    model: str = "smollm2-135m",
    dataset: str = "glue/sst2",
    adapter: str | None = None,
    model_kind: str = "causal_lm",
    split: str = "dev",
    data_dir: str | None = None,
    format: str = "cloze",
    template: str | None = None,
    label_words: list[str] | None = None,
    subset: int | None = None,
    batch_size: int = 32,
    max_length: int = 256,
    progress: bool = True,
    force: bool = False,
    quantization: str | None = None,
) -> dict[str, Any]:
    """Load a base model (with an adapter, or zero-shot without) and evaluate it on a dataset.

    Args:
        model: Built-in name, local directory or hub id.
        dataset: Built-in dataset name or a .jsonl/.tsv file.
        adapter: Adapter directory written by riemix (optional: zero-shot without).
        model_kind: The model's head: a causal LM scoring the answers, or a classification head.
        split: Dataset split to evaluate.
        data_dir: Directory laid out like the built-in data (see docs).
        format: How a causal LM answers: the label words / choice texts (cloze), or the choice letters.
        template: Prompt template for label-word classification.
        label_words: One word per class.
        subset: Evaluate a fixed random subset of this size (seed 0; none or 0: every example).
        batch_size: Examples per evaluation batch.
        max_length: Longest tokenised example, in tokens.
        progress: Show a progress bar of the examples scored.
        force: Load the adapter even onto base weights that differ from those it was trained on.
        quantization: Load the base quantized by bitsandbytes (``nf4``, ``fp4``, ``int8``); none: full precision.

    Returns:
        ``{"dataset": name, "split": split, "examples": count, **metrics}``.

    Raises:
        riemix.data.DataError: an unknown or malformed dataset.
        riemix.hub.ModelLoadError: a model that cannot be loaded.
        riemix.AdapterError: a missing or corrupt adapter.
        ValueError: options that do not fit the dataset (e.g. label words needed but not given).
    """
    if template is not None:
        check_template(template)  # before the model loads
    ds = load_dataset(dataset, split, data_dir)
    if subset:
        ds = ds.subset(subset, seed=0)
    base, tokenizer = load_model(
        model, task=model_kind, num_labels=num_labels_for(ds, model_kind), quantization=quantization
    )
    if adapter:
        load_adapter(base, adapter, force=force)
    spec = TaskSpec.for_dataset(
        ds, model_kind, format=format, template=template, label_words=label_words, max_length=max_length
    )
    check_label_words(spec, tokenizer)
    metrics = evaluate(TaskModel(base, model_kind), ds, spec, tokenizer, batch_size, progress=progress and "eval")
    return {"dataset": ds.name, "split": split, "examples": len(ds), **metrics}
