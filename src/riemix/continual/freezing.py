"""Automatic freezing of a skill's experts once its evaluation metric stops improving.

An :class:`AutoFreezer` follows one evaluation metric per skill (accuracy, loss, ...).  Each
:meth:`AutoFreezer.update` reports a new value for a skill together with the experts that serve it; after
``patience`` consecutive evaluations without an improvement of more than ``min_delta`` over the skill's best
value, those experts are frozen (:func:`riemix.core.freezing.freeze_experts`): every riemix optimizer then
leaves them bit-identical, so later skills cannot overwrite what the skill learned.  A frozen skill stays
frozen (later updates are logged and change nothing); unfreeze with :func:`riemix.unfreeze_experts`.

Every update is appended to :attr:`AutoFreezer.log` as a JSON-able dict and passed to the optional
``on_decision`` callback; a freeze is also logged at INFO level on this module's logger.
:meth:`AutoFreezer.state_dict` holds the settings, the per-skill counters and the log as plain JSON.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from riemix.core.freezing import check_experts, freeze_experts

__all__ = ["FREEZE_MODES", "FREEZE_REASONS", "AutoFreezer"]

logger = logging.getLogger(__name__)

#: ``mode`` of :class:`AutoFreezer`: whether higher (``"max"``) or lower (``"min"``) metric values are better.
FREEZE_MODES = ("max", "min")
#: ``reason`` of an :attr:`AutoFreezer.log` record.
FREEZE_REASONS = ("first", "improved", "no_improvement", "frozen", "already_frozen")


@dataclass
class _Skill:
    best: float | None = None  # the best value seen
    stale: int = 0  # evaluations since the best
    evaluations: int = 0
    frozen: bool = False
    experts: dict[str, list[int]] | None = None  # the experts of the last update, normalised


def _check_settings(patience: object, min_delta: object, mode: object, router: object) -> None:
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1, got {patience!r}")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not 0 <= min_delta < math.inf:
        raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
    if mode not in FREEZE_MODES:
        raise ValueError(f"mode must be one of {FREEZE_MODES}, got {mode!r}")
    if not isinstance(router, bool):
        raise ValueError(f"router must be a bool, got {router!r}")


class AutoFreezer:
    """Freezes a skill's experts after ``patience`` evaluations without improvement.

    Args:
        patience: Consecutive evaluations without improvement that trigger the freeze (an int >= 1).
        min_delta: An improvement is a change of more than ``min_delta`` (>= 0) over the best value, in the
            direction of ``mode``.
        model: The model whose experts are frozen (carrying MoE-LoRA layers).
        mode: ``"max"`` (higher is better, e.g. accuracy) or ``"min"`` (lower is better, e.g. loss).
        router: Also freeze the experts' router rows (``freeze_experts(..., router=True)``).
        on_decision: Called with each update's record (a copy of the dict appended to :attr:`log`).

    Attributes:
        log: One dict per :meth:`update`: ``skill``, ``value``, ``best``, ``stale``, ``evaluation`` (the
            skill's evaluation count), ``reason`` (one of ``FREEZE_REASONS``), ``froze`` and ``experts``.

    Raises:
        ValueError: A bad ``patience``, ``min_delta``, ``mode`` or ``router`` (named with its value).
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def __init__(
        self,
        patience: int,
        min_delta: float = 0.0,
        *,
        model: nn.Module,
        mode: str = "max",
        router: bool = False,
        on_decision: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        _check_settings(patience, min_delta, mode, router)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.patience, self.min_delta, self.mode, self.router = patience, float(min_delta), mode, router
        self.model = model
        self.on_decision = on_decision
        self.log: list[dict[str, Any]] = []
        self._skills: dict[str, _Skill] = {}

    @property
    def frozen_skills(self) -> list[str]:
        """The skills whose experts were frozen, in the order they were first seen."""
        return [name for name, s in self._skills.items() if s.frozen]

    def best(self, skill: str) -> float | None:
        """The best value reported for ``skill`` (None for a skill never reported)."""
        entry = self._skills.get(skill)
        return None if entry is None else entry.best

    def _improves(self, value: float, best: float) -> bool:
        return value > best + self.min_delta if self.mode == "max" else value < best - self.min_delta

    def update(self, skill: str, experts_by_layer: Mapping[str, Sequence[int]] | Sequence[int], value: float) -> bool:
        """Report an evaluation of ``skill``; freeze its experts when it has stopped improving.

        Args:
            skill: The skill's name.
            experts_by_layer: The experts serving the skill: ``{module name: [expert indices]}``, or one list
                for every MoE-LoRA layer (as :func:`riemix.freeze_experts`).
            value: The metric value (finite).

        Returns:
            True when this call froze the experts (the ``patience``-th evaluation in a row without an
            improvement of more than ``min_delta``), else False (also for a skill frozen before).

        Raises:
            ValueError: An empty or non-str ``skill``, a non-finite ``value``, or ``experts_by_layer`` naming
                an unknown module or an expert index out of range (nothing changes then).
            TypeError: A malformed ``experts_by_layer``.
        """
        if not isinstance(skill, str) or not skill:
            raise ValueError(f"skill must be a non-empty str, got {skill!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"value must be a finite number, got {value!r}")
        experts = check_experts(self.model, experts_by_layer)  # {name: sorted indices}; checked before any change
        value = float(value)
        entry = self._skills.setdefault(skill, _Skill())
        entry.evaluations += 1
        entry.experts = experts
        froze = False
        if entry.frozen:
            reason = "already_frozen"
        elif entry.best is None:
            entry.best, reason = value, "first"
        elif self._improves(value, entry.best):
            entry.best, entry.stale, reason = value, 0, "improved"
        else:
            entry.stale += 1
            reason = "no_improvement"
            if entry.stale >= self.patience:
                freeze_experts(self.model, experts, router=self.router)
                entry.frozen, froze, reason = True, True, "frozen"
        record = {
            "skill": skill, "value": value, "best": entry.best, "stale": entry.stale,
            "evaluation": entry.evaluations, "reason": reason, "froze": froze,
            "experts": {name: list(indices) for name, indices in experts.items()},
        }  # fmt: skip
        self.log.append(record)
        if froze:
            logger.info(
                "AutoFreezer: froze the experts of skill %r after %d evaluations without an improvement > %g "
                "over its best %s=%g (router rows too: %s): %s",
                skill, entry.stale, self.min_delta, self.mode, entry.best, self.router, experts,
            )  # fmt: skip
        if self.on_decision is not None:
            self.on_decision(dict(record))
        return froze

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The settings, per-skill counters and log as JSON-able data (the model is not included)."""
        return {
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "router": self.router,
            "skills": {
                name: {
                    "best": s.best,
                    "stale": s.stale,
                    "evaluations": s.evaluations,
                    "frozen": s.frozen,
                    "experts": None if s.experts is None else {k: list(v) for k, v in s.experts.items()},
                }  # fmt: skip
                for name, s in self._skills.items()
            },
            "log": [dict(r) for r in self.log],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the settings too), replacing the counters and the log.

        The model is not touched: its frozen experts are saved with the adapter.

        Raises:
            ValueError: ``state`` lacks a key (named), holds a bad setting, or a skill entry is malformed.
        """
        missing = {"patience", "min_delta", "mode", "router", "skills", "log"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        _check_settings(state["patience"], state["min_delta"], state["mode"], state["router"])
        skills = {}
        for name, entry in state["skills"].items():
            keys = {"best", "stale", "evaluations", "frozen", "experts"}
            if not isinstance(entry, Mapping) or set(entry) != keys:
                raise ValueError(f"skills[{name!r}] must be a dict with keys {sorted(keys)}, got {entry!r}")
            best = entry["best"]
            if best is not None and not math.isfinite(best):
                raise ValueError(f"skills[{name!r}].best must be a finite number or None, got {best!r}")
            experts = entry["experts"]
            if experts is not None:
                experts = {str(k): [int(i) for i in v] for k, v in experts.items()}
            skills[name] = _Skill(
                None if best is None else float(best), int(entry["stale"]), int(entry["evaluations"]),
                bool(entry["frozen"]), experts,
            )  # fmt: skip
        self.patience, self.min_delta = state["patience"], float(state["min_delta"])
        self.mode, self.router = state["mode"], state["router"]
        self._skills = skills
        self.log = [dict(r) for r in state["log"]]
