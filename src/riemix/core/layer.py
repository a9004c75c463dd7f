"""The MoE-LoRA layer: a frozen linear map plus E fused low-rank experts and a per-token router.

    y = base(x) + s · Σᵢ gᵢ(x) · Bᵢ Aᵢ dropout(x)

``MoELoRALinear`` owns the parameters (stacked ``lora_A`` ``(E, r, in)``, ``lora_B`` ``(E, out, r)``, the
router or the global gate, optional expert scales) and the runtime state (scale warm-up factor, router
temperature, recorded routing); the math of one call is ``riemix.core.functional.moe_lora_linear`` (one
fused autograd node with gate-rescaled gradients, see that module).  Initialisations are in
``riemix.core.init``.  Per-expert ranks, growing by one expert (``add_expert``) and maturity routing are
``riemix.core.dynamic`` (``DynamicExpertsMixin``).

The wrapped module is an ``nn.Linear`` or a GPT-2-style ``Conv1D`` (a linear map whose weight is stored
transposed, ``(in, out)``, as in GPT-2, GPT-J's ancestors and DistilGPT-2); ``base_weight`` always reads
it as ``(out, in)``.

A quantized base (bitsandbytes ``Linear4bit`` with NF4/FP4, ``Linear8bitLt``; ``is_quantized_linear``)
holds its weight packed, so the layer does not read it: it *calls* the base module (``call_base``), whose
own autograd gives the base's part of ∂L/∂x, and adds the adapter term from ``moe_lora_linear`` called
without a weight (which gives the adapter's part).  ``guard_quantized_layers`` keeps bitsandbytes from
repacking 4-bit weights on CPU, after which they would pass no gradient back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from riemix.core.config import DENSE_MODES
from riemix.core.dynamic import DynamicExpertsMixin, expert_rank_list
from riemix.core.frozen import FrozenExpertsMixin
from riemix.core.functional import moe_lora_linear
from riemix.core.init import initialise_layer
from riemix.core.maturity import check_maturity_policy
from riemix.core.routing import route
from riemix.core.sparse import use_sparse_experts

__all__ = [
    "MoELoRALinear",
    "guard_quantized_layers",
    "is_conv1d",
    "is_linear_like",
    "is_quantized_linear",
    "iter_moe_lora_layers",
]

# bitsandbytes' quantized linear classes (LinearNF4 / LinearFP4 subclass Linear4bit).
_QUANTIZED_CLASSES = frozenset({"Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt"})


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (``y = x @ W + b`` with ``W`` of shape ``(in, out)``).

    Recognised by name and shape (``nf`` output features), so ``riemix.core`` does not import transformers.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantized linear map (``Linear4bit``, NF4/FP4, ``Linear8bitLt``).

    Recognised by class name and defining package (any class in its MRO), so ``riemix.core`` does not import
    bitsandbytes.  Such a module's weight is packed (4-bit: an ``(out·in/2, 1)`` uint8 column plus a
    quantization state); ``in_features`` / ``out_features`` are its attributes.
    """
    return any(
        cls.__name__ in _QUANTIZED_CLASSES and cls.__module__.partition(".")[0] == "bitsandbytes"
        for cls in type(module).__mro__
    )


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map MoE-LoRA can wrap: an ``nn.Linear``, a ``Conv1D`` or a bitsandbytes one."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module)


def _repacked_for_cpu(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def guard_quantized_layers(model: nn.Module) -> list[str]:
    """Keep the bitsandbytes 4-bit layers of ``model`` differentiable on CPU (in place).

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` the first time it runs in eval
    mode on an input that does not require gradients: the packed weight is rewritten in place in a CPU
    layout and its block scales are rounded to bf16.  A repacked layer computes slightly different outputs
    and passes **no gradient** back to its input (its CPU kernel has no autograd formula; PyTorch only
    warns), so training would silently lose every gradient path through it, adapted or not.  This turns
    the repacking off on every 4-bit layer (its ``support_avx512bf16_for_cpu`` flag): training and
    evaluation then compute the same numbers and gradients reach the input.

    Args:
        model: any module (a whole model, or one layer).

    Returns:
        The names of the 4-bit layers found (``""`` for ``model`` itself), in model order.

    Raises:
        ValueError: some 4-bit layers were repacked already (named): that cannot be undone exactly.
    """
    layers = [(n, m) for n, m in model.named_modules() if is_quantized_linear(m) and hasattr(m, "weight")]
    layers = [(n, m) for n, m in layers if hasattr(m.weight, "quant_state")]  # 4-bit (8-bit has no such state)
    packed = [n or "<the module itself>" for n, m in layers if _repacked_for_cpu(m)]
    if packed:
        raise ValueError(
            f"{len(packed)} bitsandbytes 4-bit layer(s) (e.g. {', '.join(packed[:3])}) were repacked for CPU "
            "inference by an eval-mode forward; bitsandbytes passes no gradient through a repacked layer, so "
            "training would silently lose gradients: load the model again (riemix.load_model prevents the "
            "repacking) and add the adapters before running it"
        )
    for _, module in layers:
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return [n for n, _ in layers]


class MoELoRALinear(DynamicExpertsMixin, FrozenExpertsMixin, nn.Module):
    """A frozen ``nn.Linear`` with a mixture of LoRA experts and a router.

    Attributes:
        base_layer: the wrapped, frozen ``nn.Linear``, ``Conv1D`` or bitsandbytes quantized linear (its weight
            is the PiSSA residual after ``init="pissa"``).
        quantized_base: whether ``base_layer`` is quantized (``is_quantized_linear``): its weight is packed,
            ``base_weight`` and ``init="pissa"`` refuse it.
        call_base: whether the forward calls ``base_layer`` and adds the adapter term (always for a quantized
            base), rather than reading the base weight into the fused node.  Both give the same values and
            gradients.
        pissa_down, pissa_up: after ``init="pissa"``, the fp64 factors of the part moved out of the base
            weight (W_res = W − pissa_up @ pissa_down), else None.
        pissa_fix_index, pissa_fix_value: after ``init="pissa"``, the entries of W that W_res + up @ down
            does not round back to (``riemix.core.init.pissa_fixes``), else None.
        lora_A: ``(E, R, in_features)`` expert down-projections (R = ``rank``; rows r >= rᵢ of Aᵢ are zero).
        lora_B: ``(E, out_features, R)`` expert up-projections (columns r >= rᵢ of Bᵢ are zero).
        expert_ranks: every expert's rank rᵢ; ``rank`` is R = max rᵢ (``riemix.core.dynamic``).
        router: ``nn.Linear(in_features, E, bias=False)`` for the per-token modes, None for ``"global"``.
        global_gate: ``(E,)`` gate logits w of ``routing="global"`` (gᵢ = E·softmax(w/T)ᵢ), else None.
        expert_scale: ``(E, out_features)`` channel-wise scale of each expert's output (``expert_scales``),
            else None.
        scaling: adapter scale s (``alpha/r`` or ``alpha/sqrt(r)``) of expert 0, of every expert when the ranks
            are equal; ``expert_scaling`` lists sᵢ, ``rank_scale`` the ratios sᵢ/s folded into B (None
            when the ranks are equal).
        expert_age: ``(E,)`` int64 buffer: optimizer steps each expert has trained (``advance_age``); with
            ``maturity.after_steps`` > 0 a layer with a younger expert routes densely (``routing_now``,
            ``set_maturity``, ``mark_mature``; ``riemix.core.maturity``).
        max_experts, capacity_policy: growth capacity and what ``add_expert`` does at it
            (``riemix.core.capacity``).
        scale_factor: multiplier of s in [0, 1] (scale warm-up; see ``riemix.core.schedules.set_scale_progress``).
        router_temperature: current router temperature T (see ``riemix.core.schedules.set_router_temperature``).
        router_noise_std: std of the selection noise added to the logits in training mode.
        selection_bias: None, or an additive bias on the router's *selection* scores: ``(E,)`` for every token or
            ``(B, E)`` per example of a ``(B, T, in)`` input (``-inf`` excludes an expert; the gates of the
            selected experts still come from the clean logits).  Selecting modes (top-k, top-p) only; dense
            routing ignores it.  ``riemix.continual`` routes each example to its skill's experts with it.
        top_p: mass threshold of ``routing="top_p"``.
        init_info: how the last init went (``"joint"``/``"per_expert"`` for ``"orthogonal"``, else the
            init name).
        expert_compute: ``"auto"``, ``"dense"`` or ``"sparse"`` (see ``MoELoRAConfig.expert_compute``);
            ``sparse_experts`` says which path the layer takes.
        recompute_hidden: keep only the gates for the backward and recompute h = A x̃ there (see
            ``MoELoRAConfig.recompute_hidden``).
        record_routing: when True, ``last_router_logits`` ``(N, E)`` and ``last_gates`` ``(N, E)`` keep the
            latest forward's routing (used by auxiliary losses and diagnostics).
        frozen_experts: ``(E,)`` bool buffer: experts every riemix optimizer leaves bit-identical (their A, B
            and expert-scale rows; ``freeze_expert``).  Saved with the adapter, not in ``state_dict``.
        frozen_router_rows: ``(E,)`` bool buffer: router rows (global gate entries) held fixed likewise
            (``freeze_expert(i, router=True)``).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        rank: int | Sequence[int],
        alpha: float,
        top_k: int,
        routing: str = "softmax_topk",
        gate_grad_power: float = 0.5,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "zero_b",
        router_init_std: float = 0.02,
        router_temperature: float = 1.0,
        router_noise_std: float = 0.0,
        top_p: float = 1.0,
        expert_scales: bool = False,
        init_b_std: float = 1e-3,
        expert_compute: str = "auto",
        recompute_hidden: bool = False,
        call_base: bool | None = None,
        mature_after_steps: int = 0,
        maturity_temperature: float | None = None,
        maturity_anneal_steps: int = 0,
        max_experts: int | None = None,
        capacity_policy: str = "error",
    ) -> None:
        """Wrap ``base_layer``; the arguments are ``MoELoRAConfig``'s fields of the same names, except:

        Args:
            base_layer: the linear module to wrap (``is_linear_like``).
            num_experts: E for this layer.
            rank: every expert's rank, or a list of E ranks (stacked at their maximum R).
            call_base: call ``base_layer`` instead of reading its weight (None: only for a quantized base;
                False is refused for one).

        Raises:
            TypeError: ``base_layer`` is not linear-like.
            ValueError: ``call_base=False`` with a quantized base, or a bad option (see ``MoELoRAConfig``).
        """
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"MoELoRALinear wraps an nn.Linear or a Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.quantized_base = is_quantized_linear(base_layer)
        if call_base is False and self.quantized_base:
            raise ValueError(
                f"call_base=False reads the base weight, but {type(base_layer).__name__} holds it quantized "
                "(bitsandbytes); a quantized base is always called"
            )
        self.call_base = self.quantized_base if call_base is None else bool(call_base)
        self.transposed = is_conv1d(base_layer)  # Conv1D stores its weight as (in, out)
        if self.quantized_base:  # the packed weight's shape is not (out, in)
            self.out_features, self.in_features = int(base_layer.out_features), int(base_layer.in_features)
        else:
            self.out_features, self.in_features = self.base_weight.shape
        self.num_experts = num_experts
        ranks = expert_rank_list(rank, num_experts)
        maturity = check_maturity_policy(mature_after_steps, maturity_temperature, maturity_anneal_steps)
        self.alpha = alpha
        self.use_rslora = bool(use_rslora)
        self._requested_top_k = top_k  # top_k is capped at E, which add_expert raises
        self.top_k = num_experts if routing in DENSE_MODES else min(top_k, num_experts)
        self.routing = routing
        self.gate_grad_power = gate_grad_power
        self.scale_factor = 1.0
        self.router_temperature = float(router_temperature)
        self.router_noise_std = float(router_noise_std)
        self.top_p = float(top_p)
        self.init_b_std = float(init_b_std)
        self.init_info = init
        use_sparse_experts(expert_compute, routing, self.top_k, num_experts)  # validates expert_compute
        self.expert_compute = expert_compute
        self.recompute_hidden = bool(recompute_hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, max(ranks), self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, max(ranks), **factory))
        if routing == "global":
            self.router = None
            self.global_gate = nn.Parameter(torch.zeros(num_experts, **factory))
        else:
            self.router = nn.Linear(self.in_features, num_experts, bias=False, **factory)
            self.register_parameter("global_gate", None)
        if expert_scales:
            self.expert_scale = nn.Parameter(torch.ones(num_experts, self.out_features, **factory))
        else:
            self.register_parameter("expert_scale", None)
        # continual learning: rows the riemix optimizers hold fixed (freeze_expert); saved by the adapter format
        mask = {"dtype": torch.bool, "device": weight.device}
        self.register_buffer("frozen_experts", torch.zeros(num_experts, **mask), persistent=False)  # (E,)
        self.register_buffer("frozen_router_rows", torch.zeros(num_experts, **mask), persistent=False)  # (E,)
        self._frozen_cache: dict[str, tuple[torch.Tensor, int | None, torch.Tensor | None]] = {}
        # PiSSA: the step-0 delta up @ down removed from the base weight (kept to rebuild the residual), and
        # the entries where residual + up @ down does not round back to the original weight (to undo it).
        self.register_buffer("pissa_down", None, persistent=False)
        self.register_buffer("pissa_up", None, persistent=False)
        self.register_buffer("pissa_fix_index", None, persistent=False)
        self.register_buffer("pissa_fix_value", None, persistent=False)
        self.record_routing = False
        self.last_router_logits: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None
        self.selection_bias: torch.Tensor | None = None
        # expert_ranks, rank, scaling, expert_age, max_experts, capacity_policy
        self._init_dynamic(ranks, maturity, weight.device, max_experts, capacity_policy)
        self.reset_adapter_parameters(init, router_init_std)

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as ``(out, in)`` (a transposed view for a ``Conv1D``; writes go through).

        Raises:
            ValueError: the base is quantized (its weight is packed, not an ``(out, in)`` matrix).
        """
        if self.quantized_base:
            raise ValueError(
                f"the base layer is a bitsandbytes {type(self.base_layer).__name__}: its weight is stored "
                "quantized (packed), not as an (out, in) matrix; load the base without quantization to read it"
            )
        weight = self.base_layer.weight
        return weight.t() if self.transposed else weight

    @property
    def gate_weight(self) -> torch.Tensor:
        """The routing parameter: the router weight ``(E, in)`` or the global gate logits ``(E,)``."""
        return self.global_gate if self.router is None else self.router.weight

    @torch.no_grad()
    def reset_adapter_parameters(self, init: str = "zero_b", router_init_std: float = 0.02) -> None:
        """(Re)initialise experts, router/global gate and expert scales (see ``riemix.core.init``).

        Every init but ``"small_b"`` leaves the layer output unchanged (``"small_b"`` does so only while
        ``scale_factor`` is 0).  ``"pissa"`` rewrites ``base_layer.weight`` to the residual; calling it
        twice would factor the residual, so it refuses a layer that already carries PiSSA factors.

        Args:
            init: ``"zero_b"``, ``"gaussian"``, ``"orthogonal"``, ``"pissa"`` or ``"small_b"``.
            router_init_std: std of the router's normal init (the router is zero for ``"pissa"``).

        Raises:
            ValueError: for an unknown init or a repeated PiSSA init.
        """
        initialise_layer(self, init, router_init_std)

    @property
    def sparse_experts(self) -> bool:
        """Whether the forward computes only the selected (token, expert) pairs (``riemix.core.sparse``)."""
        now = self.routing_now()
        device = self.lora_A.device.type
        return use_sparse_experts(self._compute_now(now.mode), now.mode, now.top_k, self.num_experts, device)

    def _compute_now(self, mode: str) -> str:
        """``expert_compute`` for the routing in force (``"sparse"`` cannot run the dense maturity routing)."""
        return "dense" if mode in DENSE_MODES and self.expert_compute == "sparse" else self.expert_compute

    def compute_gates(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and gates for flattened tokens (clean logits: no selection noise).

        Args:
            x2d: ``(N, in)`` layer input.

        Returns:
            ``(logits, gates)``, both ``(N, E)``; gates are fp32 (fp64 for fp64 inputs).
        """
        if self.router is None:
            logits = self.global_gate.unsqueeze(0).expand(x2d.shape[0], -1)  # (N, E)
        else:
            logits = self.router(x2d.to(self.router.weight.dtype))  # (N, E)
        now = self.routing_now()
        gates, _ = route(logits, now.mode, now.top_k, now.temperature, self.top_p)  # (N, E)
        return logits, gates

    def effective_lora_b(self) -> torch.Tensor:
        """``(E, out, R)`` B with the expert scales and the rank ratios folded in ((sᵢ/s)·σᵢ ⊙ Bᵢ), or B itself."""
        b = self.lora_B if self.expert_scale is None else self.lora_B * self.expert_scale.unsqueeze(-1)  # (E, out, R)
        return b if self.rank_scale is None else b * self.rank_scale.to(b.dtype).view(-1, 1, 1)  # (E, out, R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the base layer and the gated experts.

        Args:
            x: ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        lead = x.shape[:-1]
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(x.dtype, self.lora_A.dtype)
        out_dtype = dtype if torch.is_autocast_enabled(device_type) else x.dtype
        x2d = x.reshape(-1, self.in_features).to(dtype)  # (N, in)
        x_drop = self.dropout(x2d) if isinstance(self.dropout, nn.Dropout) and self.training else None
        now = self.routing_now()  # the layer's routing, or dense while an expert is immature (maturity)
        noise = None
        if self.training and self.router_noise_std > 0 and now.mode not in DENSE_MODES:
            noise_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            noise = torch.randn(x2d.shape[0], self.num_experts, dtype=noise_dtype, device=x.device)  # (N, E)
            noise = noise * self.router_noise_std
        if self.selection_bias is not None:
            bias = self._selection_bias(lead, x.device)  # (N, E)
            noise = bias if noise is None else noise + bias
        base = self.base_layer
        fused = not self.call_base
        with torch.autocast(device_type, enabled=False):
            # a called base (quantized: packed weight) keeps its own autograd and gives its part of ∂L/∂x
            y_base = None if fused else base(x2d.view(x.shape)).reshape(-1, self.out_features)  # (N, out)
            y, logits, gates = moe_lora_linear(
                x2d,
                self.base_weight.to(dtype) if fused else None,
                None if base.bias is None or not fused else base.bias.to(dtype),
                self.lora_A.to(dtype),
                self.effective_lora_b().to(dtype),
                self.gate_weight.to(dtype),
                now.mode,
                now.top_k,
                self.gate_grad_power,
                self.scaling * self.scale_factor,
                x_drop,
                temperature=now.temperature,
                top_p=self.top_p,
                noise=noise,
                expert_compute=self._compute_now(now.mode),
                recompute_hidden=self.recompute_hidden,
            )  # (N, out), (N, E), (N, E)
        if y_base is not None:
            y = y_base.to(y.dtype) + y  # (N, out): base + s·Σ g·B A x̃
        if self.record_routing:
            self.last_router_logits, self.last_gates = logits, gates
        return y.view(*lead, self.out_features).to(out_dtype)

    def _selection_bias(self, lead: torch.Size, device: torch.device) -> torch.Tensor:
        """``selection_bias`` expanded to every token: ``(N, E)`` float32."""
        bias = self.selection_bias.to(device, torch.float32)
        n = lead.numel()
        if bias.shape == (self.num_experts,):
            return bias.expand(n, -1)  # (N, E)
        if bias.dim() != 2 or bias.shape[1] != self.num_experts or len(lead) < 2 or bias.shape[0] != lead[0]:
            raise ValueError(
                f"selection_bias has shape {tuple(bias.shape)}: expected ({self.num_experts},) or (B, "
                f"{self.num_experts}) for an input of leading shape {tuple(lead)}"
            )
        return bias.repeat_interleave(n // lead[0], dim=0)  # (N, E): each example's row for its tokens

    def delta_weight(self, gates: torch.Tensor) -> torch.Tensor:
        """The effective weight update s·f·Σᵢ gᵢ·(σᵢ ⊙ Bᵢ) Aᵢ for one fixed gate vector (f: scale_factor).

        Args:
            gates: ``(E,)`` gate values.

        Returns:
            ``(out, in)`` weight delta.
        """
        return (self.scaling * self.scale_factor) * torch.einsum(
            "e,eor,eri->oi", gates.to(self.lora_A.dtype), self.effective_lora_b(), self.lora_A
        )

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
            f"rank={self.rank}, scaling={self.scaling:g}, routing={self.routing}, p={self.gate_grad_power}, "
            + (f"expert_ranks={self.expert_ranks}, " if self.rank_scale is not None else "")
            + f"experts_computed={'sparse' if self.sparse_experts else 'dense'}"
            + (", base=called" if self.call_base else "")
        )


def iter_moe_lora_layers(model: nn.Module) -> Iterator[tuple[str, MoELoRALinear]]:
    """Yield ``(name, layer)`` for every ``MoELoRALinear`` in ``model`` (re-exported by ``riemix.core.tuner``)."""
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear):
            yield name, module
