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
"""

from riemix.continual.embedding import embed_texts
from riemix.continual.freezing import FREEZE_MODES, FREEZE_REASONS, AutoFreezer
from riemix.continual.novelty import AGGREGATES, REASONS, Decision, NoveltyConfig, NoveltyDetector, adaptive_threshold
from riemix.continual.replay import MIX_MODES, ReplayBuffer, ReplayConfig

__all__ = [
    "AGGREGATES",
    "FREEZE_MODES",
    "FREEZE_REASONS",
    "MIX_MODES",
    "REASONS",
    "AutoFreezer",
    "Decision",
    "NoveltyConfig",
    "NoveltyDetector",
    "ReplayBuffer",
    "ReplayConfig",
    "adaptive_threshold",
    "embed_texts",
]
