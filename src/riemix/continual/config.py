"""``ContinualConfig``: a continual run (``riemix continual``): a task stream, how experts grow, mature,
freeze and replay, and the optimizer, batches and evaluation shared by every task."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from riemix.core.config import DENSE_MODES, MoELoRAConfig
from riemix.core.fields import check_field_types, check_ranges
from riemix.optim import OPTIMIZER_NAMES
from riemix.tasks import MIN_MAX_LENGTH, one_of
from riemix.training.config import _adapter_config

__all__ = ["FREEZE_POLICIES", "GROW_MODES", "RESUME_SAFE_FIELDS", "ContinualConfig", "default_adapter"]

#: When a new task gets new experts: when the novelty detector calls its data a new skill (``auto``), for
#: every task (``always``), or never (a static mixture).
GROW_MODES: tuple[str, ...] = ("auto", "always", "never")
#: Which experts stay frozen: those of every other skill while a skill trains (``past``), the same plus the
#: current skill's once its held-out accuracy stops improving (``auto``; needs ``eval_every``), or none.
FREEZE_POLICIES: tuple[str, ...] = ("past", "auto", "never")
#: Fields a resume may change (the rest define the run and must match the saved config).
RESUME_SAFE_FIELDS: tuple[str, ...] = ("resume", "overwrite", "progress", "save_every", "eval_batch_size")

_POSITIVE_INTS = ("steps_per_task", "batch_size", "eval_batch_size", "novelty_samples", "freeze_patience")
_NON_NEGATIVE_INTS = ("replay_per_task", "eval_every", "save_every", "seed")


def default_adapter() -> MoELoRAConfig:
    """The adapter a stream starts with: one expert of rank 8, top-1, dense while an expert is under 20 steps old."""
    # one expert per skill: the first task trains one expert (top-1), each new skill grows one more
    return MoELoRAConfig(num_experts=1, top_k=1, rank=8, mature_after_steps=20)


@dataclass
class ContinualConfig:
    """A continual run. Every field is a ``riemix continual`` flag and a YAML key.

    Attributes:
        stream: The tasks in order: folder names under ``data_dir`` or paths (each with train.jsonl, test.jsonl
            and optional labels.json).
        data_dir: Folder holding the task folders named in ``stream`` (e.g. the cl_benchmark folder).
        label_words: Label-word overrides, ``task=word1,word2,...`` (one word per class, in class order).
        model: Base model: a built-in name (e.g. ``smollm2-135m``), a local Hugging Face directory or a hub id.
        max_length: Token budget per sequence (int >= 8); prompts are truncated from the left.
        train_subset: Train on a fixed random subset of this many examples per task (seeded by ``seed``); null: all.
        eval_subset: Score a fixed random subset (seed 0) of this many test examples per task; null: all.
        adapter: The MoE-LoRA adapter the stream starts with (``MoELoRAConfig``); in YAML a mapping of its fields.
        grow: New experts for a new task: ``auto`` (when the novelty detector calls it a new skill), ``always`` or
            ``never``.
        new_expert_rank: Rank of a grown expert (int >= 1); null: the adapter's rank.
        novelty_threshold: Base similarity threshold tau0 of the novelty detector (cosine; below it a task is new).
        novelty_delta: How fast the threshold falls with the number of skills k: tau0 - delta*log(1+k) (>= 0).
        novelty_samples: Training texts of a task the detector embeds (int >= 1).
        freeze: Frozen experts: ``past`` (those of every other skill while a skill trains), ``auto`` (also the
            current skill's once its accuracy on a held-out fifth of the task's training examples, at most 100,
            stops improving; needs ``eval_every``) or ``never``.
        freeze_router: Freeze the router rows of frozen experts too.
        skill_routing: Route each example to its skill's experts only: while training, the skill of its task;
            when evaluating, the skill whose detector centroid is nearest to its base-model embedding (needs a
            top-k or top-p ``adapter.routing`` and ``adapter.mature_after_steps`` 0).
        freeze_patience: Evaluations without improvement before ``freeze=auto`` freezes a skill (int >= 1).
        replay_per_task: Exemplars kept per past task (reservoir sampling) and mixed into later tasks (0: no replay).
        replay_ratio: Share of each batch drawn from the replay buffer once it holds a past skill (0..1).
        optimizer: ``radamw`` or ``rsgd`` (Riemannian preconditioned) or ``adamw`` or ``sgd`` (plain).
        lr: Learning rate of the expert factors (>= 0).
        gate_lr: Learning rate of the routers (>= 0); null: ``lr``.
        reg: Ridge term delta of the Riemannian preconditioner (>= 0).
        weight_decay: Weight decay (>= 0).
        steps_per_task: Optimizer steps per task (int >= 1).
        batch_size: Examples per step (int >= 1).
        eval_every: With ``freeze=auto``, evaluate the current task's held-out training examples every this many
            steps (0: no evaluation within a task).
        eval_batch_size: Examples per evaluation batch (int >= 1).
        seed: Random seed of data order, replay and adapter initialisation (int >= 0).
        output_dir: Run directory (config.yaml, state, checkpoint/, results.json, metrics.jsonl, plots).
        save_every: Save a resumable checkpoint every this many steps within a task (0: after each task only).
        resume: Continue the run in ``output_dir`` from its checkpoint (the stream must be the same).
        overwrite: Delete the run already in ``output_dir`` and start a new one.
        progress: Show a progress bar.
    """

    stream: list[str] = field(default_factory=list)
    data_dir: str | None = None
    label_words: list[str] = field(default_factory=list)
    model: str = "smollm2-135m"
    max_length: int = 128
    train_subset: int | None = None
    eval_subset: int | None = 200
    adapter: MoELoRAConfig = field(default_factory=default_adapter)
    grow: str = "auto"
    new_expert_rank: int | None = None
    novelty_threshold: float = 0.95
    novelty_delta: float = 0.005
    novelty_samples: int = 64
    freeze: str = "past"
    freeze_router: bool = False
    skill_routing: bool = False
    freeze_patience: int = 2
    replay_per_task: int = 0
    replay_ratio: float = 0.25
    optimizer: str = "radamw"
    lr: float = 1e-3
    gate_lr: float | None = None
    reg: float = 1e-6
    weight_decay: float = 0.0
    steps_per_task: int = 100
    batch_size: int = 8
    eval_every: int = 0
    eval_batch_size: int = 32
    seed: int = 0
    output_dir: str = "runs/continual"
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> None:
            raise ValueError(f"{name} must be {want}, got {value!r}")

        if isinstance(self.stream, str):  # "a,b,c" from a YAML string or one flag value
            self.stream = [s.strip() for s in self.stream.split(",") if s.strip()]
        self.stream = [s.strip() for entry in self.stream for s in str(entry).split(",") if s.strip()]
        check_field_types(self)
        if not self.stream:
            bad("stream", self.stream, "at least one task (folder names under data_dir, or paths)")
        for name, allowed in (("grow", GROW_MODES), ("freeze", FREEZE_POLICIES)):
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), one_of(allowed))
        check_ranges(
            self,
            positive_ints=_POSITIVE_INTS,
            non_negative_ints=_NON_NEGATIVE_INTS,
            positive_ints_or_none=("train_subset", "eval_subset", "new_expert_rank"),
            non_negative_numbers=("lr", "reg", "weight_decay", "novelty_delta"),
            non_negative_numbers_or_none=("gate_lr",),
        )
        if not -1 <= self.novelty_threshold <= 1:
            bad("novelty_threshold", self.novelty_threshold, "a cosine similarity in [-1, 1]")
        if not 0 <= self.replay_ratio < 1:
            bad("replay_ratio", self.replay_ratio, "in [0, 1)")
        if self.max_length < MIN_MAX_LENGTH:
            bad("max_length", self.max_length, f">= {MIN_MAX_LENGTH}")
        if self.optimizer.lower() not in OPTIMIZER_NAMES:
            bad("optimizer", self.optimizer, f"one of {', '.join(OPTIMIZER_NAMES)}")
        if self.freeze == "auto" and self.eval_every == 0:
            raise ValueError("freeze='auto' needs eval_every >= 1: it freezes a skill whose evaluations stop improving")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
        self.adapter = _adapter_config(self.adapter)
        if self.skill_routing and self.adapter.routing in DENSE_MODES:
            raise ValueError(
                f"skill_routing needs a selecting adapter.routing (top-k or top-p), got {self.adapter.routing!r}: "
                "dense routing mixes every expert into every token"
            )
        if self.skill_routing and self.adapter.mature_after_steps:
            raise ValueError(
                f"skill_routing needs adapter.mature_after_steps 0, got {self.adapter.mature_after_steps}: maturity "
                "routing is dense while an expert is young, which mixes every skill's experts"
            )

    @classmethod
    def field_names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serialisable dict; ``adapter`` is the nested ``MoELoRAConfig.to_dict()``."""
        data = dataclasses.asdict(self)
        data["adapter"] = self.adapter.to_dict()
        return data

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """``field: saved -> now`` for each field (outside ``RESUME_SAFE_FIELDS``) that differs from ``saved``."""
        now = self.to_dict()
        return [
            f"{name}: {saved.get(name)!r} -> {now[name]!r}"
            for name in self.field_names()
            if name not in RESUME_SAFE_FIELDS and saved.get(name) != now[name]
        ]
