"""riemix.continual.replay: reservoir sampling is uniform and seeded, mix ratios are exact, the state round-trips."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from riemix.continual import ReplayBuffer, ReplayConfig


def buffer(**kwargs) -> ReplayBuffer:
    return ReplayBuffer(ReplayConfig(**kwargs))


def _chi_square(counts: list[int], expected: float) -> float:
    return sum((c - expected) ** 2 / expected for c in counts)


# ---------------------------------------------------------------- reservoir sampling
def test_reservoir_sampling_keeps_every_item_with_the_same_probability():
    """Stream 20 items into a 5-slot reservoir 4000 times (seeds 0..3999): each item is kept with p = 1/4.

    The inclusion counts have expectation 1000 and binomial spread sqrt(4000·p·(1-p)) ≈ 27.4 per item;
    Pearson's statistic over the 20 items is at most a chi-square with 19 degrees of freedom (the
    inclusion events are negatively correlated), whose 0.999 quantile is 43.8. Keeping the first or the
    last five items would score about 60000.
    """
    trials, stream, capacity = 4000, 20, 5
    counts = Counter()
    for seed in range(trials):
        buf = buffer(capacity_per_skill=capacity, seed=seed)
        buf.add(0, range(stream))
        kept = buf.items(0)
        assert len(kept) == capacity == len(set(kept)) and buf.seen(0) == stream
        counts.update(kept)
    expected = trials * capacity / stream
    observed = [counts[i] for i in range(stream)]
    chi2 = _chi_square(observed, expected)
    print(f"\ninclusion counts {observed} (expected {expected:.0f}), chi-square {chi2:.1f}")
    assert chi2 < 43.8
    assert max(abs(c - expected) for c in observed) < 4.5 * (trials * 0.25 * 0.75) ** 0.5
    biased = [trials if i < capacity else 0 for i in range(stream)]  # what keeping the first items gives
    assert _chi_square(biased, expected) > 1000


def test_the_reservoir_is_uniform_over_calls_and_per_skill():
    """Items arriving over many calls are kept as uniformly as in one; each skill has its own reservoir."""
    trials = 3000
    counts = {"a": Counter(), 7: Counter()}
    for seed in range(trials):
        buf = buffer(capacity_per_skill=3, seed=seed)
        for start in range(0, 12, 4):
            buf.add("a", range(start, start + 4))
            buf.add(7, [[i] for i in range(start, start + 4)])
        assert buf.seen("a") == buf.seen(7) == 12 and len(buf) == 6 and buf.skills == ["a", 7]
        counts["a"].update(buf.items("a"))
        counts[7].update(item[0] for item in buf.items(7))
    for skill in counts:
        assert _chi_square([counts[skill][i] for i in range(12)], trials * 3 / 12) < 31.3  # chi2(11) 0.999


def test_a_short_stream_is_kept_whole_and_in_order():
    buf = buffer(capacity_per_skill=10)
    buf.add(0, ["x", "y"])
    buf.add(0, [{"q": "z", "choices": ("a", "b")}])
    assert buf.items(0) == ["x", "y", {"q": "z", "choices": ["a", "b"]}]  # stored as JSON: tuples become lists
    assert buf.items(1) == [] and buf.seen(1) == 0


def test_the_same_seed_gives_the_same_buffer_and_draws():
    def run(seed):
        buf = buffer(capacity_per_skill=8, seed=seed)
        buf.add(0, range(100))
        buf.add(1, range(100, 150))
        return buf.items(0), buf.items(1), buf.sample(6), buf.mix(list(range(200, 216)), ratio=0.25, exclude=1)

    assert run(3) == run(3)
    assert run(3) != run(4)


# ---------------------------------------------------------------- drawing
def test_sample_draws_distinct_items_of_the_skills_not_excluded():
    buf = buffer(capacity_per_skill=5)
    buf.add(0, range(5))
    buf.add(1, range(10, 15))
    drawn = buf.sample(10, random.Random(0))
    assert sorted(drawn) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert set(buf.sample(5, torch.Generator().manual_seed(0), exclude=1)) == {0, 1, 2, 3, 4}
    assert set(buf.sample(5, exclude=[0])) == {10, 11, 12, 13, 14}
    assert buf.sample(0) == [] and buf.sample(0, exclude=[0, 1]) == []
    with_replacement = buf.sample(50, random.Random(1), exclude=0, replace=True)
    assert len(with_replacement) == 50 and set(with_replacement) == {10, 11, 12, 13, 14}
    assert buf.sample(3, random.Random(5)) == buf.sample(3, random.Random(5))


def test_sample_is_uniform_over_the_pool():
    buf = buffer(capacity_per_skill=4)
    buf.add(0, range(4))
    buf.add(1, range(4, 8))
    gen = torch.Generator().manual_seed(0)
    counts = Counter(x for _ in range(2000) for x in buf.sample(2, gen))
    assert _chi_square([counts[i] for i in range(8)], 2000 * 2 / 8) < 24.3  # chi2(7) 0.999


@pytest.mark.parametrize(
    ("size", "ratio", "replayed"),
    [(16, 0.25, 4), (10, 0.5, 5), (8, 0.0, 0), (4, 1.0, 4), (6, 0.25, 2)],  # 1.5 -> 2
)
def test_replace_mode_keeps_the_batch_size_and_the_exact_ratio(size, ratio, replayed):
    buf = buffer(capacity_per_skill=50)
    buf.add("old", [f"old{i}" for i in range(50)])
    batch = [f"new{i}" for i in range(size)]
    mixed = buf.mix(batch, ratio, random.Random(0), exclude="new")
    new = [x for x in mixed if x.startswith("new")]
    assert len(mixed) == size and len(mixed) - len(new) == replayed == round(ratio * size)
    assert new == sorted(new, key=batch.index) and mixed[: len(new)] == new  # kept in order, replay after
    assert len(set(mixed)) == size


@pytest.mark.parametrize(("size", "ratio", "replayed"), [(12, 0.25, 4), (8, 0.5, 8), (6, 0.0, 0), (8, 0.2, 2)])
def test_append_mode_adds_replay_to_make_the_exact_ratio(size, ratio, replayed):
    buf = buffer(capacity_per_skill=50, mode="append", ratio=ratio)
    buf.add(0, range(1000, 1050))
    batch = list(range(size))
    mixed = buf.mix(batch, generator=random.Random(0), exclude=1)
    assert mixed[:size] == batch and len(mixed) == size + replayed
    assert replayed / len(mixed) == ratio and all(x >= 1000 for x in mixed[size:])


def test_append_mode_rounds_half_to_even_when_the_ratio_is_not_reachable():
    buf = buffer(capacity_per_skill=50, mode="append")
    buf.add(0, range(1000, 1050))
    assert len(buf.mix(list(range(10)), ratio=0.2, exclude=1)) == 10 + 2  # 0.2·10/0.8 = 2.5 -> 2
    assert len(buf.mix(list(range(14)), ratio=0.2, exclude=1)) == 14 + 4  # 3.5 -> 4


def test_mix_replays_only_earlier_skills_and_leaves_a_first_skill_alone():
    buf = buffer(capacity_per_skill=4, ratio=0.5)
    batch = ["b0", "b1", "b2", "b3"]
    assert buf.mix(batch, exclude=0) == batch  # nothing stored yet
    buf.add(0, ["s0"])
    assert buf.mix(batch, exclude=0) == batch  # only the current skill is stored
    buf.add(1, ["s1"])
    mixed = buf.mix(batch, exclude=0)
    assert len(mixed) == 4 and mixed[2:] == ["s1", "s1"]  # two slots, one item: drawn with replacement
    assert set(buf.mix(batch, ratio=1.0)) <= {"s0", "s1"}


# ---------------------------------------------------------------- state
def test_state_dict_round_trips_through_json_exactly():
    buf = buffer(capacity_per_skill=6, ratio=0.5, seed=11)
    buf.add(0, [{"question": f"q{i}", "answer": i % 4} for i in range(40)])
    buf.add("arc", list(range(30)))
    state = json.loads(json.dumps(buf.state_dict(), allow_nan=False))
    other = ReplayBuffer()
    other.load_state_dict(state)
    assert other.state_dict() == buf.state_dict()
    assert other.config == buf.config and other.skills == [0, "arc"]  # an int skill stays an int
    for b in (buf, other):
        b.add(0, [{"question": f"q{i}", "answer": 0} for i in range(40, 60)])
    assert other.items(0) == buf.items(0)  # the reservoir continues identically
    assert other.mix(list(range(100, 108)), exclude="arc") == buf.mix(list(range(100, 108)), exclude="arc")
    assert other.sample(4) == buf.sample(4)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("rng"), r"state is missing \['rng'\]"),
        (lambda s: s["config"].update(capacity_per_skill=0), "capacity_per_skill must be an int >= 1"),
        (lambda s: s["skills"].append(dict(s["skills"][0])), "skill 0 appears twice in the state"),
        (lambda s: s["skills"][0].update(skill=1.5), "skill must be an int or a str"),
        (lambda s: s["skills"][0].update(seen=1), "skill 0: 3 items with seen=1"),
        (lambda s: s["skills"][0]["items"].append(9), "skill 0: 4 items with seen=3 and capacity_per_skill=3"),
        (lambda s: s.update(rng=[3, [1, 2], None]), "invalid rng state"),
        (lambda s: s.update(rng=[3]), "invalid rng state"),
    ],
)
def test_load_state_dict_refuses_a_bad_state(edit, match):
    buf = buffer(capacity_per_skill=3)
    buf.add(0, [1, 2, 3])
    state = json.loads(json.dumps(buf.state_dict()))
    edit(state)
    other = ReplayBuffer()
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(state)
    assert other.skills == []  # nothing half-loaded


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity_per_skill": 0}, "capacity_per_skill must be an int >= 1"),
        ({"capacity_per_skill": 2.0}, "capacity_per_skill must be an int >= 1"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"seed": True}, "seed must be an int >= 0"),
        ({"mode": "insert"}, "mode must be one of"),
        ({"ratio": 1.5}, r"ratio must be in \[0, 1\] with mode='replace'"),
        ({"ratio": 1.0, "mode": "append"}, r"ratio must be in \[0, 1\) with mode='append'"),
        ({"ratio": float("nan")}, "ratio must be a finite number"),
        ({"ratio": "0.5"}, "ratio must be a finite number"),
    ],
)
def test_replay_config_names_the_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReplayConfig(**kwargs)


def test_the_buffer_needs_a_replay_config():
    with pytest.raises(ValueError, match="config must be a ReplayConfig, got dict"):
        ReplayBuffer({"capacity_per_skill": 3})


def test_add_refuses_bad_skills_and_items_and_adds_nothing_then():
    buf = buffer()
    with pytest.raises(ValueError, match="skill must be an int or a str, got True"):
        buf.add(True, [1])
    with pytest.raises(ValueError, match="skill must be an int or a str, got None"):
        buf.add(None, [1])
    with pytest.raises(ValueError, match="items must be an iterable of items, got a str"):
        buf.add(0, "abc")
    with pytest.raises(ValueError, match="items must be an iterable of items, got a dict"):
        buf.add(0, {"question": "q"})
    with pytest.raises(ValueError, match="replay items must be JSON-able, got Tensor"):
        buf.add(0, [1, torch.ones(2)])
    with pytest.raises(ValueError, match="replay items must be JSON-able, got float"):
        buf.add(0, [float("nan")])
    assert len(buf) == 0 and buf.seen(0) == 0


def test_sample_and_mix_refuse_bad_arguments():
    buf = buffer(capacity_per_skill=3)
    buf.add(0, [1, 2, 3])
    for n in (-1, 1.0, True):
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            buf.sample(n)
    with pytest.raises(ValueError, match="n=4 items asked for but the replay pool holds 3"):
        buf.sample(4)
    with pytest.raises(ValueError, match="n=1 items asked for but the replay pool holds 0"):
        buf.sample(1, exclude=0, replace=True)
    with pytest.raises(ValueError, match="generator must be a random.Random or torch.Generator, got int"):
        buf.sample(1, generator=0)
    with pytest.raises(ValueError, match="generator must be a random.Random or torch.Generator, got int"):
        buf.mix([1], generator=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        buf.mix([1], mode="insert")
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\) with mode='append'"):
        buf.mix([1], ratio=1.0, mode="append")
    with pytest.raises(ValueError, match="ratio must be a finite number"):
        buf.mix([1], ratio="x")
