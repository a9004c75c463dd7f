"""Dynamic experts of a ``MoELoRALinear``: per-expert ranks, growth and maturity (``DynamicExpertsMixin``).

**Per-expert ranks.**  Expert i has its own rank rᵢ (``expert_ranks``); the layer stacks every expert at the
largest one, R = max rᵢ (``rank``): ``lora_A`` ``(E, R, in)``, ``lora_B`` ``(E, out, R)``, where rows r ≥ rᵢ of
Aᵢ and columns r ≥ rᵢ of Bᵢ are zero (the *padding*, ``rank_mask``).  The padding stays zero by itself: its
gradients are exactly zero (∂L/∂Aᵢ[r] is a sum of products with Bᵢ[:, r] = 0, ∂L/∂Bᵢ[:, r] one with
hᵢ[r] = Aᵢ[r]·x̃ = 0), so every optimizer update leaves it at zero (AdamW's moments stay 0, its decay scales 0)
and the Riemannian preconditioner treats the expert exactly as a rank-rᵢ one (docs/math.md, "Per-expert
ranks").  Expert i is scaled by sᵢ = alpha/rᵢ (alpha/√rᵢ with rsLoRA); ``scaling`` is s₀, that of expert 0,
and the forward folds the ratios sᵢ/s₀ into B (``rank_scale``; None, and nothing folded, while every rank is
the same, which keeps the computation of a uniform layer exactly as before).

**Growth.**  ``add_expert`` adds an expert without changing what the layer computes for the tokens it does
not take (``riemix.core.growth``).

**Capacity.**  With ``max_experts`` set, ``add_expert`` on a full layer applies ``capacity_policy``: an
error, or merging / evicting experts to free a slot for the new one (``riemix.core.capacity``).

**Maturity.**  ``expert_age`` counts each expert's optimizer steps (``riemix.core.schedules.advance_maturity``);
with ``set_maturity(after_steps > 0)`` a layer with an expert younger than that routes densely
(``riemix.core.maturity``); ``routing_now`` is the routing the forward applies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from riemix.core.capacity import CapacityAction, add_at_capacity, check_capacity
from riemix.core.config import DENSE_MODES
from riemix.core.growth import grow_layer
from riemix.core.maturity import MaturityPolicy, MaturityRouting, check_maturity_policy, maturity_routing

__all__ = ["DynamicExpertsMixin", "expert_rank_list"]


def expert_rank_list(rank: int | Sequence[int], num_experts: int) -> list[int]:
    """Every expert's rank from an int (all alike) or a list of ``num_experts`` ints.

    Raises:
        ValueError: a rank that is not an int >= 1, or a list of another length (named with its value).
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, Sequence)) or isinstance(rank, str):
        raise ValueError(f"rank must be an int >= 1 or a list of them, got {rank!r}")
    ranks = [rank] * num_experts if isinstance(rank, int) else list(rank)
    if len(ranks) != num_experts:
        raise ValueError(f"rank: a per-expert list needs num_experts={num_experts} entries, got {rank!r}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank must be an int >= 1 or a list of them, got {rank!r}")
    return ranks


class DynamicExpertsMixin:
    """Per-expert ranks, growth and maturity state of ``MoELoRALinear`` (see the module docstring).

    Attributes set by ``_init_dynamic``:
        expert_ranks: every expert's rank rᵢ (``rank`` = R is their maximum).
        scaling: s₀, the scaling of expert 0 (of every expert when the ranks are equal).
        rank_scale: ``(E,)`` buffer of sᵢ/s₀ folded into B, or None while every rank is the same.
        expert_age: ``(E,)`` int64 buffer: optimizer steps each expert has trained.
        maturity: the ``MaturityPolicy`` (``set_maturity``).
        max_experts: at most this many experts (None: unbounded); ``capacity_policy`` applies beyond.
        capacity_policy: ``"error"``, ``"merge"`` or ``"evict"`` (``riemix.core.capacity``).
    """

    def _init_dynamic(
        self,
        ranks: list[int],
        maturity: MaturityPolicy,
        device: torch.device,
        max_experts: int | None = None,
        capacity_policy: str = "error",
    ) -> None:
        """Register the buffers (after the parameters exist); take the ranks, maturity and capacity policies."""
        self.max_experts, self.capacity_policy = check_capacity(max_experts, capacity_policy, len(ranks))
        self.register_buffer("rank_scale", None, persistent=False)
        self.register_buffer("expert_age", torch.zeros(len(ranks), dtype=torch.int64, device=device), persistent=False)
        self._ages_seen: tuple[object, int | None, list[int]] | None = None  # (buffer, version, ages)
        self._age_step: int | None = None  # the last step advance_age counted
        self.maturity = maturity
        self._set_ranks(ranks)

    # ------------------------------------------------------------------ ranks
    def _scaling_of(self, rank: int) -> float:
        """sᵣ = alpha/r, or alpha/√r with rsLoRA."""
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def _set_ranks(self, ranks: list[int]) -> None:
        """Take ``ranks`` as the experts' ranks: ``rank``, ``scaling`` and the ``rank_scale`` buffer."""
        self.expert_ranks = list(ranks)
        self.rank = max(ranks)
        self.scaling = self._scaling_of(ranks[0])
        if len(set(ranks)) == 1:
            self.rank_scale = None
        else:
            ratios = [self._scaling_of(r) / self.scaling for r in ranks]  # exactly 1.0 for rᵢ = r₀
            # fp64, so that a layer cast to fp64 later still holds the exact ratios (cast to B's dtype on use)
            self.rank_scale = torch.tensor(ratios, dtype=torch.float64, device=self.lora_B.device)  # (E,)

    @property
    def expert_scaling(self) -> list[float]:
        """sᵢ of every expert (``alpha/rᵢ``, ``alpha/√rᵢ`` with rsLoRA)."""
        return [self._scaling_of(r) for r in self.expert_ranks]

    def rank_mask(self) -> torch.Tensor:
        """``(E, R)`` bool: True at the rank slots each expert uses (r < rᵢ), False at its zero padding."""
        ranks = torch.tensor(self.expert_ranks, device=self.lora_A.device)  # (E,)
        return torch.arange(self.rank, device=self.lora_A.device) < ranks.unsqueeze(1)  # (E, R)

    # ------------------------------------------------------------------ growth
    def add_expert(
        self,
        rank: int | None = None,
        usage: torch.Tensor | None = None,
        capacity_log: list[CapacityAction] | None = None,
    ) -> int:
        """Add one expert (E → E+1) without changing the layer's output where it takes no token.

        At ``max_experts`` the ``capacity_policy`` applies instead (``riemix.core.capacity``): an error, or a
        merge / eviction whose freed slot takes the new expert (E unchanged; the other experts' outputs are
        unchanged, not the layer's).

        The stacked parameters (``lora_A``, ``lora_B``, the router weight or global gate, ``expert_scale``)
        are replaced by new Parameters one expert larger (and wider if ``rank`` > R) holding the old values;
        the new expert has B = 0, an A drawn like the layer's init and the mean router row (see
        ``riemix.core.growth`` for the choice and for what the other experts' gates do).  An optimizer holding
        the old Parameters must be told: ``riemix.grow_experts`` does both.

        Args:
            rank: the new expert's rank (None: ``expert_ranks[0]``, the rank the layer was created with).
            usage: ``(E,)`` expert usage for a capacity action (None: ``riemix.core.capacity.expert_usage``).
            capacity_log: a list the ``CapacityAction`` is appended to, if one is taken.

        Returns:
            The new expert's index (the old ``num_experts``, or the reused slot at capacity).

        Raises:
            ValueError: a bad ``rank`` or ``usage``, a PiSSA layer, or a full layer whose policy is
                ``"error"`` or which has too few unfrozen experts.
        """
        if self.max_experts is None or self.num_experts < self.max_experts:
            return grow_layer(self, rank)
        record = add_at_capacity(self, rank, usage)
        if capacity_log is not None:
            capacity_log.append(record)
        return record.slot

    def _expert_added(self, rank: int) -> None:
        """Bookkeeping of ``grow_layer`` once the parameters have grown: E, ranks, top-k, age (new: 0)."""
        self.num_experts += 1
        self.top_k = self.num_experts if self.routing in DENSE_MODES else min(self._requested_top_k, self.num_experts)
        self._set_ranks([*self.expert_ranks, rank])
        self.expert_age = torch.cat([self.expert_age, self.expert_age.new_zeros(1)])  # (E+1,)

    # ------------------------------------------------------------------ maturity
    def set_maturity(self, after_steps: int, temperature: float | None = None, anneal_steps: int = 0) -> None:
        """Set the maturity policy (``riemix.core.maturity``; ``after_steps=0`` turns it off).

        Args:
            after_steps: age (optimizer steps) at which an expert is mature.
            temperature: router temperature of the dense routing while an expert is immature (None: the
                router temperature).
            anneal_steps: steps over which the temperature returns to the router temperature afterwards.

        Raises:
            ValueError: a negative or non-int step count, or a temperature <= 0 (named).
        """
        self.maturity = check_maturity_policy(after_steps, temperature, anneal_steps)

    @torch.no_grad()
    def mark_mature(self, experts: Iterable[int] | None = None) -> None:
        """Make experts (default: all) mature now, anneal window included (their age is raised to M + W).

        Raises:
            ValueError: an expert index out of range (index and E named).
        """
        policy = self.maturity
        index = range(self.num_experts) if experts is None else [self._check_expert_index(i) for i in experts]
        for i in index:
            self.expert_age[i] = max(int(self.expert_age[i]), policy.after_steps + policy.anneal_steps)

    @property
    def expert_ages(self) -> list[int]:
        """Every expert's age, read from ``expert_age`` (a host sync only after the buffer was written)."""
        buf = self.expert_age
        try:
            version: int | None = buf._version
        except RuntimeError:  # an inference tensor has no version counter
            version = None
        seen = self._ages_seen
        if seen is None or seen[0] is not buf or seen[1] != version or version is None:
            self._ages_seen = seen = (buf, version, [int(a) for a in buf.tolist()])
        return seen[2]

    @torch.no_grad()
    def advance_age(self, step: int) -> None:
        """Count one optimizer step for every expert, once per distinct ``step`` (a repeated step is ignored)."""
        if self.maturity.after_steps <= 0 or step == self._age_step:
            return
        ages = self.expert_ages
        self.expert_age.add_(1)
        self._age_step = step
        self._ages_seen = (self.expert_age, self.expert_age._version, [a + 1 for a in ages])

    def routing_now(self) -> MaturityRouting:
        """The routing the forward applies now: the layer's own, or dense while an expert is immature."""
        if self.maturity.after_steps <= 0:
            return MaturityRouting(self.routing, self.top_k, self.router_temperature, 0)
        return maturity_routing(self.expert_ages, self.maturity, self.routing, self.top_k, self.router_temperature)
