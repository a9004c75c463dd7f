"""The training recipe: ``setup`` a run, then ``train_step`` / ``evaluate`` / ``save`` in one explicit loop.

``train(TrainConfig(...))`` loads the model and data, adds MoE-LoRA adapters, evaluates zero-shot,
trains with gradient accumulation, a linear-decay schedule, periodic evaluation, early stopping and
atomic checkpoints (Accelerate places it on the device), and writes the run directory (checked and
locked first: ``riemix.training.rundir``):

    <output_dir>/config.yaml        the resolved configuration
    <output_dir>/run.json           the run id (checkpoints record it; a resume continues only its own)
    <output_dir>/metrics.jsonl      one JSON object per logged step / evaluation
    <output_dir>/adapter/           the final adapter (save_adapter format)
    <output_dir>/checkpoints/       resumable checkpoints (keep-last-K)
    <output_dir>/summary.json       before/after metrics, wall time

Read ``train`` first: it is the whole loop; each function it calls is one stage of a step.  A diverging
step (``riemix.training.guard``) raises before anything is saved; SIGINT / SIGTERM stop at the next step
boundary after a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from riemix.core.regularizers import apply_regularizers, scale_anchor_loss, uses_router_regularizers
from riemix.core.schedules import advance_maturity, linear_schedule, set_training_progress
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers, set_record_routing
from riemix.diagnostics.monitor import RoutingMonitor, model_grad_norms
from riemix.evaluate import evaluate as evaluate_dataset
from riemix.hub.loading import HEAD_NAMES, load_model, num_labels_for
from riemix.io.adapter import save_adapter
from riemix.io.checkpoint import (
    clean_checkpoint_temps,
    find_resumable,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from riemix.io.fileio import atomic_write_text
from riemix.io.fingerprint import pin_weight_digests
from riemix.optim import build_optimizer
from riemix.tasks import TaskModel, TaskSpec, check_label_words, fit_max_length
from riemix.training.config import TrainConfig
from riemix.training.data import batch_at, collate, encode_items, load_datasets, seed_everything
from riemix.training.distributed import all_sum, rank_and_world
from riemix.training.guard import DivergenceGuard, StopSignals, TrainingInterrupted
from riemix.training.logging import MetricsLogger, console, format_metrics
from riemix.training.report import log_diagnostics, log_step, write_summary
from riemix.training.rundir import RunDir, open_run, truncate_metrics
from riemix.training.sharding import average_gradients, shard_base
from riemix.training.state import StepResult, TrainState

__all__ = [
    "TrainConfig",
    "evaluate",
    "prepare",
    "save",
    "setup",
    "train",
    "train_step",
]


# ---------------------------------------------------------------- setup
def prepare(cfg: TrainConfig, model=None, tokenizer=None):
    """Load model, tokenizer and data; add adapters; build specs. Returns a namespace dict."""
    train_sets, eval_sets = load_datasets(cfg)
    kind = cfg.model_kind
    if model is None:
        model, tokenizer = load_model(
            cfg.model,
            task=kind,
            num_labels=num_labels_for(train_sets[0], kind),
            quantization=cfg.quantization,
            base_dtype=cfg.base_dtype,
        )
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer; riemix needs one to encode text")
    over = {
        "format": cfg.format,
        "template": cfg.template,
        "label_words": cfg.label_words or None,
        "max_length": cfg.max_length,
    }
    # an encoder's budget is capped at its position embeddings (with a warning), for training and evaluation
    specs = [fit_max_length(TaskSpec.for_dataset(ds, kind, **over), model) for ds in train_sets]
    for spec in specs:
        check_label_words(spec, tokenizer)
    add_moe_lora(model, replace(cfg.adapter))  # a copy: the model keeps its own config
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


def setup(cfg: TrainConfig, model=None, tokenizer=None, run: RunDir | None = None) -> TrainState:
    """Seed, build the model, data, optimizer and schedule, then resume or start the run directory.

    The order of the random draws (seed, adapter initialisation) is fixed: a run is reproducible.

    Args:
        cfg: The run's configuration.
        model: An already-loaded model (else ``cfg.model`` is loaded).
        tokenizer: Its tokenizer.
        run: The opened run directory (``open_run``); None opens it here (the caller releases
            ``state.run``).

    Raises:
        ValueError: an empty training set, a model without tokenizer, or a run directory refused by
            ``open_run``.
        FileNotFoundError: ``resume`` without an intact checkpoint of this run.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    run = open_run(cfg, console(cfg.verbose)) if run is None else run  # before the (slow) model load
    seed_everything(cfg.seed)  # first: the adapter initialisation below draws from these generators
    AcceleratorState._reset_state()  # a library call may follow another with other precision settings
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch started several
    # Accelerate sets up several CPU processes (gloo) only when told the run is on the CPU
    cpu = cfg.cpu or (launched and not torch.cuda.is_available())
    accel = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=cpu)
    # model + adapters, then the training items
    ctx = prepare(cfg, model, tokenizer)
    model = ctx["model"]
    pack_to = ctx["specs"][0].max_length if cfg.packing else None
    items = encode_items(ctx["train_sets"], ctx["specs"], ctx["tokenizer"], cfg.model_kind, pack_to)
    if not items:
        raise ValueError("the training set is empty")
    # optimizer and learning-rate schedule, placed by Accelerate
    optimizer = build_optimizer(
        model,
        cfg.optimizer,
        lr=cfg.lr,
        gate_lr=cfg.gate_lr,
        reg=cfg.reg,
        weight_decay=cfg.weight_decay,
        loraplus_ratio=cfg.loraplus_ratio,
        gate_max_grad_norm=cfg.gate_max_grad_norm,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(cfg.warmup_steps, cfg.max_steps, cfg.schedule)
    )
    if cfg.fsdp:  # the base sharded by FSDP2, the adapters whole on every process (riemix.training.sharding)
        pin_weight_digests(model)  # adapter files record the whole base weights, computed before sharding
        task_model, prepared_optimizer = TaskModel(model, cfg.model_kind).to(accel.device), optimizer
        shard_base(task_model, accel.device)  # the root: its forward gathers the embeddings and the head
    else:  # one process, or DDP (Accelerate)
        task_model, prepared_optimizer = accel.prepare(TaskModel(model, cfg.model_kind), optimizer)
    # layers record their routing when router regularisers or diagnostics read it
    monitor = RoutingMonitor() if cfg.diagnostics_every else None
    if uses_router_regularizers(cfg.regularizer_coefs()) or monitor is not None:
        set_record_routing(model)
    state = TrainState(
        cfg=cfg,
        accel=accel,
        model=model,
        task_model=task_model,
        tokenizer=ctx["tokenizer"],
        specs=ctx["specs"],
        eval_sets=ctx["eval_sets"],
        items=items,
        optimizer=optimizer,
        prepared_optimizer=prepared_optimizer,
        scheduler=scheduler,
        monitor=monitor,
        out=Path(cfg.output_dir),
        log=console(accel.is_main_process and cfg.verbose),
        run=run,
        guard=DivergenceGuard(cfg.divergence_loss_ratio, _divergence_advice(cfg)),
    )
    _resume_or_start(state)
    state.extra["run_id"], state.extra["world_size"] = run.run_id, accel.num_processes
    world = accel.num_processes
    state.log(
        f"global batch: {cfg.batch_size} per process × {world} process(es) × {cfg.grad_accum} accumulation = "
        f"{cfg.batch_size * world * cfg.grad_accum} examples per step"
    )
    tensorboard = state.out / "tensorboard" if cfg.tensorboard else None
    state.metrics = MetricsLogger(state.out / "metrics.jsonl", state.is_main, tensorboard)
    return state


def _divergence_advice(cfg: TrainConfig) -> str:
    return (
        f"try a lower lr (now {cfg.lr:g}) or adapter.alpha (now {cfg.adapter.alpha:g}) in a new run; the "
        f"checkpoints and adapter in {cfg.output_dir} were written before the divergence"
    )


def _resume_or_start(state: TrainState) -> None:
    """Load this run's checkpoint (model, optimizer, schedule, RNG, ``extra``) and cut ``metrics.jsonl`` back
    to its step, or write ``config.yaml`` into the new run directory."""
    cfg, out, run = state.cfg, state.out, state.run
    if state.is_main:
        clean_checkpoint_temps(out)  # leftovers of a writer killed mid-checkpoint
    if not cfg.resume:
        if state.is_main:
            atomic_write_text(out / "config.yaml", cfg.to_yaml())
        return
    if cfg.resume is True or cfg.resume == "latest":
        ckpt = find_resumable(out, run.run_id, state.log)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no intact checkpoint of this run under {out / 'checkpoints'}")
    else:
        ckpt = Path(cfg.resume)
    saved = read_checkpoint(ckpt)  # read and verified once, then checked and applied
    if None not in (saved["run_id"], run.run_id) and saved["run_id"] != run.run_id:
        raise ValueError(f"--resume {ckpt}: written by run {saved['run_id']}, not by the run in {out} ({run.run_id})")
    world, saved_world = state.accel.num_processes, saved["extra"].get("world_size", 1)
    if saved_world != world:  # the batch order and each process's shard depend on it
        raise ValueError(
            f"--resume {ckpt}: written by a run of {saved_world} process(es), this one has {world}; resume with "
            f"{saved_world} (the data order and the per-process batches depend on it)"
        )
    loaded = load_checkpoint(ckpt, state.model, state.optimizer, state.scheduler, saved)
    state.start_step, state.extra = loaded["step"], loaded["extra"]
    if state.is_main:
        dropped = truncate_metrics(out / "metrics.jsonl", state.start_step)
        if dropped:
            state.log(f"metrics.jsonl: dropped {dropped} line(s) written after step {state.start_step}")
    state.log(f"resumed from {ckpt} at step {state.start_step}")


# ---------------------------------------------------------------- one step
def train_step(state: TrainState, step: int) -> StepResult:
    """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches, then update, schedule, progress.

    The loss is the mean over every target token (encoders: example) of the step's global batch: all
    micro-batches of all processes.  Each micro-batch back-propagates its summed loss × (processes / global
    target count), and DDP averages over the processes, so N processes compute what one process computes
    on the same global batch (``riemix.training.distributed``).

    Raises:
        TrainingDiverged: a non-finite loss, gradient or updated weight, or a runaway loss
            (``state.guard``); raised before the update when the loss or a gradient is bad.
    """
    cfg, world = state.cfg, state.accel.num_processes
    batches = [_micro_batch(state, step * cfg.grad_accum + micro) for micro in range(cfg.grad_accum)]
    local = [float(sum(TaskModel.num_targets(b) for b in batches))]
    (targets,) = all_sum(local, state.accel.device)  # the global batch's loss terms
    weight = world / max(targets, 1.0)
    loss_sum, aux_logs = 0.0, {}
    for micro, batch in enumerate(batches):
        last = micro == cfg.grad_accum - 1  # gradients are synchronised across processes on the last one
        with state.accel.no_sync(state.task_model) if not last else contextlib.nullcontext():
            summed, aux_logs = _forward_backward(state, batch, weight)
        loss_sum += summed.item()
    if cfg.fsdp:  # the replicated adapters' gradients (DDP does this for the unsharded model)
        average_gradients([p for _, p in state.trainable])
    (loss_sum,) = all_sum([loss_sum], state.accel.device)
    loss = loss_sum / max(targets, 1.0)
    state.guard.check_loss(loss, step + 1)
    state.guard.check_gradients(state.trainable, step + 1)
    grad_norms = None
    if _diagnostics_due(state, step + 1):  # before the step: the optimizer may clear or reuse .grad
        grad_norms = model_grad_norms(state.model)
    state.prepared_optimizer.step()
    state.scheduler.step()
    state.prepared_optimizer.zero_grad(set_to_none=True)
    state.guard.check_weights(state.trainable, step + 1)
    set_training_progress(state.model, step + 1, cfg.max_steps)  # scale warm-up / temperature: f(step)
    advance_maturity(state.model, step + 1)  # expert ages: dense routing while an expert is immature
    return StepResult(loss, aux_logs, grad_norms)


def _micro_batch(state: TrainState, index: int) -> dict[str, torch.Tensor]:
    """Global micro-batch ``index`` (``batch_size`` items per process), this process's shard, collated on
    the device; counts its tokens."""
    cfg, accel = state.cfg, state.accel
    world = accel.num_processes
    chunk = batch_at(state.items, index, cfg.batch_size * world, cfg.seed, accel.process_index, world)
    batch = collate(chunk, state.tokenizer, cfg.model_kind, state.specs[0].max_length)  # the specs share it
    batch = {k: v.to(accel.device) for k, v in batch.items()}
    state.tokens_seen += int(batch["attention_mask"].sum())
    state.padded_seen += batch["attention_mask"].numel()
    return batch


def _forward_backward(state: TrainState, batch: dict[str, torch.Tensor], weight: float) -> tuple[torch.Tensor, dict]:
    """Summed task loss of one micro-batch; backward of ``weight`` × it (+ its share of the regularisers
    and scale anchor). Returns the summed loss (detached use only) and the regulariser logs."""
    cfg, model = state.cfg, state.model
    summed = state.task_model(batch, mode="loss_sum")
    if state.monitor is not None:
        state.monitor.update_model(iter_moe_lora_layers(model), batch["attention_mask"])
    # regularisers: a loss to add ("loss" mode), or their gradients already injected into .grad (None)
    mask = batch["attention_mask"]
    aux, aux_logs = apply_regularizers(model, cfg.regularizer_coefs(), cfg.regularizer_mode, mask, cfg.grad_accum)
    anchor = scale_anchor_loss(model)  # adapter.scale_anchor_beta > 0 with expert scales
    extra = [t for t in (aux, anchor) if t is not None]
    total = summed * weight + (sum(extra) / cfg.grad_accum if extra else 0.0)
    state.accel.backward(total)
    return summed, aux_logs


def _every(period: int, step: int) -> bool:
    """Whether a periodic action (``*_every``; 0: never) is due after ``step`` steps."""
    return bool(period) and step % period == 0


def _diagnostics_due(state: TrainState, done: int) -> bool:
    return state.monitor is not None and _every(state.cfg.diagnostics_every, done)


# ---------------------------------------------------------------- evaluate, report, save
def evaluate(state: TrainState) -> dict[str, float]:
    """Metrics of every evaluation dataset (keys prefixed ``<dataset>/`` when there are several).

    With several processes each scores every N-th example and the predictions are gathered back in dataset
    order, so the metrics equal a single process's.
    """
    t_eval = time.time()
    metrics: dict[str, float] = {}
    autocast = torch.bfloat16 if state.cfg.bf16 else None
    for ds, spec in zip(state.eval_sets, state.specs, strict=True):
        label = (state.is_main and state.cfg.progress) and f"eval {ds.name}"  # a bar of examples scored
        res = evaluate_dataset(
            state.task_model, ds, spec, state.tokenizer, state.cfg.eval_batch_size, state.accel.device, autocast,
            label, shard=rank_and_world(),
        )  # fmt: skip
        prefix = "" if len(state.eval_sets) == 1 else f"{ds.name}/"
        metrics.update({f"{prefix}{k}": v for k, v in res.items()})
    state.eval_time += time.time() - t_eval
    return metrics


def _early_stop(state: TrainState, metrics: dict[str, float]) -> bool:
    """Track the best ``early_stopping_metric``; True after ``early_stopping_patience`` evaluations without
    improvement (``loss`` is minimised, anything else maximised)."""
    cfg, extra = state.cfg, state.extra
    name = cfg.early_stopping_metric
    if not cfg.early_stopping_patience:
        return False
    if name not in metrics:  # a typo would otherwise switch early stopping off without a word
        raise ValueError(f"early_stopping_metric {name!r} is not among this evaluation's metrics {sorted(metrics)}")
    value = metrics[name] if name != "loss" else -metrics[name]
    if extra["best"] is None or value > extra["best"]:
        extra["best"], extra["bad_evals"] = value, 0
        return False
    extra["bad_evals"] += 1
    return extra["bad_evals"] >= cfg.early_stopping_patience


def save(state: TrainState, step: int) -> None:
    """A resumable checkpoint after ``step`` steps (main process only; the oldest beyond ``keep_last`` go)."""
    if state.is_main:
        save_checkpoint(
            state.out, step, state.model, state.optimizer, state.scheduler, state.extra, state.cfg.keep_last
        )


def _progress_bar(state: TrainState):
    """A tqdm bar over the steps (main process with ``progress``), else None."""
    if not (state.is_main and state.cfg.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=state.cfg.max_steps, initial=state.start_step, desc="train", dynamic_ncols=True)


# ---------------------------------------------------------------- the loop
def train(cfg: TrainConfig, model=None, tokenizer=None) -> dict[str, Any]:
    """Run a training job; returns the summary (also written to ``summary.json``).

    Args:
        cfg: the validated training configuration.
        model: optional already-loaded model (tests pass tiny models); loaded from ``cfg.model`` if None.
        tokenizer: its tokenizer.

    Raises:
        ValueError: bad input (configuration, data, run directory), named.
        TrainingDiverged: a step produced non-finite values or a runaway loss (nothing of it was saved).
        TrainingInterrupted: SIGINT / SIGTERM; a checkpoint of the last completed step was written.
    """
    t_start = time.time()
    run = open_run(cfg, console(cfg.verbose))  # checked, locked, never silently reused; before the model
    with run, StopSignals() as signals:
        state = setup(cfg, model, tokenizer, run)
        try:
            return _train_loop(state, signals, t_start)
        finally:
            state.metrics.close()


def _train_loop(state: TrainState, signals: StopSignals, t_start: float) -> dict[str, Any]:
    """Zero-shot evaluation, the steps (log, diagnose, evaluate, save, stop), then the final adapter."""
    cfg = state.cfg
    if state.extra["before"] is None and cfg.eval_before:  # zero-shot (kept across a resume)
        state.extra["before"] = evaluate(state)
        state.metrics.record({"step": 0, "eval": state.extra["before"]})
        state.log("zero-shot: " + format_metrics(state.extra["before"]))
    pbar = _progress_bar(state)
    state.task_model.train()
    set_training_progress(state.model, state.start_step, cfg.max_steps)
    done, last_eval, stop = state.start_step, None, False
    for step in range(state.start_step, cfg.max_steps):
        _stop_if_signalled(state, signals, done, pbar, saved=False)
        t_step = time.time()
        result = train_step(state, step)
        done = step + 1
        state.train_time += time.time() - t_step
        if pbar is not None:
            pbar.update(1)
            tok_s = state.tokens_seen / max(state.train_time, 1e-9)
            lr = state.scheduler.get_last_lr()[0]
            pbar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        if _every(cfg.log_every, done) or done == cfg.max_steps:
            log_step(state, done, result)
        if _diagnostics_due(state, done):
            log_diagnostics(state, done, result.grad_norms)
        if _every(cfg.eval_every, done) or done == cfg.max_steps:
            last_eval = evaluate(state)
            state.metrics.record({"step": done, "eval": last_eval})
            state.log(f"step {done}: " + format_metrics(last_eval))
            stop = _early_stop(state, last_eval)
        saved = _every(cfg.save_every, done) or done == cfg.max_steps or stop
        if saved:
            save(state, done)
        _stop_if_signalled(state, signals, done, pbar, saved)
        if stop:
            state.log(
                f"early stopping at step {done}: no improvement of {cfg.early_stopping_metric} "
                f"in {cfg.early_stopping_patience} evaluations"
            )
            break
    if pbar is not None:
        pbar.close()
    if last_eval is None:  # no step was taken (max_steps reached already)
        last_eval = evaluate(state)
    if state.is_main:  # the final adapter, then the summary
        save_adapter(state.model, state.out / "adapter", extra={"train_config": state.cfg.to_dict()})
    return write_summary(state, last_eval, done, t_start)


def _stop_if_signalled(state: TrainState, signals: StopSignals, done: int, pbar, saved: bool) -> None:
    """After a SIGINT / SIGTERM: checkpoint step ``done`` (unless just saved) and raise TrainingInterrupted."""
    if signals.received is None:
        return
    if pbar is not None:
        pbar.close()
    if not saved:
        save(state, done)
    resume = f"riemix train --output-dir {state.out} --resume"
    raise TrainingInterrupted(
        f"{signals.name} received: stopped after step {done} with a checkpoint of it; continue with: {resume}",
        signals.received,
        done,
    )
