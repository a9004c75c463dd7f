"""The continual recipe: train a task stream one task after another, growing, freezing and replaying experts.

``run_continual(ContinualConfig(...))`` is the whole loop; read it first. For each task of the stream:

1. **Detect.**  The novelty detector embeds ``novelty_samples`` of the task's training texts with the
   *base* model (adapters off, so every skill is embedded in the same space) and calls the task a new
   skill or a known one (``grow``: ``auto``; ``always`` makes every task new, ``never`` keeps one skill).
2. **Grow.**  A new skill (after the first) gets one new expert per layer (``riemix.grow_experts``: the
   model's outputs do not change, the optimizer keeps every other expert's state).  While it is younger
   than ``adapter.mature_after_steps`` its layers route densely (maturity routing), then top-k.
3. **Freeze.**  ``freeze=past``: the experts of every other skill are frozen while this one trains (a known
   skill's experts are unfrozen to learn it again); ``auto`` also freezes this skill's once its held-out
   accuracy stops improving for ``freeze_patience`` evaluations.
4. **Train** ``steps_per_task`` steps; with ``replay_per_task`` a share ``replay_ratio`` of each batch is
   replayed exemplars of the earlier tasks (a reservoir per task: every task is replayed, also one whose
   skill is the current task's).
5. **Evaluate** every task seen so far and the next one: row k of the accuracy matrix R; then save.

The run directory (``riemix.continual.rundir``) holds config.yaml, results.json (matrix, Avg, average
incremental accuracy, BWT, FWT, experts per layer over time, detector decisions, per-skill expert usage),
metrics.jsonl, the resumable checkpoint/ (after every task and every ``save_every`` steps), the final
adapter/ and plots.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any

import torch

from riemix.continual.config import ContinualConfig
from riemix.continual.embedding import adapters_off, embed_texts
from riemix.continual.freezing import AutoFreezer
from riemix.continual.metrics import cl_metrics
from riemix.continual.novelty import NoveltyConfig, NoveltyDetector
from riemix.continual.replay import ReplayBuffer, ReplayConfig
from riemix.continual.rundir import ContinualRunDir, open_continual_run
from riemix.continual.skills import nearest_skills, per_example, routed, skill_biases
from riemix.continual.stream import label_word_overrides, load_stream, presentation, stream_fingerprint
from riemix.continual.usage import expert_usage, layer_sizes
from riemix.core.freezing import freeze_experts, unfreeze_experts
from riemix.core.schedules import advance_maturity
from riemix.core.state import adapter_state_dict
from riemix.core.tuner import add_moe_lora, iter_moe_lora_layers
from riemix.evaluate import evaluate
from riemix.hub.loading import load_model
from riemix.io.adapter import load_adapter, save_adapter
from riemix.optim import build_optimizer
from riemix.optim.growth import grow_experts
from riemix.tasks import TaskModel, collate_lm, encode_train
from riemix.training.data import batch_at, seed_everything
from riemix.training.logging import MetricsLogger

__all__ = ["add_exemplars", "batch_refs", "run_continual"]


class _Run:
    """Everything a continual run holds between steps (the checkpoint saves all of it)."""

    def __init__(self, cfg: ContinualConfig, model, tokenizer, tasks, log) -> None:
        self.cfg, self.model, self.tokenizer, self.tasks, self.log = cfg, model, tokenizer, tasks, log
        self.views = [presentation(t, tokenizer, cfg.max_length) for t in tasks]  # (train, test, spec)
        self.holdout = [None] * len(tasks)  # freeze="auto": training examples held out to judge convergence
        if cfg.freeze == "auto":
            for k, (train, test, spec) in enumerate(self.views):
                held, rest = _split_holdout(train, cfg.seed + k)
                self.views[k], self.holdout[k] = (rest, test, spec), held
        self.items = [[encode_train(ex, spec, tokenizer) for ex in train.examples] for train, _, spec in self.views]
        self.task_model = TaskModel(model, "causal_lm")
        self.device = next(model.parameters()).device
        self.detector = NoveltyDetector(
            NoveltyConfig(tau0=cfg.novelty_threshold, delta=cfg.novelty_delta, min_samples=min(8, cfg.novelty_samples))
        )
        self.replay = ReplayBuffer(
            ReplayConfig(capacity_per_skill=max(1, cfg.replay_per_task), ratio=cfg.replay_ratio, seed=cfg.seed)
        )
        self.freezer = AutoFreezer(cfg.freeze_patience, 0.0, model=model, router=cfg.freeze_router)
        self.optimizer = None
        # progress, saved in the checkpoint's state
        self.task, self.step, self.global_step = 0, 0, 0
        self.matrix: list[list[float | None]] = []
        self.zero_shot: list[float] = []
        self.skill_of_task: list[int] = []
        self.skill_experts: dict[int, dict[str, list[int]]] = {}
        self.experts_history: list[dict[str, Any]] = []
        self.usage: dict[str, dict[str, list[float]]] = {}
        self.decisions: list[dict[str, Any]] = []
        self.growth: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.test_embeddings: dict[int, torch.Tensor] = {}  # skill routing: base embeddings of each test set

    def build_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(
            self.model, cfg.optimizer, lr=cfg.lr, gate_lr=cfg.gate_lr, reg=cfg.reg, weight_decay=cfg.weight_decay
        )

    # --------------------------------------------------------------- state
    def progress_state(self) -> dict[str, Any]:
        keys = (
            "task",
            "step",
            "global_step",
            "matrix",
            "zero_shot",
            "skill_of_task",
            "experts_history",
            "usage",
            "decisions",
            "growth",
            "seconds",
        )
        state = {k: getattr(self, k) for k in keys}
        state["skill_experts"] = {str(k): v for k, v in self.skill_experts.items()}
        return state

    def load_progress(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key != "skill_experts":
                setattr(self, key, value)
        self.skill_experts = {int(k): v for k, v in state["skill_experts"].items()}


def _split_holdout(train, seed: int):
    """``(held out, rest)``: a seeded fifth of ``train`` (at most 100 examples, at least 1) and the others."""
    n = max(1, min(100, len(train) // 5))
    chosen = set(random.Random(seed).sample(range(len(train)), n))
    held = replace(train, examples=[ex for i, ex in enumerate(train.examples) if i in chosen])
    return held, replace(train, examples=[ex for i, ex in enumerate(train.examples) if i not in chosen])


def _all_experts(model) -> dict[str, list[int]]:
    return {name: list(range(layer.num_experts)) for name, layer in iter_moe_lora_layers(model)}


# ---------------------------------------------------------------- the stages of a task
def _detect(run: _Run, k: int) -> tuple[int, bool]:
    """The task's skill and whether it is new (``grow``); logs the decision."""
    cfg, task = run.cfg, run.tasks[k]
    train = run.views[k][0]
    texts = [getattr(ex, "text", None) or ex.question for ex in train.examples]
    texts = random.Random(cfg.seed + k).sample(texts, min(cfg.novelty_samples, len(texts)))
    with adapters_off(run.model):
        emb = embed_texts(run.model, run.tokenizer, texts, max_length=cfg.max_length)  # (n, H)
    decision = run.detector.observe(emb, skill_hint=task.name)
    record = {"task": task.name, **decision.to_dict()}
    if decision.skill < 0:  # the first task with too few samples to decide: it starts the library anyway
        record.update(skill=run.detector.add_skill(emb, task.name), novel=True)
    elif cfg.grow == "always" and k > 0 and not decision.novel:  # every task its own skill
        record.update(reason="always", skill=run.detector.add_skill(emb, task.name), novel=True)
    elif cfg.grow == "never":
        record.update(skill=0, novel=k == 0)
    run.decisions.append(record)
    run.log(
        f"task {k + 1} {task.name}: {record['reason']} (skill {record['skill']}, "
        f"similarities {[round(s, 3) for s in record['similarities']]}, threshold {record['threshold']:.3f})"
    )
    return int(record["skill"]), bool(record["novel"])


def _assign_experts(run: _Run, k: int, skill: int, novel: bool) -> None:
    """Grow a new skill's experts (after the first task), then freeze or unfreeze per ``cfg.freeze``."""
    cfg, model = run.cfg, run.model
    if k == 0 or run.cfg.grow == "never":
        run.skill_experts.setdefault(skill, _all_experts(model))
    elif novel:
        t0 = time.perf_counter()
        grown = grow_experts(model, run.optimizer, rank=cfg.new_expert_rank)
        run.skill_experts[skill] = {name: [index] for name, index in grown.items()}
        run.growth.append(
            {"task": run.tasks[k].name, "skill": skill, "layers": len(grown), "seconds": time.perf_counter() - t0}
        )
        run.log(f"grew one expert in {len(grown)} layers in {time.perf_counter() - t0:.3f} s")
    if cfg.freeze == "never":
        return
    mine = run.skill_experts[skill]
    others = {
        name: [i for i in range(layer.num_experts) if i not in mine.get(name, [])]
        for name, layer in iter_moe_lora_layers(model)
    }
    freeze_experts(model, {n: v for n, v in others.items() if v}, router=cfg.freeze_router)
    if run.freezer.best(run.tasks[k].name) is None:  # a skill auto-frozen before stays frozen
        unfreeze_experts(model, mine)


def batch_refs(
    cfg: ContinualConfig, k: int, step: int, n_items: int, replay: ReplayBuffer | None = None
) -> list[list[int]]:
    """``[[task, example], ...]``: step ``step``'s batch of task ``k`` (a seeded permutation per epoch of its
    ``n_items`` examples), with replayed exemplars of the other tasks mixed in (``cfg.replay_ratio``) when
    ``replay`` holds any.  Every candidate of a comparison draws the same batches.
    """
    chunk = batch_at(list(range(n_items)), step, cfg.batch_size, cfg.seed + 1009 * k)
    refs = [[k, i] for i in chunk]
    if replay is not None and cfg.replay_per_task and len(replay):
        refs = replay.mix(refs, generator=random.Random(cfg.seed * 7919 + 104729 * k + step), exclude=k)
    return refs


def add_exemplars(cfg: ContinualConfig, replay: ReplayBuffer, k: int, n_items: int) -> None:
    """Offer every example of task ``k`` (in a seeded order) to its reservoir."""
    order = random.Random(cfg.seed + 31 * k).sample(range(n_items), n_items)
    replay.add(k, [[k, i] for i in order])


def _batch(run: _Run, k: int, step: int) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Step ``step``'s batch of task ``k``, with replayed exemplars of earlier tasks mixed in, and with
    ``skill_routing`` each example's routing bias (its task's skill)."""
    refs = batch_refs(run.cfg, k, step, len(run.items[k]), run.replay)
    batch = collate_lm([run.items[t][i] for t, i in refs], run.tokenizer.pad_token_id)
    biases = None
    if run.cfg.skill_routing:
        biases = per_example([_skill_bias(run, run.skill_of_task[t]) for t, _ in refs])  # {layer: (B, E)}
    return {key: value.to(run.device) for key, value in batch.items()}, biases


def _skill_bias(run: _Run, skill: int) -> dict[str, torch.Tensor]:
    return skill_biases(run.model, run.skill_experts[skill])


def _train_step(run: _Run, k: int) -> float:
    batch, biases = _batch(run, k, run.step)
    targets = max(TaskModel.num_targets(batch), 1)
    with routed(run.model, biases):
        loss = run.task_model(batch, mode="loss_sum") / targets
    if not torch.isfinite(loss):
        raise RuntimeError(f"task {run.tasks[k].name!r} step {run.step + 1}: the loss is {loss.item()}; lower lr")
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.global_step += 1
    advance_maturity(run.model, run.global_step)  # dense routing until new experts mature
    return loss.item()


def _accuracy(run: _Run, i: int) -> float:
    """Task ``i``'s test accuracy; with ``skill_routing`` each example goes to the experts of its nearest skill."""
    _, test, spec = run.views[i]
    cfg = run.cfg
    if not cfg.skill_routing or not run.skill_experts:
        return float(evaluate(run.task_model, test, spec, run.tokenizer, cfg.eval_batch_size, run.device)["accuracy"])
    if i not in run.test_embeddings:  # the base model's embeddings: computed once per task
        texts = [getattr(ex, "text", None) or ex.question for ex in test.examples]
        with adapters_off(run.model):
            run.test_embeddings[i] = embed_texts(run.model, run.tokenizer, texts, max_length=cfg.max_length)
    known = sorted(run.skill_experts)
    nearest = nearest_skills(run.test_embeddings[i], run.detector.centroids[known])
    hits = 0.0
    for position, skill in enumerate(known):
        chosen = [j for j, p in enumerate(nearest) if p == position]
        if chosen:
            part = replace(test, examples=[test.examples[j] for j in chosen])
            with routed(run.model, _skill_bias(run, skill)):
                acc = evaluate(run.task_model, part, spec, run.tokenizer, cfg.eval_batch_size, run.device)["accuracy"]
            hits += acc * len(chosen)
    return hits / len(test)


def _finish_task(run: _Run, k: int, skill: int, logger: MetricsLogger) -> None:
    """Replay exemplars, row k of the accuracy matrix, experts per layer and per-skill usage."""
    cfg = run.cfg
    if cfg.replay_per_task:
        add_exemplars(cfg, run.replay, k, len(run.items[k]))
    row: list[float | None] = [None] * len(run.tasks)
    for i in range(min(k + 2, len(run.tasks))):  # every task seen so far, and the next one
        row[i] = _accuracy(run, i)
    run.matrix.append(row)
    run.experts_history.append({"task": run.tasks[k].name, **layer_sizes(run.model)})
    for i in range(k + 1):  # under skill routing: the routing of the task's own skill
        bias = _skill_bias(run, run.skill_of_task[i]) if cfg.skill_routing else None
        with routed(run.model, bias):
            run.usage[run.tasks[i].name] = expert_usage(run.model, run.items[i][:16], run.tokenizer, run.device)
    shown = ", ".join(f"{run.tasks[i].name} {row[i]:.3f}" for i in range(len(row)) if row[i] is not None)
    run.log(f"after task {k + 1} {run.tasks[k].name}: {shown}")
    logger.record(
        {"step": run.global_step, "event": "task_end", "task": run.tasks[k].name, "index": k, "accuracy": row}
    )


def _maybe_auto_freeze(run: _Run, k: int, skill: int, logger: MetricsLogger) -> None:
    if run.cfg.freeze != "auto" or not run.cfg.eval_every or run.step % run.cfg.eval_every:
        return
    _, _, spec = run.views[k]
    bias = _skill_bias(run, skill) if run.cfg.skill_routing else None
    with routed(run.model, bias):  # training examples held out of this task (never its test split)
        metrics = evaluate(run.task_model, run.holdout[k], spec, run.tokenizer, run.cfg.eval_batch_size, run.device)
    value = float(metrics["accuracy"])
    frozen = run.freezer.update(run.tasks[k].name, run.skill_experts[skill], value)
    logger.record(
        {
            "step": run.global_step,
            "event": "eval",
            "task": run.tasks[k].name,
            "task_step": run.step,
            "accuracy": value,
            "frozen": frozen,
        }
    )
    if frozen:
        run.log(f"auto-froze the experts of {run.tasks[k].name} at step {run.step} (accuracy {value:.3f})")


# ---------------------------------------------------------------- the loop
def run_continual(cfg: ContinualConfig, model=None, tokenizer=None, log=print) -> dict[str, Any]:
    """Train ``cfg.stream`` task after task and write the run directory; returns results.json's content.

    Args:
        cfg: the run's configuration.
        model: an already-loaded base model without adapters (else ``cfg.model`` is loaded).
        tokenizer: its tokenizer.
        log: where progress lines go (``print``).

    Raises:
        ValueError: a bad option, an output directory in use (without ``resume``/``overwrite``), or a resume
            with another stream or configuration (each difference named).
        riemix.data.DataError: a stream entry that does not exist or a malformed task file.
    """
    tasks = load_stream(cfg.stream, cfg.data_dir, label_word_overrides(cfg.label_words), cfg.eval_subset)
    if cfg.train_subset:
        tasks = [replace(t, train=t.train.subset(min(cfg.train_subset, len(t.train)), seed=cfg.seed)) for t in tasks]
    with open_continual_run(cfg, stream_fingerprint(tasks), log) as rundir:
        if model is None:
            model, tokenizer = load_model(cfg.model)
        seed_everything(cfg.seed)
        checkpoint = rundir.read_checkpoint() if cfg.resume else None
        if checkpoint is None:
            add_moe_lora(model, replace(cfg.adapter))
        else:
            load_adapter(model, rundir.checkpoint_adapter)
        run = _Run(cfg, model, tokenizer, tasks, log)
        run.build_optimizer()
        if checkpoint is not None:
            rundir.restore(checkpoint, run)
            log(
                f"resumed at task {run.task + 1} ({tasks[run.task].name if run.task < len(tasks) else 'done'}), "
                f"step {run.step}"
            )
        return _loop(run, rundir)


def _loop(run: _Run, rundir: ContinualRunDir) -> dict[str, Any]:
    cfg = run.cfg
    logger = MetricsLogger(rundir.path / "metrics.jsonl")
    try:
        if not run.zero_shot:  # R[0]: the untrained model on every task (forward transfer's reference)
            run.zero_shot = [_accuracy(run, i) for i in range(len(run.tasks))]
            logger.record({"step": 0, "event": "zero_shot", "accuracy": run.zero_shot})
        while run.task < len(run.tasks):
            k, t0 = run.task, time.time()
            if run.step == 0 and len(run.skill_of_task) == k:
                skill, novel = _detect(run, k)
                _assign_experts(run, k, skill, novel)
                run.skill_of_task.append(skill)
            skill = run.skill_of_task[k]
            bar = _bar(cfg, run, k)
            while run.step < cfg.steps_per_task:
                loss = _train_step(run, k)
                logger.record({"step": run.global_step, "task": run.tasks[k].name, "task_step": run.step, "loss": loss})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                _maybe_auto_freeze(run, k, skill, logger)
                if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.steps_per_task:
                    run.seconds += time.time() - t0
                    t0 = time.time()
                    rundir.save(run)
            if bar is not None:
                bar.close()
            _finish_task(run, k, skill, logger)
            run.task, run.step = k + 1, 0
            run.seconds += time.time() - t0
            rundir.save(run)
            rundir.write_results(run, _results(run))
        save_adapter(run.model, rundir.path / "adapter", extra={"stream": cfg.stream})
        results = _results(run)
        rundir.write_results(run, results, final=True)
        return results
    finally:
        logger.close()


def _bar(cfg: ContinualConfig, run: _Run, k: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.steps_per_task,
        initial=run.step,
        desc=f"task {k + 1}/{len(run.tasks)} {run.tasks[k].name}",
        unit="step",
        leave=False,
        dynamic_ncols=True,
    )


def _results(run: _Run) -> dict[str, Any]:
    """results.json: the matrix and, once every task is done, the continual-learning metrics."""
    done = len(run.matrix)
    square = [row[:done] for row in run.matrix]
    metrics = cl_metrics(square, run.zero_shot) if done else {}
    return {
        "stream": [t.name for t in run.tasks],
        "tasks_done": done,
        "matrix": run.matrix,
        "zero_shot": run.zero_shot,
        **metrics,
        "experts": run.experts_history,
        "skills": {run.tasks[k].name: s for k, s in enumerate(run.skill_of_task)},
        "skill_experts": {str(s): e for s, e in run.skill_experts.items()},
        "decisions": run.decisions,
        "growth": run.growth,
        "usage": run.usage,
        "frozen_skills": run.freezer.frozen_skills,
        "trainable_params": sum(t.numel() for t in adapter_state_dict(run.model).values()),
        "seconds": run.seconds,
    }
