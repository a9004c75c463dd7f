"""riemix.core.fields: the strict type check and the range check every config shares."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from riemix.core.fields import allowed_types, check_field_types, check_ranges


@dataclass
class Cfg:
    steps: int = 1
    seed: int = 0
    subset: int | None = None
    lr: float = 0.1
    gate_lr: float | None = None


def ranges(cfg: Cfg) -> None:
    check_ranges(
        cfg,
        positive_ints=("steps",),
        non_negative_ints=("seed",),
        positive_ints_or_none=("subset",),
        non_negative_numbers=("lr",),
        non_negative_numbers_or_none=("gate_lr",),
    )


def test_values_in_range_pass_including_the_edges():
    ranges(Cfg())
    ranges(Cfg(steps=5, seed=3, subset=1, lr=0, gate_lr=0.0))
    check_field_types(Cfg(lr=1))  # an int is a number


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, r"steps must be an int >= 1, got 0"),
        ("steps", True, r"steps must be an int >= 1, got True"),
        ("seed", -1, r"seed must be an int >= 0, got -1"),
        ("subset", 0, r"subset must be an int >= 1 or null, got 0"),
        ("lr", -1e-3, r"lr must be >= 0 and finite, got -0.001"),
        ("lr", float("inf"), r"lr must be >= 0 and finite, got inf"),
        ("lr", float("nan"), r"lr must be >= 0 and finite, got nan"),
        ("gate_lr", float("inf"), r"gate_lr must be >= 0 and finite, or null, got inf"),
    ],
)
def test_a_value_out_of_range_is_named_with_what_the_field_takes(field, value, message):
    with pytest.raises(ValueError, match=message):
        ranges(Cfg(**{field: value}))


def test_types_are_strict():
    assert allowed_types(int | None) == (int, type(None)) and allowed_types(float) == (float,)
    with pytest.raises(ValueError, match=r"steps must be an int, got '3'"):
        check_field_types(Cfg(steps="3"))
    with pytest.raises(ValueError, match=r"lr must be a number, got True"):
        check_field_types(Cfg(lr=True))
