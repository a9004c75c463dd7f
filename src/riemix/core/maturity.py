"""Maturity routing (continual learning): a layer with a young expert routes densely until it has learned.

A new expert (``MoELoRALinear.add_expert``) starts with B = 0 and a router row it has never trained.  Under
top-k routing it would receive gradient only on the tokens where it happens to be selected, so it may never
be selected at all.  Maturity routing gives it a start: every expert carries an *age*, the number of
optimizer steps it has trained (``MoELoRALinear.expert_age``, advanced once per step by
``riemix.core.schedules.advance_maturity``), and with ``mature_after_steps`` = M > 0

- while some expert of a layer is younger than M (immature), the layer routes ``"dense"``: a softmax over all
  E experts at the temperature ``maturity_temperature`` (default: the router temperature), so every expert,
  the young one included, has a non-zero gate on every token and receives gradient (A, B through the
  gate-rescaled coefficient cᵢ = gᵢ^p, its router row through ∂L/∂lᵢ);
- once every expert is at least M steps old, the layer routes with its own mode (``routing``, top-k), and
  during the next ``maturity_anneal_steps`` = W steps the temperature moves linearly from the dense one to
  the router temperature: T = T_dense + (T_router − T_dense)·min(1, (a_min − M)/W), a_min the youngest
  expert's age.

``routing="dense"`` and ``"global"`` are dense already: maturity changes only their temperature.  M = 0
turns maturity off (every expert is mature, nothing is counted).  The routing in force is a pure function of
the ages and the three settings (``maturity_routing``), so a run resumed with its saved ages continues
exactly.
"""

from __future__ import annotations

from typing import NamedTuple

from riemix.core.config import DENSE_MODES

__all__ = ["MaturityPolicy", "MaturityRouting", "check_maturity_policy", "maturity_routing"]


class MaturityPolicy(NamedTuple):
    """A layer's maturity settings (``MoELoRAConfig``'s fields of the same meaning).

    Attributes:
        after_steps: M, the age (optimizer steps) at which an expert is mature; 0 turns maturity off.
        temperature: router temperature of the dense routing while an expert is immature (None: the
            router temperature).
        anneal_steps: W, steps over which the temperature returns to the router temperature after the
            youngest expert matured (0: at once).
    """

    after_steps: int = 0
    temperature: float | None = None
    anneal_steps: int = 0


class MaturityRouting(NamedTuple):
    """The routing a layer applies now.

    Attributes:
        mode: routing mode (``"dense"`` while an expert is immature, else the layer's own).
        top_k: experts per token (E for the dense modes).
        temperature: router temperature T.
        immature: how many experts are younger than ``after_steps``.
    """

    mode: str
    top_k: int
    temperature: float
    immature: int


def check_maturity_policy(after_steps: object, temperature: object, anneal_steps: object) -> MaturityPolicy:
    """Validate maturity settings; the checked ``MaturityPolicy``.

    Raises:
        ValueError: naming the setting and its value (ints >= 0, temperature > 0 or None).
    """
    for name, value in (("after_steps", after_steps), ("anneal_steps", anneal_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"maturity {name} must be an int >= 0, got {value!r}")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
    ):
        raise ValueError(f"maturity temperature must be > 0 or None, got {temperature!r}")
    return MaturityPolicy(after_steps, None if temperature is None else float(temperature), anneal_steps)


def maturity_routing(
    ages: list[int], policy: MaturityPolicy, routing: str, top_k: int, router_temperature: float
) -> MaturityRouting:
    """The routing in force for experts of the given ages (see the module docstring).

    Args:
        ages: each expert's age in optimizer steps (E ints).
        policy: the layer's maturity settings.
        routing: the layer's own routing mode.
        top_k: its own top-k (already capped at E).
        router_temperature: its router temperature (the target of the anneal).

    Returns:
        The mode, top-k, temperature and number of immature experts.
    """
    num_experts = len(ages)
    own = MaturityRouting(routing, top_k, float(router_temperature), 0)
    if policy.after_steps <= 0 or not ages:
        return own
    dense_t = float(router_temperature if policy.temperature is None else policy.temperature)
    youngest = min(ages)
    immature = sum(age < policy.after_steps for age in ages)
    if immature:
        mode = routing if routing in DENSE_MODES else "dense"
        return MaturityRouting(mode, num_experts, dense_t, immature)
    since = youngest - policy.after_steps  # steps since the youngest expert matured
    if policy.anneal_steps <= 0 or since >= policy.anneal_steps:
        return own
    frac = since / policy.anneal_steps
    return own._replace(temperature=dense_t + (float(router_temperature) - dense_t) * frac)
