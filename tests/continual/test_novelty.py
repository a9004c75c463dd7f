"""riemix.continual.novelty on synthetic embeddings: threshold, decisions, cooldown, min_samples, log, state."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from riemix.continual import Decision, NoveltyConfig, NoveltyDetector, adaptive_threshold

H = 8


def cluster(direction: int, n: int = 16, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """``n`` embeddings ``(n, H)`` around the unit vector of coordinate ``direction``."""
    g = torch.Generator().manual_seed(seed)
    return F.one_hot(torch.tensor(direction), H).float() + noise * torch.randn(n, H, generator=g)  # (n, H)


def detector(**kwargs) -> NoveltyDetector:
    return NoveltyDetector(NoveltyConfig(**{"tau0": 0.8, "delta": 0.1, "min_samples": 4, **kwargs}))


# ---------------------------------------------------------------- the threshold
def test_adaptive_threshold_is_tau0_minus_delta_log1p_k():
    assert adaptive_threshold(0.9, 0.1, 0) == 0.9
    assert adaptive_threshold(0.9, 0.1, 1) == pytest.approx(0.9 - 0.1 * 0.6931471805599453, abs=1e-15)
    assert adaptive_threshold(0.9, 0.1, 3) == pytest.approx(0.9 - 0.1 * 1.3862943611198906, abs=1e-15)
    assert adaptive_threshold(0.5, 0.02, 9) == pytest.approx(0.5 - 0.02 * 2.302585092994046, abs=1e-15)
    assert adaptive_threshold(0.7, 0.0, 100) == 0.7


def test_each_decision_uses_the_threshold_of_the_skills_before_it():
    det = detector()
    thresholds = [det.observe(cluster(d, seed=d)).threshold for d in range(4)]  # four orthogonal skills
    assert det.num_skills == 4
    assert thresholds == [pytest.approx(0.8 - 0.1 * math.log(1 + k), abs=1e-12) for k in range(4)]
    assert det.threshold() == pytest.approx(0.8 - 0.1 * math.log(5), abs=1e-12)


@pytest.mark.parametrize("k", [-1, 1.0, True, "2"])
def test_adaptive_threshold_refuses_a_bad_k(k):
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        adaptive_threshold(0.9, 0.1, k)


# ---------------------------------------------------------------- decisions
def test_first_novel_and_known_decisions_and_the_moving_average():
    det = detector(momentum=0.75)
    first = det.observe(cluster(0), skill_hint="a")
    assert (first.novel, first.skill, first.reason, first.similarities, first.k) == (True, 0, "first", [], 0)
    assert math.isnan(first.score)
    torch.testing.assert_close(det.centroids[0], F.normalize(cluster(0).mean(0), dim=0))

    novel = det.observe(cluster(1, seed=1), skill_hint="b")
    assert (novel.novel, novel.skill, novel.reason, novel.k) == (True, 1, "novel", 1)
    batch_centroid = F.normalize(cluster(1, seed=1).mean(0), dim=0)  # (H,)
    assert novel.similarities[0] == pytest.approx(float(det.centroids[0] @ batch_centroid))
    assert novel.score == novel.similarities[0] < novel.threshold

    before = det.centroids[0].clone()
    batch = cluster(0, seed=2)
    known = det.observe(batch)
    assert (known.novel, known.skill, known.reason) == (False, 0, "known")
    assert known.score == max(known.similarities) >= known.threshold
    want = F.normalize(0.75 * before + 0.25 * F.normalize(batch.mean(0), dim=0), dim=0)
    torch.testing.assert_close(det.centroids[0], want)
    assert det.num_skills == 2 and det.skill_names == ["a", "b"]


def test_median_scores_per_example_similarities_to_the_closest_skill():
    det = detector(aggregate="median", tau0=0.5, delta=0.0)
    det.observe(cluster(0))
    batch = torch.cat([cluster(0, n=5, seed=3), cluster(1, n=4, seed=4)])  # (9, H): 5 near skill 0, 4 far
    per_example = F.normalize(batch, dim=1) @ det.centroids[0]  # (9,), before the decision updates skill 0
    decision = det.observe(batch)
    assert decision.score == pytest.approx(float(per_example.sort().values[4]), abs=1e-6)  # the 5th of 9
    assert decision.score > 0.9 and decision.reason == "known"  # the max rule: centroid cosine below 0.8
    assert decision.similarities[0] < 0.8

    even = detector(aggregate="median", tau0=0.5)
    even.observe(cluster(0))
    pair = torch.stack([cluster(0, n=1, seed=5)[0], cluster(1, n=1, seed=6)[0]] * 2)  # (4, H)
    sims = (F.normalize(pair, dim=1) @ even.centroids[0]).sort().values  # (4,)
    assert sims[1] < sims[2]  # two distinct middle values
    assert even.observe(pair).score == pytest.approx(float(sims[1] + sims[2]) / 2, abs=1e-6)


def test_too_few_samples_changes_nothing():
    det = detector(min_samples=10)
    small = det.observe(cluster(0, n=9))
    assert (small.novel, small.skill, small.reason, det.num_skills) == (False, -1, "too_few_samples", 0)
    det.observe(cluster(0, n=10))
    centroid = det.centroids.clone()
    far = det.observe(cluster(1, n=3))
    assert (far.novel, far.skill, far.reason, det.num_skills) == (False, 0, "too_few_samples", 1)
    assert far.score < far.threshold  # it would have been novel
    near = det.observe(cluster(0, n=3, seed=7))
    assert near.reason == "too_few_samples"
    assert torch.equal(det.centroids, centroid)


def test_no_growth_within_the_cooldown():
    det = detector(cooldown=2)
    det.observe(cluster(0))  # step 0: grown
    reasons = [det.observe(cluster(1, seed=s)).reason for s in range(3)]
    assert reasons == ["cooldown", "cooldown", "novel"]  # steps 1, 2 blocked; step 3 grows
    assert det.num_skills == 2
    assert [det.observe(cluster(d, seed=9)).reason for d in (2, 2, 1)] == ["cooldown", "cooldown", "known"]
    assert det.observe(cluster(2, seed=10)).reason == "novel"


def test_the_cooldown_blocks_growth_but_not_updates_and_add_skill_starts_it():
    det = detector(cooldown=1)
    det.observe(cluster(0))
    centroid = det.centroids.clone()
    blocked = det.observe(cluster(1))
    assert (blocked.novel, blocked.skill, blocked.reason) == (False, 0, "cooldown")
    assert torch.equal(det.centroids, centroid)  # not updated with foreign data
    assert det.add_skill(cluster(2), name="manual") == 1
    assert det.observe(cluster(3)).reason == "cooldown"
    assert det.observe(cluster(3)).reason == "novel"
    assert det.skill_names == [None, "manual", None]

    free = detector(cooldown=0)
    free.add_skill(cluster(0))
    assert free.observe(cluster(1)).reason == "novel"


def test_every_decision_is_logged_and_sent_to_the_callback():
    seen = []
    det = NoveltyDetector(NoveltyConfig(tau0=0.8, delta=0.1, min_samples=4), on_decision=seen.append)
    decisions = [det.observe(cluster(d, seed=d), skill_hint=f"d{d}") for d in (0, 1, 0)]
    assert det.log == seen == [d.to_dict() for d in decisions]
    assert [r["reason"] for r in det.log] == ["first", "novel", "known"]
    assert [r["hint"] for r in det.log] == ["d0", "d1", "d0"] and [r["step"] for r in det.log] == [0, 1, 2]
    assert det.log[0]["score"] is None and det.log[2]["k"] == 2
    assert set(det.log[0]) == {f.name for f in Decision.__dataclass_fields__.values()}
    json.dumps(det.log, allow_nan=False)


# ---------------------------------------------------------------- state
def test_state_dict_round_trips_through_json_and_continues_identically():
    det = detector(cooldown=1, momentum=0.5)
    for d, seed in ((0, 0), (1, 1), (2, 2), (0, 3), (1, 4)):
        det.observe(cluster(d, seed=seed), skill_hint=str(d))
    state = json.loads(json.dumps(det.state_dict(), allow_nan=False))
    other = NoveltyDetector()
    other.load_state_dict(state)
    assert other.config == det.config
    assert torch.equal(other.centroids, det.centroids)
    assert other.log == det.log and other.skill_names == det.skill_names
    assert other.state_dict() == det.state_dict()
    for d, seed in ((3, 5), (3, 6), (2, 7)):
        assert other.observe(cluster(d, seed=seed)) == det.observe(cluster(d, seed=seed))
    assert torch.equal(other.centroids, det.centroids)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("log"), r"state is missing \['log'\]"),
        (lambda s: s["config"].update(tau0=2.0), "tau0 must be in"),
        (lambda s: s["skills"][1].update(centroid=[]), r"skills\[1\].centroid must be a non-empty finite vector"),
        (lambda s: s["skills"][0].update(centroid=[float("nan")] * H), r"skills\[0\].centroid must be a non-empty"),
        (lambda s: s["skills"][1].update(centroid=[1.0, 0.0]), r"skills\[1\].centroid has size 2, expected 8"),
    ],
)
def test_load_state_dict_refuses_a_bad_state(edit, match):
    det = detector()
    det.observe(cluster(0))
    det.observe(cluster(1))
    state = det.state_dict()
    edit(state)
    with pytest.raises(ValueError, match=match):
        NoveltyDetector().load_state_dict(state)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau0": 1.5}, r"tau0 must be in \[-1, 1\]"),
        ({"tau0": float("nan")}, "tau0 must be a finite number"),
        ({"tau0": "0.9"}, "tau0 must be a finite number"),
        ({"delta": -0.1}, "delta must be >= 0"),
        ({"delta": True}, "delta must be a finite number"),
        ({"aggregate": "mean"}, "aggregate must be one of"),
        ({"min_samples": 0}, "min_samples must be an int >= 1"),
        ({"min_samples": 2.0}, "min_samples must be an int >= 1"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
        ({"momentum": float("inf")}, "momentum must be a finite number"),
        ({"cooldown": -1}, "cooldown must be an int >= 0"),
        ({"cooldown": None}, "cooldown must be an int >= 0"),
    ],
)
def test_novelty_config_names_the_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoveltyConfig(**kwargs)


def test_the_detector_needs_a_novelty_config():
    with pytest.raises(ValueError, match="config must be a NoveltyConfig, got dict"):
        NoveltyDetector({"tau0": 0.9})


@pytest.mark.parametrize(
    ("embeddings", "match"),
    [
        (torch.ones(H), r"embeddings must be a 2-D \(n, H\) tensor, got \(8,\)"),
        ([[1.0] * H], r"embeddings must be a 2-D \(n, H\) tensor, got list"),
        (torch.ones(0, H), "embeddings must hold at least one example"),
        (torch.full((4, H), float("nan")), "embeddings must be finite"),
        (torch.ones(4, H + 1), "embeddings have size 9 but the skill library has size 8"),
    ],
)
def test_observe_and_add_skill_refuse_bad_embeddings(embeddings, match):
    det = detector()
    det.observe(cluster(0))
    with pytest.raises(ValueError, match=match):
        det.observe(embeddings)
    with pytest.raises(ValueError, match=match):
        det.add_skill(embeddings)
    assert det.num_skills == 1 and len(det.log) == 1


def test_hints_and_names_must_be_strings():
    det = detector()
    with pytest.raises(ValueError, match="skill_hint must be a str or None, got 3"):
        det.observe(cluster(0), skill_hint=3)
    with pytest.raises(ValueError, match="name must be a str or None, got 3"):
        det.add_skill(cluster(0), name=3)
    assert det.num_skills == 0 and det.log == []
