"""The training loop: one explicit loop over optimizer steps, with Accelerate for devices.

``train(TrainConfig(...))`` loads the model and data, adds MoE-LoRA adapters, evaluates zero-shot,
trains with gradient accumulation, a linear-decay schedule, periodic evaluation, early stopping and
atomic checkpoints, and writes the run directory:

    <output_dir>/config.yaml        the resolved configuration
    <output_dir>/metrics.jsonl      one JSON object per logged step / evaluation
    <output_dir>/adapter/           the final adapter (save_adapter format)
    <output_dir>/checkpoints/       resumable checkpoints (keep-last-K)
    <output_dir>/summary.json       before/after metrics, wall time
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from riemix.core.config import MoELoRAConfig
from riemix.core.regularizers import (
    expert_diversity_loss,
    inject_gradients,
    load_balancing_loss,
    orthogonality_loss,
    router_z_loss,
    uniform_prior_loss,
)
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers, scale_anchor_loss, set_training_progress
from riemix.data import Dataset, load_dataset
from riemix.diagnostics.monitor import RoutingMonitor, collect_diagnostics, compact_diagnostics, expert_grad_norms
from riemix.evaluate import evaluate
from riemix.io.adapter import save_adapter
from riemix.io.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from riemix.io.fileio import atomic_write_json, atomic_write_text
from riemix.optim import build_optimizer
from riemix.tasks import TaskModel, TaskSpec, collate_encoder, collate_lm, encode_train, pack_items
from riemix.training.config import TrainConfig

__all__ = ["train", "TrainConfig", "prepare", "linear_schedule"]

HEAD_NAMES = ("classifier", "score")


def linear_schedule(warmup_steps: int, total_steps: int, kind: str = "linear"):
    """LR multiplier: linear warm-up, then linear decay to 0 (``kind="linear"``) or constant."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_data(cfg: TrainConfig) -> tuple[list[Dataset], list[Dataset]]:
    names = cfg.dataset if isinstance(cfg.dataset, list) else [cfg.dataset]
    eval_names = cfg.eval_dataset or names
    eval_names = eval_names if isinstance(eval_names, list) else [eval_names]
    if len(eval_names) != len(names):
        raise ValueError(f"eval_dataset lists {len(eval_names)} datasets for {len(names)} training datasets")
    train_sets, eval_sets = [], []
    for name, eval_name in zip(names, eval_names, strict=True):
        tr = load_dataset(name, cfg.train_split, cfg.data_dir)
        ev = load_dataset(eval_name, cfg.eval_split, cfg.data_dir, label_names=tr.label_names)
        if cfg.train_subset:
            tr = tr.subset(cfg.train_subset, seed=cfg.seed)
        if cfg.eval_subset:
            ev = ev.subset(cfg.eval_subset, seed=0)
        train_sets.append(tr)
        eval_sets.append(ev)
    return train_sets, eval_sets


def prepare(cfg: TrainConfig, model=None, tokenizer=None):
    """Load model, tokenizer and data; add adapters; build specs. Returns a namespace dict."""
    from riemix.hub.loading import load_model

    train_sets, eval_sets = _load_data(cfg)
    kind = cfg.model_kind
    if model is None:
        num_labels = None
        if kind == "sequence_classification":
            first = train_sets[0]
            num_labels = 1 if first.task == "regression" else first.num_labels
        model, tokenizer = load_model(cfg.model, task=kind, num_labels=num_labels)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer; riemix needs one to encode text")
    over = {
        "format": cfg.format,
        "template": cfg.template,
        "label_words": cfg.label_words or None,
        "max_length": cfg.max_length,
    }
    specs = [TaskSpec.for_dataset(ds, kind, **over) for ds in train_sets]
    add_moe_lora(model, MoELoRAConfig(**cfg.adapter))
    if kind == "sequence_classification":
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in HEAD_NAMES:
                module.requires_grad_(True)  # a new task head must train
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train_sets": train_sets,
        "eval_sets": eval_sets,
        "specs": specs,
    }


def _encode_all(train_sets, specs, tokenizer, cfg: TrainConfig) -> list:
    items = []
    for ds, spec in zip(train_sets, specs, strict=True):
        if cfg.model_kind == "sequence_classification":
            items += [(ds, ex) for ex in ds.examples]
        elif ds.task == "sft" and cfg.packing:
            items += pack_items([encode_train(ex, spec, tokenizer) for ex in ds.examples], cfg.max_length)
        else:
            items += [encode_train(ex, spec, tokenizer) for ex in ds.examples]
    return items


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The seeded permutation of ``n`` examples for one epoch (computed once per epoch, not per batch)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist())


def _batch_at(items, index: int, cfg: TrainConfig, rank: int, world: int) -> list:
    """The examples of global micro-batch ``index``: a seeded permutation per epoch, sharded by rank."""
    per_epoch = max(1, len(items) // cfg.batch_size)
    epoch, offset = divmod(index, per_epoch)
    chosen = _epoch_order(len(items), cfg.seed, epoch)[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
    return [items[i] for i in chosen[rank::world]]


#: Regularisers of router statistics / of the expert factors: (log name, TrainConfig coefficient).
ROUTER_REGULARIZERS = (("load_balance", "load_balance_coef"), ("z_loss", "z_loss_coef"),
                       ("uniform_prior", "uniform_prior_coef"))
PARAM_REGULARIZERS = (("diversity", "diversity_coef"), ("orthogonality", "orthogonality_coef"))


def _uses_router_regularizers(cfg: TrainConfig) -> bool:
    return any(getattr(cfg, coef) for _, coef in ROUTER_REGULARIZERS)


def _aux_terms(model, cfg: TrainConfig, mask: torch.Tensor | None) -> tuple[list, list, dict]:
    """Weighted regulariser terms, split into router-statistic and parameter ones, and their logs.

    Each regulariser is averaged over the adapted layers; ``logs`` holds each one's unweighted mean.
    """
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    router_terms, param_terms, logs = [], [], {}
    for layer in layers:
        values = {}
        if _uses_router_regularizers(cfg):
            logits = layer.last_router_logits  # (N, E)
            m = mask if mask is not None and mask.numel() == logits.shape[0] else None
            if cfg.load_balance_coef:
                values["load_balance"] = load_balancing_loss(logits, layer.top_k, layer.routing, m)
            if cfg.z_loss_coef:
                values["z_loss"] = router_z_loss(logits, m)
            if cfg.uniform_prior_coef:
                values["uniform_prior"] = uniform_prior_loss(logits, m)
        if cfg.diversity_coef:
            values["diversity"] = expert_diversity_loss(layer.lora_A, layer.lora_B)
        if cfg.orthogonality_coef:
            values["orthogonality"] = orthogonality_loss(layer.lora_A)
        for kind, terms in ((ROUTER_REGULARIZERS, router_terms), (PARAM_REGULARIZERS, param_terms)):
            for name, coef in kind:
                if name in values:
                    terms.append(getattr(cfg, coef) * values[name] / len(layers))
                    logs[name] = logs.get(name, 0.0) + values[name].item() / len(layers)
    return router_terms, param_terms, logs


def _aux_loss(model, cfg: TrainConfig, mask: torch.Tensor | None) -> tuple[torch.Tensor | None, dict]:
    """Regulariser loss to add to the task loss (``regularizer_mode="loss"``), and the per-term logs.

    In ``"inject"`` mode the gradients are added to ``.grad`` here (router-statistic terms w.r.t. the
    routers only, parameter terms w.r.t. A and B only; see docs/math.md, "Regularisers") and None is returned;
    the graph is retained for the task loss's backward.
    """
    router_terms, param_terms, logs = _aux_terms(model, cfg, mask)
    if not (router_terms or param_terms):
        return None, logs
    if cfg.regularizer_mode == "loss":
        return sum(router_terms + param_terms), logs
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    if router_terms:
        routers = [layer.router.weight for layer in layers]
        inject_gradients(sum(router_terms) / cfg.grad_accum, routers, retain_graph=True)
    if param_terms:
        factors = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        inject_gradients(sum(param_terms) / cfg.grad_accum, factors)
    return None, logs


def _format_table(before: dict, after: dict) -> str:
    keys = sorted(set(before) | set(after))
    lines = [f"{'metric':<28} {'before':>10} {'after':>10} {'change':>10}"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        fb = f"{b:10.4f}" if b is not None else f"{'-':>10}"
        fa = f"{a:10.4f}" if a is not None else f"{'-':>10}"
        fc = f"{a - b:+10.4f}" if a is not None and b is not None else f"{'':>10}"
        lines.append(f"{k:<28} {fb} {fa} {fc}")
    return "\n".join(lines)


def train(cfg: TrainConfig, model=None, tokenizer=None) -> dict[str, Any]:
    """Run a training job; returns the summary (also written to ``summary.json``).

    Args:
        cfg: the validated training configuration.
        model: optional already-loaded model (tests pass tiny models); loaded from ``cfg.model`` if None.
        tokenizer: its tokenizer.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    t_start = time.time()
    _seed_everything(cfg.seed)
    AcceleratorState._reset_state()  # a library call may follow another with other precision settings
    accel = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=cfg.cpu)
    out = Path(cfg.output_dir)
    is_main = accel.is_main_process
    log = print if is_main and cfg.verbose else (lambda *a, **k: None)
    ctx = prepare(cfg, model, tokenizer)
    model, tokenizer, specs = ctx["model"], ctx["tokenizer"], ctx["specs"]
    task_model = TaskModel(model, cfg.model_kind)
    items = _encode_all(ctx["train_sets"], specs, tokenizer, cfg)
    if not items:
        raise ValueError("the training set is empty")
    opt = build_optimizer(
        model,
        cfg.optimizer,
        lr=cfg.lr,
        gate_lr=cfg.gate_lr,
        reg=cfg.reg,
        weight_decay=cfg.weight_decay,
        loraplus_ratio=cfg.loraplus_ratio,
        gate_max_grad_norm=cfg.gate_max_grad_norm,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, linear_schedule(cfg.warmup_steps, cfg.max_steps, cfg.schedule)
    )
    task_model, opt_p = accel.prepare(task_model, opt)
    device = accel.device
    autocast = torch.bfloat16 if cfg.bf16 else None
    monitor = RoutingMonitor() if cfg.diagnostics_every else None
    if _uses_router_regularizers(cfg) or monitor is not None:
        for _, layer in iter_moe_lora_layers(model):
            layer.record_routing = True

    def run_eval() -> dict[str, float]:
        metrics: dict[str, float] = {}
        for ds, spec in zip(ctx["eval_sets"], specs, strict=True):
            res = evaluate(task_model, ds, spec, tokenizer, cfg.eval_batch_size, device, autocast)
            prefix = "" if len(ctx["eval_sets"]) == 1 else f"{ds.name}/"
            metrics.update({f"{prefix}{k}": v for k, v in res.items()})
        return metrics

    start_step, extra = 0, {"best": None, "bad_evals": 0, "before": None}
    if cfg.resume:
        ckpt = latest_checkpoint(out) if cfg.resume is True or cfg.resume == "latest" else Path(cfg.resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint found under {out / 'checkpoints'}")
        state = load_checkpoint(ckpt, model, opt, sched)
        start_step, extra = state["step"], state["extra"]
        log(f"resumed from {ckpt} at step {start_step}")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
    metrics_file = out / "metrics.jsonl"

    writer = _tensorboard(out) if is_main and cfg.tensorboard else None

    def record(entry: dict) -> None:
        if not is_main:
            return
        with open(metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        if writer is not None:
            flat = {**{k: v for k, v in entry.items() if k not in ("step", "eval", "diagnostics")}, **{
                f"eval/{k}": v for k, v in entry.get("eval", {}).items()}}
            overall = entry.get("diagnostics", {}).get("overall", {})
            flat.update({f"diagnostics/{k}": v for k, v in overall.items() if isinstance(v, (int, float))})
            for key, value in flat.items():
                writer.add_scalar(key, value, entry["step"])

    if extra["before"] is None and cfg.eval_before:
        extra["before"] = run_eval()
        record({"step": 0, "eval": extra["before"]})
        log("zero-shot: " + ", ".join(f"{k}={v:.4f}" for k, v in extra["before"].items()))
    pbar = None
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
    task_model.train()
    tokens_seen, padded_seen, train_time, stop, last_eval = 0, 0, 0.0, False, None
    done = start_step
    set_training_progress(model, start_step, cfg.max_steps)  # scale warm-up / temperature: f(step)
    for step in range(start_step, cfg.max_steps):
        t_step = time.time()
        loss_sum, aux_logs = 0.0, {}
        for micro in range(cfg.grad_accum):
            chunk = _batch_at(
                items, step * cfg.grad_accum + micro, cfg, accel.process_index, accel.num_processes
            )
            if cfg.model_kind == "sequence_classification":
                batch = collate_encoder(
                    [ex for _, ex in chunk], tokenizer, cfg.max_length, chunk[0][0].task == "regression"
                )
            else:
                batch = collate_lm(chunk, tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens_seen += int(batch["attention_mask"].sum())
            padded_seen += batch["attention_mask"].numel()
            sync = micro == cfg.grad_accum - 1
            with accel.no_sync(task_model) if not sync else contextlib.nullcontext():
                loss = task_model(batch)
                if monitor is not None:
                    monitor.update_model(iter_moe_lora_layers(model), batch["attention_mask"])
                aux, aux_logs = _aux_loss(model, cfg, batch["attention_mask"])
                total = loss if aux is None else loss + aux
                anchor = scale_anchor_loss(model)  # adapter.scale_anchor_beta > 0 with expert scales
                total = total if anchor is None else total + anchor
                accel.backward(total / cfg.grad_accum)
            loss_sum += loss.item() / cfg.grad_accum
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss became {loss_sum} at step {step + 1}; lower the learning rate")
        diag_due = monitor is not None and (step + 1) % cfg.diagnostics_every == 0
        grad_norms = None
        if diag_due:  # before the step: the optimizer may clear or reuse .grad
            grad_norms = {n: expert_grad_norms(m.lora_A, m.lora_B) for n, m in iter_moe_lora_layers(model)}
        opt_p.step()
        sched.step()
        opt_p.zero_grad(set_to_none=True)
        done = step + 1
        set_training_progress(model, done, cfg.max_steps)
        train_time += time.time() - t_step
        elapsed = train_time
        lr_now = sched.get_last_lr()[0]
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(
                loss=f"{loss_sum:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}"
            )
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            record(
                {
                    "step": done,
                    "loss": loss_sum,
                    "lr": lr_now,
                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    "pad_fraction": 1.0 - tokens_seen / max(padded_seen, 1),
                    **aux_logs,
                }
            )
        if diag_due:
            diag = collect_diagnostics(iter_moe_lora_layers(model), monitor, grad_norms, done)
            monitor.reset()
            record({"step": done, "diagnostics": compact_diagnostics(diag)})
            if is_main:
                atomic_write_json(out / "diagnostics.json", diag)
        want_eval = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps
        if want_eval:
            last_eval = run_eval()
            record({"step": done, "eval": last_eval})
            log(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
            stop = _early_stop(cfg, last_eval, extra)
        if is_main and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps or stop):
            save_checkpoint(out, done, model, opt, sched, extra, cfg.keep_last)
        if stop:
            log(
                f"early stopping at step {done}: no improvement of {cfg.early_stopping_metric} "
                f"in {cfg.early_stopping_patience} evaluations"
            )
            break
    if pbar is not None:
        pbar.close()
    if writer is not None:
        writer.close()
    if last_eval is None:
        last_eval = run_eval()
    summary = {
        "before": extra["before"],
        "after": last_eval,
        "steps": done,
        "wall_seconds": time.time() - t_start,
        "train_seconds": train_time,
        "tokens_per_s": tokens_seen / max(train_time, 1e-9),
        "pad_fraction": 1.0 - tokens_seen / max(padded_seen, 1),
        "output_dir": str(out),
    }
    if is_main:
        save_adapter(model, out / "adapter", extra={"train_config": cfg.to_dict()})
        atomic_write_json(out / "summary.json", summary)
        if extra["before"] is not None:
            log("\n" + _format_table(extra["before"], last_eval))
        log(f"wall time {summary['wall_seconds']:.0f} s; run directory {out}")
    return summary


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _early_stop(cfg: TrainConfig, metrics: dict[str, float], extra: dict) -> bool:
    name = cfg.early_stopping_metric
    if not cfg.early_stopping_patience or name not in metrics:
        return False
    value = metrics[name] if name != "loss" else -metrics[name]
    if extra["best"] is None or value > extra["best"]:
        extra["best"], extra["bad_evals"] = value, 0
        return False
    extra["bad_evals"] += 1
    return extra["bad_evals"] >= cfg.early_stopping_patience
