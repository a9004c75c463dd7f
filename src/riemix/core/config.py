"""Configuration of MoE-LoRA adapters.

`MoELoRAConfig` is a typed dataclass validated in ``__post_init__``; every error names the
offending field and its value.  It serialises to and from plain JSON (``to_dict``/``from_dict``)
so that adapter files are self-describing.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from riemix.core.fields import check_field_types

__all__ = [
    "MoELoRAConfig",
    "ROUTING_MODES",
    "TOPK_MODES",
    "DENSE_MODES",
    "INIT_MODES",
    "REGULARIZER_MODES",
    "EXPERT_COMPUTE_MODES",
    "CAPACITY_POLICIES",
]

#: Routing modes accepted by ``MoELoRAConfig.routing``.
ROUTING_MODES = ("softmax_topk", "topk_softmax", "dense", "top_p", "global")
#: Modes whose selection keeps the ``top_k`` largest (noisy) logits.
TOPK_MODES = ("softmax_topk", "topk_softmax")
#: Modes without any selection: every expert is active for every token (``top_k`` is E, no noise).
DENSE_MODES = ("dense", "global")
#: Initialisations accepted by ``MoELoRAConfig.init``.
INIT_MODES = ("zero_b", "gaussian", "orthogonal", "pissa", "small_b")
#: How regularisers reach the parameters (``riemix.core.regularizers.apply_regularizers``): added to the
#: task loss, or their gradients injected straight into ``.grad``.
REGULARIZER_MODES = ("loss", "inject")
#: How a layer computes its experts (``MoELoRAConfig.expert_compute``): chosen by shape, every expert for
#: every token, or only the selected (token, expert) pairs (``riemix.core.sparse``).
EXPERT_COMPUTE_MODES = ("auto", "dense", "sparse")
#: What growth does on a layer at ``MoELoRAConfig.max_experts`` (``riemix.core.capacity``): refuse, merge the
#: two most similar low-usage experts into one slot, or evict the least-used expert.
CAPACITY_POLICIES = ("error", "merge", "evict")

ExpertCount = int | Sequence[int] | Callable[[int], int]


@dataclass
class MoELoRAConfig:
    """Configuration of a mixture of LoRA experts attached to ``nn.Linear`` layers.

    Attributes:
        num_experts: Experts per adapted layer (E). Either one int for every layer, a list indexed by
            the transformer block index found in the module name (``...layers.<i>...``), or a callable
            ``block_index -> E`` (MoLA-style: more experts in higher layers). Modules without a block
            index use entry 0 of a list / ``callable(0)``.
        top_k: Experts kept per token (ignored by ``routing="dense"``). Must satisfy 1 <= top_k <= E for
            every adapted layer.
        rank: Rank r of the experts a layer is created with, like ``num_experts``: one int for every
            layer, a list indexed by the block index, or a callable ``block_index -> r``
            (``rank_for_layer``).  Experts added later (``MoELoRALinear.add_expert``) may have their own
            rank; a layer then stacks its experts at the largest rank R (``MoELoRALinear.expert_ranks``).
        alpha: LoRA alpha; an expert of rank r is scaled by ``alpha / r`` (or ``alpha / sqrt(r)`` with
            ``use_rslora``).
        dropout: Dropout probability applied to the expert input (not to the router input).
        target_modules: Either a list of module-name suffixes (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``) and ``re:<regex>`` items (``re:.*(q|v)_proj`` matches
            a full module name with ``re.fullmatch``), or a single regex string matched against the full
            module name. Targets are ``nn.Linear`` or GPT-2-style ``Conv1D`` modules.
        routing: ``"softmax_topk"`` (softmax over all E logits, keep the top-k, renormalise to sum 1),
            ``"topk_softmax"`` (softmax over the top-k logits only), ``"dense"`` (softmax over all E),
            ``"top_p"`` (per token the smallest set of experts whose softmax mass is >= ``top_p``, at
            least 1 and at most ``top_k``, renormalised) or ``"global"`` (an input-independent learned
            gate per layer, gᵢ = E·softmax(w/T)ᵢ, so the mean gate is 1; no per-token router).
        gate_grad_power: Gate-rescaling power p in [0, 1]. The forward value is g·e; the gradient that
            reaches A, B and the input is weighted by stopgrad(g**p). p=1 is plain MoE-LoRA, p=0.5 the
            paper's sqrt trick, p=0 realises the paper's eq. (12) exactly (see docs/math.md).
        use_rslora: Use rank-stabilised scaling ``alpha / sqrt(rank)``.
        init: Adapter initialisation (see ``riemix.core.init``): ``"zero_b"`` (Kaiming-uniform A, zero B),
            ``"gaussian"`` (normal A with std ``1/rank``, zero B), ``"orthogonal"`` (orthonormal A rows,
            jointly across experts when E·r <= in_features, zero B), ``"pissa"`` (principal singular
            directions of the base weight, which becomes the residual) or ``"small_b"`` (normal B with
            std ``init_b_std``; pair it with ``scale_warmup_steps``). All but ``"small_b"`` leave the
            base model's outputs unchanged at step 0.
        router_init_std: Standard deviation of the router's normal initialisation.
        init_b_std: Standard deviation of B for ``init="small_b"`` (> 0).
        scale_warmup_steps: The adapter scale ramps linearly from 0 to s over this many optimizer steps
            (0: no warm-up). Not allowed with ``"pissa"`` (its start needs the full scale).
        router_temperature: Router temperature T > 0: gates are a softmax of logits / T.
        router_temperature_final: None (constant T) or the temperature reached at the last training step
            by linear decay from ``router_temperature``.
        router_noise_std: Std of Gaussian noise added to the router logits for the expert *selection* in
            training mode (noisy top-k); gate values always use the clean logits. Only for the modes
            that select (``softmax_topk``, ``topk_softmax``, ``top_p``).
        top_p: Mass threshold of ``routing="top_p"``, in (0, 1].
        expert_scales: Multiply each expert's output by a learned channel-wise vector ``(out,)``
            initialised to 1 (any routing mode; the SOSLoRA design pairs it with ``"global"``).
        scale_anchor_beta: Coefficient of the L2 pull of the expert scale vectors toward their initial
            value 1 (``riemix.core.regularizers.scale_anchor_loss``); needs ``expert_scales``.
        expert_compute: ``"dense"`` (every expert for every token, gates zero where unselected),
            ``"sparse"`` (only the selected token-expert pairs; needs a routing that selects:
            ``softmax_topk``, ``topk_softmax``, ``top_p``) or ``"auto"`` (sparse on CPU when the routing
            selects and top_k <= E/8; dense on GPUs; see ``riemix.core.sparse.use_sparse_experts``).
            Same values and gradients either way (up to rounding); only the speed differs.
        recompute_hidden: Dense path: recompute the experts' hidden activations h = A x̃ in the backward
            instead of keeping the selected experts' blocks of it. A layer then keeps only its gates (k
            values and one-byte indices per token), less than a PEFT LoRA of rank k·r keeps, for one more
            (N, in) x (in, E·r) product in the backward: measured +1% to +3% layer time on CPU, +5% to
            +25% on an H100 (``benchmarks/layer_speed.py --paths``). The sparse path always recomputes h
            (it keeps a gate and a token index per selected pair).
        mature_after_steps: Maturity routing for continual learning (``riemix.core.maturity``): an expert is
            *immature* until it has trained this many optimizer steps (``advance_maturity`` counts them;
            new experts from ``add_expert`` start at 0), and a layer with an immature expert routes densely
            (softmax over all experts) so that it receives gradient on every token; once all are mature the
            layer routes with ``routing``.  0 (default): off, every expert is mature.
        maturity_temperature: Router temperature of that dense routing (None: ``router_temperature``).
        maturity_anneal_steps: After the youngest expert matures, the temperature moves linearly from
            ``maturity_temperature`` to ``router_temperature`` over this many steps (0: at once).
        max_experts: Capacity of every adapted layer for growth (``riemix.grow_experts``, ``add_expert``):
            at most this many experts per layer, >= the ``num_experts`` of every layer (None: unbounded).
        capacity_policy: What growth does on a layer at ``max_experts`` (``riemix.core.capacity``):
            ``"error"`` (raise), ``"merge"`` (merge the two most similar low-usage experts into one slot,
            their weight deltas summed, and give the freed slot to the new expert) or ``"evict"`` (the
            least-used expert's slot goes to the new expert).  Frozen experts are never merged or evicted.
    """

    num_experts: ExpertCount = 8
    top_k: int = 2
    rank: ExpertCount = 4
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    routing: str = "softmax_topk"
    gate_grad_power: float = 0.5
    use_rslora: bool = False
    init: str = "zero_b"
    router_init_std: float = 0.02
    init_b_std: float = 1e-3
    scale_warmup_steps: int = 0
    router_temperature: float = 1.0
    router_temperature_final: float | None = None
    router_noise_std: float = 0.0
    top_p: float = 1.0
    expert_scales: bool = False
    scale_anchor_beta: float = 0.0
    expert_compute: str = "auto"
    recompute_hidden: bool = False
    mature_after_steps: int = 0
    maturity_temperature: float | None = None
    maturity_anneal_steps: int = 0
    max_experts: int | None = None
    capacity_policy: str = "error"

    def __post_init__(self) -> None:
        check_field_types(self)
        for f in dataclasses.fields(self):  # inf/nan fit no float field (alpha, stds, temperatures, ...)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        if isinstance(self.num_experts, bool):
            raise ValueError(f"num_experts must be an int, list or callable, got {self.num_experts!r}")
        if isinstance(self.num_experts, int):
            _check_experts(self.num_experts, "num_experts")
        elif isinstance(self.num_experts, Sequence) and not isinstance(self.num_experts, str):
            bad = [e for e in self.num_experts if isinstance(e, bool) or not isinstance(e, int)]
            if bad:
                raise ValueError(f"num_experts: per-layer counts must be ints, got {bad[0]!r} in {self.num_experts!r}")
            self.num_experts = list(self.num_experts)
            if not self.num_experts:
                raise ValueError("num_experts: the per-layer list is empty")
            for i, e in enumerate(self.num_experts):
                _check_experts(e, f"num_experts[{i}]")
        elif not callable(self.num_experts):
            raise ValueError(f"num_experts must be an int, list or callable, got {self.num_experts!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        min_e = self._static_min_experts()
        if min_e is not None and self.routing not in DENSE_MODES and self.top_k > min_e:
            raise ValueError(f"top_k must be in 1..num_experts ({min_e}), got {self.top_k}")
        self.rank = _per_layer(self.rank, "rank")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if not 0.0 <= self.gate_grad_power <= 1.0:
            raise ValueError(f"gate_grad_power must be in [0, 1], got {self.gate_grad_power!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if not self.router_init_std >= 0:
            raise ValueError(f"router_init_std must be >= 0, got {self.router_init_std!r}")
        self._check_variants()
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"target_modules: invalid regex {self.target_modules!r}: {exc}") from exc
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"target_modules must be a regex string or a non-empty list of names, got {self.target_modules!r}"
                )
            for item in self.target_modules:
                if item.startswith("re:"):
                    try:
                        re.compile(item[3:])
                    except re.error as exc:
                        raise ValueError(f"target_modules: invalid regex in {item!r}: {exc}") from exc

    def _check_variants(self) -> None:
        """Validate the initialisation, schedule and routing-variant fields."""
        if not self.init_b_std > 0:
            raise ValueError(f"init_b_std must be > 0, got {self.init_b_std!r}")
        steps = self.scale_warmup_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"scale_warmup_steps must be an int >= 0, got {steps!r}")
        if steps and self.init == "pissa":
            raise ValueError(
                f"scale_warmup_steps must be 0 with init='pissa' (its start needs the full scale), got {steps}"
            )
        if not self.router_temperature > 0:
            raise ValueError(f"router_temperature must be > 0, got {self.router_temperature!r}")
        final = self.router_temperature_final
        if final is not None and not final > 0:
            raise ValueError(f"router_temperature_final must be > 0 or None, got {final!r}")
        if not self.router_noise_std >= 0:
            raise ValueError(f"router_noise_std must be >= 0, got {self.router_noise_std!r}")
        if self.router_noise_std > 0 and self.routing in DENSE_MODES:
            raise ValueError(
                f"router_noise_std must be 0 with routing={self.routing!r} (nothing is selected), "
                f"got {self.router_noise_std!r}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.expert_scales, bool):
            raise ValueError(f"expert_scales must be a bool, got {self.expert_scales!r}")
        if not self.scale_anchor_beta >= 0:
            raise ValueError(f"scale_anchor_beta must be >= 0, got {self.scale_anchor_beta!r}")
        if self.scale_anchor_beta > 0 and not self.expert_scales:
            raise ValueError(
                f"scale_anchor_beta needs expert_scales=True, got scale_anchor_beta={self.scale_anchor_beta!r}"
            )
        if not isinstance(self.recompute_hidden, bool):
            raise ValueError(f"recompute_hidden must be a bool, got {self.recompute_hidden!r}")
        if self.expert_compute not in EXPERT_COMPUTE_MODES:
            raise ValueError(f"expert_compute must be one of {EXPERT_COMPUTE_MODES}, got {self.expert_compute!r}")
        if self.expert_compute == "sparse" and self.routing in DENSE_MODES:
            raise ValueError(
                f"expert_compute='sparse' needs a routing that selects experts, got routing={self.routing!r}"
            )
        for name in ("mature_after_steps", "maturity_anneal_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        temp = self.maturity_temperature
        if temp is not None and not temp > 0:
            raise ValueError(f"maturity_temperature must be > 0 or None, got {temp!r}")
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"capacity_policy must be one of {CAPACITY_POLICIES}, got {self.capacity_policy!r}")
        cap, most = self.max_experts, self._static_max_experts()
        if cap is not None and (cap < 1 or (most is not None and cap < most)):
            raise ValueError(f"max_experts must be >= num_experts of every layer ({most}) or None, got {cap!r}")
        if self.mature_after_steps and self.init == "pissa":
            raise ValueError(
                f"mature_after_steps must be 0 with init='pissa' (its experts are placed for the routing "
                f"at step 0), got {self.mature_after_steps}"
            )

    def _static_min_experts(self) -> int | None:
        if isinstance(self.num_experts, int):
            return self.num_experts
        if isinstance(self.num_experts, list):
            return min(self.num_experts)
        return None

    def _static_max_experts(self) -> int | None:
        if isinstance(self.num_experts, int):
            return self.num_experts
        if isinstance(self.num_experts, list):
            return max(self.num_experts)
        return None

    @property
    def scaling(self) -> float:
        """The adapter scaling s: ``alpha / rank`` or ``alpha / sqrt(rank)`` with rsLoRA (an int ``rank``).

        Raises:
            ValueError: ``rank`` is per layer (a list or callable): see ``rank_for_layer``.
        """
        if not isinstance(self.rank, int):
            raise ValueError(f"scaling: rank is per layer ({self.rank!r}); use rank_for_layer(i) for a layer's rank")
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def rank_for_layer(self, layer_index: int | None) -> int:
        """Rank of the experts the block ``layer_index`` is created with (None: a module outside the blocks).

        Raises:
            ValueError: a list ``rank`` shorter than the model, or a callable returning an invalid rank.
        """
        idx = 0 if layer_index is None else layer_index
        if isinstance(self.rank, int):
            return self.rank
        if isinstance(self.rank, list):
            if idx >= len(self.rank):
                raise ValueError(f"rank has {len(self.rank)} entries but the model has a layer {idx}")
            return self.rank[idx]
        r = self.rank(idx)
        _check_experts(r, f"rank({idx})")
        return int(r)

    def experts_for_layer(self, layer_index: int | None) -> int:
        """Number of experts for the block ``layer_index`` (None: a module outside the blocks).

        Raises:
            ValueError: if the resolved count is invalid, smaller than ``top_k`` or above ``max_experts``.
        """
        idx = 0 if layer_index is None else layer_index
        if isinstance(self.num_experts, int):
            e = self.num_experts
        elif isinstance(self.num_experts, list):
            if idx >= len(self.num_experts):
                raise ValueError(f"num_experts has {len(self.num_experts)} entries but the model has a layer {idx}")
            e = self.num_experts[idx]
        else:
            e = self.num_experts(idx)
            _check_experts(e, f"num_experts({idx})")
        if self.routing not in DENSE_MODES and self.top_k > e:
            raise ValueError(f"top_k must be in 1..num_experts ({e}) for layer {idx}, got {self.top_k}")
        if self.max_experts is not None and e > self.max_experts:
            raise ValueError(f"max_experts must be >= num_experts ({e}) of layer {idx}, got {self.max_experts}")
        return int(e)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (a callable ``num_experts`` or ``rank`` is written as None: the caller
        resolves it).

        The maturity fields are left out while they hold their defaults, so an adapter that does not use
        them writes the same config as before they existed (``from_dict`` fills the defaults back in).
        """
        d = dataclasses.asdict(self)
        for name in ("num_experts", "rank"):
            if callable(getattr(self, name)):
                d[name] = None
        for name in _OMIT_AT_DEFAULT:
            if d[name] == _DEFAULTS[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoELoRAConfig:
        """Build a config from ``to_dict`` output, rejecting unknown keys.

        Raises:
            ValueError: on unknown keys (named) or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MoELoRAConfig field(s): {unknown}; valid: {sorted(names)}")
        return cls(**data)


def _check_experts(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _per_layer(value: Any, name: str) -> int | list[int] | Callable[[int], int]:
    """A per-layer count field (``rank``): an int >= 1, a non-empty list of them, or a callable.

    Raises:
        ValueError: naming the field and the bad value.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, list or callable, got {value!r}")
    if isinstance(value, int):
        _check_experts(value, name)
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise ValueError(f"{name}: per-layer values must be ints, got {bad[0]!r} in {value!r}")
        if not value:
            raise ValueError(f"{name}: the per-layer list is empty")
        for i, v in enumerate(value):
            _check_experts(v, f"{name}[{i}]")
        return list(value)
    if callable(value):
        return value
    raise ValueError(f"{name} must be an int, list or callable, got {value!r}")


#: Fields ``to_dict`` leaves out while they hold their defaults (added after the adapter format was fixed).
_OMIT_AT_DEFAULT = (
    "mature_after_steps",
    "maturity_temperature",
    "maturity_anneal_steps",
    "max_experts",
    "capacity_policy",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MoELoRAConfig) if f.name in _OMIT_AT_DEFAULT}
