"""Novelty detection for dynamic experts: is a batch of incoming data a new skill, or one already learned?

A :class:`NoveltyDetector` keeps a *skill library*: one L2-normalised centroid per skill in the space
of a model's final hidden state. Data is embedded by :meth:`NoveltyDetector.embed` (per example: the
mean of ``model.base_model(...).last_hidden_state`` over its non-padding tokens; for a Llama causal LM
that state comes after the final RMSNorm, for a BERT encoder after the last layer's LayerNorm).
:meth:`NoveltyDetector.observe` then compares a batch of such embeddings with the library by cosine
similarity and decides, against the adaptive threshold

    τₖ = τ₀ − δ·log(1 + k),    k = number of skills in the library,

whether the batch is novel (a new skill is grown) or known (the best skill's centroid moves towards
the batch by a moving average). The threshold falls as the library grows, so growing gets harder.

Similarity scales depend on the embedding model: the mean hidden states of a decoder LM are highly
anisotropic (on SmolLM2-135M, two disjoint SST-2 samples of 32 sentences reach cosine 0.994 and SST-2
against ARC-Easy questions 0.909), those of a sentence encoder are not (all-MiniLM-L6-v2: 0.846 and
0.079). Calibrate ``tau0`` for the model and the kind of data: ``benchmarks/novelty_margin.py`` measures,
on train texts, how similar two samples of one task and samples of two different tasks come out.  On
SmolLM2-135M and the nine cl_benchmark tasks, with 64 texts per centroid, two samples of one task never fell
below 0.989 and two different tasks reached up to 0.979, so the default 0.95 (set before that measurement)
calls some different tasks one skill (19 % of the different-task pairs drawn) and 0.985 separates them all
there.  ``aggregate="median"`` needs a lower ``tau0``: per-example similarities are lower than a centroid's.

Every decision is appended to :attr:`NoveltyDetector.log` (a list of JSON-able dicts) and passed to
the optional ``on_decision`` callback; :meth:`NoveltyDetector.state_dict` holds the library, the
counters and the log as plain JSON-able data so that it is saved with a run.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from riemix.continual.embedding import embed_texts

__all__ = ["AGGREGATES", "REASONS", "Decision", "NoveltyConfig", "NoveltyDetector", "adaptive_threshold"]

#: How :meth:`NoveltyDetector.observe` turns similarities into one score (see :class:`NoveltyConfig`).
AGGREGATES = ("max", "median")
#: Why a decision came out as it did (``Decision.reason``).
REASONS = ("first", "novel", "known", "cooldown", "too_few_samples")


def adaptive_threshold(tau0: float, delta: float, k: int) -> float:
    """The novelty threshold τₖ = τ₀ − δ·log(1 + k) with ``k`` skills in the library.

    Args:
        tau0: τ₀, the threshold with an empty library.
        delta: δ >= 0, how fast the threshold falls as skills accumulate.
        k: Number of skills so far (>= 0).

    Returns:
        τₖ; a score below it is novel.

    Raises:
        ValueError: If ``k`` is negative or not an int.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    return tau0 - delta * math.log1p(k)


@dataclass
class NoveltyConfig:
    """Settings of a :class:`NoveltyDetector`.

    Attributes:
        tau0: τ₀ in [-1, 1], the cosine threshold with an empty library (see :func:`adaptive_threshold`).
        delta: δ >= 0 in τₖ = τ₀ − δ·log(1 + k).
        aggregate: How a batch of n embeddings ``e_i`` is scored against the skill centroids ``μ_j``
            (all L2-normalised); ``c`` is the L2-normalised mean of the raw embeddings and
            ``s_j = cos(c, μ_j)`` the per-skill similarities (always reported).

            * ``"max"``: score = max_j s_j, the batch centroid's similarity to its closest skill.
            * ``"median"``: with j* = argmax_j s_j, score = median_i cos(e_i, μ_j*), the median over
              the examples of their similarity to the closest skill's centroid (the mean of the two
              middle values for even n). Robust to a few outliers, but per-example similarities are
              lower than the centroid's, so it needs a lower ``tau0``.

            In both modes the decision's skill is j*.
        min_samples: A batch needs at least this many examples (>= 1) for a decision; smaller ones
            are logged as ``"too_few_samples"`` and change nothing.
        momentum: m in [0, 1]: a known batch moves its skill's centroid to
            normalize(m·μ_j + (1 − m)·c). 0 replaces the centroid, 1 freezes it.
        cooldown: After a growth, the next ``cooldown`` (>= 0) observations cannot grow a skill; a
            novel score among them is logged as ``"cooldown"`` and assigned to the closest skill
            without updating it.
    """

    tau0: float = 0.95
    delta: float = 0.005
    aggregate: str = "max"
    min_samples: int = 8
    momentum: float = 0.9
    cooldown: int = 0

    def __post_init__(self) -> None:
        for name in ("tau0", "delta", "momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if not -1.0 <= self.tau0 <= 1.0:
            raise ValueError(f"tau0 must be in [-1, 1], got {self.tau0!r}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        for name, low in (("min_samples", 1), ("cooldown", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum!r}")


@dataclass
class Decision:
    """The outcome of one :meth:`NoveltyDetector.observe`.

    Attributes:
        novel: Whether a new skill was grown for the batch.
        skill: The new skill's index when ``novel``, else the closest skill's (-1 with an empty library).
        similarities: ``s_j``, the batch centroid's cosine similarity to each skill centroid before the
            decision (empty with an empty library).
        threshold: τₖ with the k skills before the decision.
        score: The aggregated similarity compared with ``threshold`` (NaN with an empty library).
        k: Number of skills before the decision.
        reason: One of :data:`REASONS`: ``"first"`` (empty library: grown), ``"novel"`` (score < τₖ:
            grown), ``"known"`` (score >= τₖ: centroid updated), ``"cooldown"`` (score < τₖ within the
            cooldown: not grown, nothing updated), ``"too_few_samples"`` (nothing compared or updated).
        n: Number of examples in the batch.
        step: 0-based index of the observation.
        hint: The ``skill_hint`` passed to :meth:`NoveltyDetector.observe`, if any.
    """

    novel: bool
    skill: int
    similarities: list[float]
    threshold: float
    score: float
    k: int
    reason: str
    n: int
    step: int
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The decision as a JSON-able dict (a NaN score becomes ``None``)."""
        out = dataclasses.asdict(self)
        out["score"] = None if math.isnan(self.score) else self.score
        return out


@dataclass
class _Skill:
    centroid: torch.Tensor  # (H,) float32, unit norm
    name: str | None
    count: int


@dataclass
class NoveltyDetector:
    """Grows a library of skill centroids from batches of embeddings and decides novel vs known.

    Args:
        config: The thresholds and options; the defaults of :class:`NoveltyConfig` when omitted.
        on_decision: Called with each decision's dict (:meth:`Decision.to_dict`) after it is logged.

    Attributes:
        log: One dict per :meth:`observe`, in order (:meth:`Decision.to_dict`).
    """

    config: NoveltyConfig = field(default_factory=NoveltyConfig)
    on_decision: Callable[[dict[str, Any]], object] | None = None
    log: list[dict[str, Any]] = field(default_factory=list, init=False)
    _skills: list[_Skill] = field(default_factory=list, init=False, repr=False)
    _steps: int = field(default=0, init=False, repr=False)
    _last_growth: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, NoveltyConfig):
            raise ValueError(f"config must be a NoveltyConfig, got {type(self.config).__name__}")

    # ------------------------------------------------------------------ the library
    @property
    def num_skills(self) -> int:
        """k, the number of skills in the library."""
        return len(self._skills)

    @property
    def centroids(self) -> torch.Tensor:
        """The skill centroids, a ``(k, H)`` float32 copy (``(0, 0)`` with an empty library)."""
        if not self._skills:
            return torch.zeros(0, 0)
        return torch.stack([s.centroid for s in self._skills])  # (k, H)

    @property
    def skill_names(self) -> list[str | None]:
        """The name of each skill (the hint it was grown with, or ``None``)."""
        return [s.name for s in self._skills]

    def threshold(self) -> float:
        """τₖ for the current library size k."""
        return adaptive_threshold(self.config.tau0, self.config.delta, self.num_skills)

    def add_skill(self, embeddings: torch.Tensor, name: str | None = None) -> int:
        """Add a skill whose centroid is the normalised mean of ``embeddings``, and start the cooldown.

        Args:
            embeddings: ``(n, H)`` embeddings of the skill's data, n >= 1.
            name: Optional name of the skill.

        Returns:
            The new skill's index.

        Raises:
            ValueError: If ``name`` is not a str or None, or ``embeddings`` is not a finite ``(n, H)``
                tensor with n >= 1, or its H differs from the library's.
        """
        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a str or None, got {name!r}")
        emb = self._check_embeddings(embeddings)  # (n, H)
        self._skills.append(_Skill(F.normalize(emb.mean(0), dim=0), name, emb.shape[0]))  # centroid (H,)
        self._last_growth = self._steps - 1  # the last observation so far (-1 before any)
        return self.num_skills - 1

    # ------------------------------------------------------------------ decisions
    def observe(self, embeddings: torch.Tensor, skill_hint: str | None = None) -> Decision:
        """Decide whether a batch is a new skill, grow or update the library, and log the decision.

        Args:
            embeddings: ``(n, H)`` embeddings of the batch (e.g. from :meth:`embed`).
            skill_hint: A label of the data, if the caller knows one: logged, and the name of a skill
                grown from the batch. It does not influence the decision.

        Returns:
            The :class:`Decision` (also appended to :attr:`log` as a dict).

        Raises:
            ValueError: If ``skill_hint`` is not a str or None, or ``embeddings`` is not a finite ``(n, H)``
                tensor with n >= 1, or its H differs from the library's.
        """
        cfg = self.config
        if skill_hint is not None and not isinstance(skill_hint, str):
            raise ValueError(f"skill_hint must be a str or None, got {skill_hint!r}")
        emb = self._check_embeddings(embeddings)  # (n, H)
        step, k, tau = self._steps, self.num_skills, self.threshold()
        self._steps += 1
        batch = F.normalize(emb.mean(0), dim=0)  # (H,)
        sims: list[float] = []
        best, score = -1, math.nan
        if k:
            lib = self.centroids  # (k, H)
            sim_t = lib @ batch  # (k,)
            sims = [float(s) for s in sim_t]
            best = int(sim_t.argmax())
            if cfg.aggregate == "max":
                score = sims[best]
            else:
                per_example = F.normalize(emb, dim=1) @ lib[best]  # (n,)
                score = float(statistics.median(per_example.tolist()))
        if emb.shape[0] < cfg.min_samples:
            reason = "too_few_samples"
        elif k == 0:
            reason = "first"
        elif score >= tau:
            reason = "known"
        elif self._last_growth is not None and step - self._last_growth <= cfg.cooldown:
            reason = "cooldown"
        else:
            reason = "novel"
        skill = best
        if reason in ("first", "novel"):
            skill = self.add_skill(emb, skill_hint)  # the growth happens at this step
        elif reason == "known":
            self._update(best, batch, emb.shape[0])
        decision = Decision(
            novel=reason in ("first", "novel"),
            skill=skill,
            similarities=sims,
            threshold=tau,
            score=score,
            k=k,
            reason=reason,
            n=emb.shape[0],
            step=step,
            hint=skill_hint,
        )
        record = decision.to_dict()
        self.log.append(record)
        if self.on_decision is not None:
            self.on_decision(dict(record))
        return decision

    def _update(self, skill: int, batch: torch.Tensor, n: int) -> None:
        """Move a skill's centroid towards a batch centroid ``(H,)`` by the configured momentum."""
        entry, m = self._skills[skill], self.config.momentum
        entry.centroid = F.normalize(m * entry.centroid + (1.0 - m) * batch, dim=0)  # (H,)
        entry.count += n

    def _check_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings`` as a detached float32 CPU ``(n, H)`` tensor, after checking it."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            got = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a 2-D (n, H) tensor, got {got}")
        if embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
            raise ValueError(f"embeddings must hold at least one example of size >= 1, got {tuple(embeddings.shape)}")
        emb = embeddings.detach().to("cpu", torch.float32)  # (n, H)
        if not torch.isfinite(emb).all():
            raise ValueError("embeddings must be finite (found NaN or inf)")
        size = self._skills[0].centroid.shape[0] if self._skills else emb.shape[1]
        if emb.shape[1] != size:
            raise ValueError(f"embeddings have size {emb.shape[1]} but the skill library has size {size}")
        return emb

    # ------------------------------------------------------------------ embedding
    #: :func:`riemix.continual.embedding.embed_texts`: ``(model, tokenizer, texts, batch_size, max_length)``
    #: -> ``(n, H)`` mean-pooled final hidden states, the input of :meth:`observe` and :meth:`add_skill`.
    embed = staticmethod(embed_texts)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The library, counters, log and config as JSON-able data (floats are exact float32 values)."""
        return {
            "config": dataclasses.asdict(self.config),
            "skills": [{"centroid": s.centroid.tolist(), "name": s.name, "count": s.count} for s in self._skills],
            "steps": self._steps,
            "last_growth": self._last_growth,
            "log": [dict(r) for r in self.log],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the config too), replacing the current library and log.

        Raises:
            ValueError: If ``state`` lacks a key, holds an invalid config, or its centroids are not
                finite vectors of one size.
        """
        missing = {"config", "skills", "steps", "last_growth", "log"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        config = NoveltyConfig(**state["config"])
        skills = []
        for i, entry in enumerate(state["skills"]):
            centroid = torch.tensor(entry["centroid"], dtype=torch.float32)  # (H,)
            if centroid.dim() != 1 or not centroid.numel() or not torch.isfinite(centroid).all():
                raise ValueError(f"skills[{i}].centroid must be a non-empty finite vector")
            size = skills[0].centroid.numel() if skills else centroid.numel()
            if centroid.numel() != size:
                raise ValueError(f"skills[{i}].centroid has size {centroid.numel()}, expected {size}")
            skills.append(_Skill(centroid, entry["name"], int(entry["count"])))
        self.config, self._skills = config, skills
        self._steps, self._last_growth = int(state["steps"]), state["last_growth"]
        self.log = [dict(r) for r in state["log"]]
