"""Continual learning with dynamic experts: detect new skills in incoming data, and replay old ones.

Modules:
    embedding: :func:`embed_texts`, the mean of a model's final hidden state over each text's tokens.
    novelty: :class:`NoveltyDetector` (a skill library of embedding centroids; novel vs known by cosine
        similarity against the adaptive threshold τₖ = τ₀ − δ·log(1 + k)), :class:`NoveltyConfig`,
        :class:`Decision` and :func:`adaptive_threshold`.
    replay: :class:`ReplayBuffer` (per-skill reservoir-sampled exemplars, mixed into later skills'
        batches) and :class:`ReplayConfig`.
    freezing: :class:`AutoFreezer` (freezes a skill's experts after ``patience`` evaluations without
        improvement, via :func:`riemix.freeze_experts`).
    stream: task folders (:func:`load_stream`, :class:`StreamTask`) and how a causal LM answers them.
    config: :class:`ContinualConfig`, a continual run (every field a ``riemix continual`` flag).
    run: :func:`run_continual`, the continual recipe (detect, grow, freeze, train, evaluate per task).
    metrics: :func:`cl_metrics` (Avg, average incremental accuracy, BWT, FWT of an accuracy matrix).
    skills: skill routing (each example to its skill's experts); usage, report, plots, rundir: its outputs.
"""

from riemix.continual.config import FREEZE_POLICIES, GROW_MODES, ContinualConfig
from riemix.continual.embedding import adapters_off, embed_texts
from riemix.continual.freezing import FREEZE_MODES, FREEZE_REASONS, AutoFreezer
from riemix.continual.metrics import cl_metrics
from riemix.continual.novelty import AGGREGATES, REASONS, Decision, NoveltyConfig, NoveltyDetector, adaptive_threshold
from riemix.continual.replay import MIX_MODES, ReplayBuffer, ReplayConfig
from riemix.continual.run import run_continual
from riemix.continual.stream import StreamTask, load_stream

__all__ = [
    "AGGREGATES",
    "FREEZE_MODES",
    "FREEZE_POLICIES",
    "FREEZE_REASONS",
    "GROW_MODES",
    "MIX_MODES",
    "REASONS",
    "AutoFreezer",
    "ContinualConfig",
    "Decision",
    "NoveltyConfig",
    "NoveltyDetector",
    "ReplayBuffer",
    "ReplayConfig",
    "StreamTask",
    "adapters_off",
    "adaptive_threshold",
    "cl_metrics",
    "embed_texts",
    "load_stream",
    "run_continual",
]
