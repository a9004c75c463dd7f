"""Checks of a dataclass config's fields, shared by every config (``MoELoRAConfig``, ``TrainConfig``,
``ContinualConfig``): strict simple types (:func:`check_field_types`) and numeric ranges (:func:`check_ranges`).

Each raises ``ValueError("<field> must be <what it takes>, got <value>")``, naming the first bad field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

__all__ = ["allowed_types", "check_field_types", "check_ranges"]

_SIMPLE = {bool: "a bool", int: "an int", float: "a number", str: "a string", type(None): "null"}


def allowed_types(hint: Any) -> tuple[Any, ...]:
    """The members of a union type hint (``int | None`` -> ``(int, NoneType)``), or ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def check_field_types(config: Any) -> None:
    """Check every field of a dataclass ``config`` whose type is simple against its value, strictly.

    A field typed ``bool`` takes only True/False (not ``"false"`` or 1), ``int`` only an int (not a bool
    or ``"3"``), ``float`` an int or a float (not a bool or ``"1e-3"``), ``str`` only a string, and
    ``X | None`` also None.  Fields of any other type (lists, callables, nested configs) are left to
    the config's own checks.

    Raises:
        ValueError: naming the first field whose value does not fit, what it takes and the value.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        allowed = allowed_types(hints[f.name])
        if not all(t in _SIMPLE for t in allowed):
            continue
        value = getattr(config, f.name)
        ok = any(
            (isinstance(value, bool) if t is bool else isinstance(value, t) and not isinstance(value, bool))
            or (t is float and isinstance(value, int) and not isinstance(value, bool))
            for t in allowed
        )
        if not ok:
            want = " or ".join(_SIMPLE[t] for t in allowed)
            raise ValueError(f"{f.name} must be {want}, got {value!r}")


def check_ranges(
    config: Any,
    *,
    positive_ints: Iterable[str] = (),
    non_negative_ints: Iterable[str] = (),
    positive_ints_or_none: Iterable[str] = (),
    non_negative_numbers: Iterable[str] = (),
    non_negative_numbers_or_none: Iterable[str] = (),
) -> None:
    """Check the named fields of ``config`` against their range (after :func:`check_field_types`).

    An infinite rate or weight is never meant (it diverges at the first step), so numbers must be finite.

    Args:
        config: The dataclass instance.
        positive_ints: Fields that must be ints >= 1.
        non_negative_ints: Fields that must be ints >= 0.
        positive_ints_or_none: Fields that must be ints >= 1 or None.
        non_negative_numbers: Fields that must be finite numbers >= 0.
        non_negative_numbers_or_none: Fields that must be finite numbers >= 0 or None.

    Raises:
        ValueError: naming the first field out of range, what it takes and its value.
    """

    def is_int(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    def is_rate(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value and math.isfinite(value)

    checks = (
        (positive_ints, lambda v: is_int(v, 1), "an int >= 1"),
        (non_negative_ints, lambda v: is_int(v, 0), "an int >= 0"),
        (positive_ints_or_none, lambda v: v is None or is_int(v, 1), "an int >= 1 or null"),
        (non_negative_numbers, is_rate, ">= 0 and finite"),
        (non_negative_numbers_or_none, lambda v: v is None or is_rate(v), ">= 0 and finite, or null"),
    )
    for names, ok, want in checks:
        for name in names:
            value = getattr(config, name)
            if not ok(value):
                raise ValueError(f"{name} must be {want}, got {value!r}")
