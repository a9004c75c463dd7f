"""ContinualConfig validation: each bad field is named with its value."""

import pytest

from riemix.continual.config import ContinualConfig


def test_a_comma_separated_stream_is_split_and_the_default_adapter_starts_with_one_expert():
    cfg = ContinualConfig(stream=["a,b", "c"])
    assert cfg.stream == ["a", "b", "c"]
    assert cfg.adapter.num_experts == 1 and cfg.adapter.top_k == 1 and cfg.adapter.mature_after_steps == 20


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stream": []}, r"stream must be at least one task"),
        ({"grow": "sometimes"}, r"grow must be 'auto', 'always' or 'never', got 'sometimes'"),
        ({"freeze": "all"}, r"freeze must be 'past', 'auto' or 'never', got 'all'"),
        ({"freeze": "auto"}, r"freeze='auto' needs eval_every >= 1"),
        ({"new_expert_rank": 0}, r"new_expert_rank must be an int >= 1 or null, got 0"),
        ({"steps_per_task": 0}, r"steps_per_task must be an int >= 1, got 0"),
        ({"replay_per_task": -1}, r"replay_per_task must be an int >= 0, got -1"),
        ({"replay_ratio": 1.0}, r"replay_ratio must be in \[0, 1\), got 1.0"),
        ({"novelty_threshold": 1.5}, r"novelty_threshold must be a cosine similarity in \[-1, 1\], got 1.5"),
        ({"lr": -1.0}, r"lr must be >= 0 and finite, got -1.0"),
        ({"gate_lr": float("inf")}, r"gate_lr must be >= 0 and finite, or null, got inf"),
        ({"max_length": 4}, r"max_length must be >= 8, got 4"),
        ({"optimizer": "lion"}, r"optimizer must be one of .*, got 'lion'"),
        ({"resume": True, "overwrite": True}, r"resume and overwrite exclude each other"),
        ({"adapter": {"rank": 0}}, r"adapter\.rank"),
    ],
)
def test_bad_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContinualConfig(**{"stream": ["a"], **kwargs})


def test_differences_name_each_changed_field_outside_the_resume_safe_ones():
    saved = ContinualConfig(stream=["a"], lr=1e-3).to_dict()
    now = ContinualConfig(stream=["a"], lr=2e-3, progress=False, save_every=5)
    assert now.differences(saved) == ["lr: 0.001 -> 0.002"]


def test_skill_routing_needs_a_selecting_routing_without_maturity():
    with pytest.raises(
        ValueError, match=r"skill_routing needs a selecting adapter.routing \(top-k or top-p\), got 'dense'"
    ):
        ContinualConfig(stream=["a"], skill_routing=True, adapter={"routing": "dense", "mature_after_steps": 0})
    with pytest.raises(ValueError, match=r"skill_routing needs adapter.mature_after_steps 0, got 20"):
        ContinualConfig(stream=["a"], skill_routing=True)
    assert ContinualConfig(stream=["a"], skill_routing=True, adapter={"num_experts": 1, "top_k": 1}).skill_routing
