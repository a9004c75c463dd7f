"""The MoE-LoRA layer: a frozen linear map plus E fused low-rank experts and a per-token router.

    y = base(x) + s · Σᵢ gᵢ(x) · Bᵢ Aᵢ dropout(x)

``MoELoRALinear`` owns the parameters (stacked ``lora_A`` ``(E, r, in)``, ``lora_B`` ``(E, out, r)``, the
router or the global gate, optional expert scales) and the runtime state (scale warm-up factor, router
temperature, recorded routing); the math of one call is ``riemix.core.functional.moe_lora_linear`` (one
fused autograd node with gate-rescaled gradients, see that module).  Initialisations are in
``riemix.core.init``.

The wrapped module is an ``nn.Linear`` or a GPT-2-style ``Conv1D`` (a linear map whose weight is stored
transposed, ``(in, out)``, as in GPT-2, GPT-J's ancestors and DistilGPT-2); ``base_weight`` always reads
it as ``(out, in)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from riemix.core.config import DENSE_MODES
from riemix.core.functional import moe_lora_linear
from riemix.core.init import initialise_layer
from riemix.core.routing import route
from riemix.core.sparse import use_sparse_experts

__all__ = ["MoELoRALinear", "is_conv1d", "is_linear_like", "iter_moe_lora_layers"]


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


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map MoE-LoRA can wrap: an ``nn.Linear`` or a ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class MoELoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with a mixture of LoRA experts and a router.

    Attributes:
        base_layer: the wrapped, frozen ``nn.Linear`` or ``Conv1D`` (its weight is the PiSSA residual after
            ``init="pissa"``).
        pissa_down, pissa_up: after ``init="pissa"``, the fp64 factors of the part moved out of the base
            weight (W_res = W − pissa_up @ pissa_down), else None.
        pissa_fix_index, pissa_fix_value: after ``init="pissa"``, the entries of W that W_res + up @ down
            does not round back to (``riemix.core.init.pissa_fixes``), else None.
        lora_A: ``(E, r, in_features)`` expert down-projections.
        lora_B: ``(E, out_features, r)`` expert up-projections.
        router: ``nn.Linear(in_features, E, bias=False)`` for the per-token modes, None for ``"global"``.
        global_gate: ``(E,)`` gate logits w of ``routing="global"`` (gᵢ = E·softmax(w/T)ᵢ), else None.
        expert_scale: ``(E, out_features)`` channel-wise scale of each expert's output (``expert_scales``),
            else None.
        scaling: adapter scale s (``alpha/r`` or ``alpha/sqrt(r)``).
        scale_factor: multiplier of s in [0, 1] (scale warm-up; see ``riemix.core.schedules.set_scale_progress``).
        router_temperature: current router temperature T (see ``riemix.core.schedules.set_router_temperature``).
        router_noise_std: std of the selection noise added to the logits in training mode.
        top_p: mass threshold of ``routing="top_p"``.
        init_info: how the last init went (``"joint"``/``"per_expert"`` for ``"orthogonal"``, else the
            init name).
        expert_compute: ``"auto"``, ``"dense"`` or ``"sparse"`` (see ``MoELoRAConfig.expert_compute``);
            ``sparse_experts`` says which path the layer takes.
        recompute_hidden: keep only the gates for the backward and recompute h = A x̃ there (see
            ``MoELoRAConfig.recompute_hidden``).
        record_routing: when True, ``last_router_logits`` ``(N, E)`` and ``last_gates`` ``(N, E)`` keep the
            latest forward's routing (used by auxiliary losses and diagnostics).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        rank: int,
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
    ) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"MoELoRALinear wraps an nn.Linear or a Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.transposed = is_conv1d(base_layer)  # Conv1D stores its weight as (in, out)
        self.out_features, self.in_features = self.base_weight.shape
        self.num_experts = num_experts
        self.rank = rank
        self.alpha = alpha
        self.top_k = num_experts if routing in DENSE_MODES else min(top_k, num_experts)
        self.routing = routing
        self.gate_grad_power = gate_grad_power
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
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
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank, **factory))
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
        # PiSSA: the step-0 delta up @ down removed from the base weight (kept to rebuild the residual), and
        # the entries where residual + up @ down does not round back to the original weight (to undo it).
        self.register_buffer("pissa_down", None, persistent=False)
        self.register_buffer("pissa_up", None, persistent=False)
        self.register_buffer("pissa_fix_index", None, persistent=False)
        self.register_buffer("pissa_fix_value", None, persistent=False)
        self.record_routing = False
        self.last_router_logits: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None
        self.reset_adapter_parameters(init, router_init_std)

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as ``(out, in)`` (a transposed view for a ``Conv1D``; writes go through)."""
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
        return use_sparse_experts(
            self.expert_compute, self.routing, self.top_k, self.num_experts, self.lora_A.device.type
        )

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
        gates, _ = route(logits, self.routing, self.top_k, self.router_temperature, self.top_p)  # (N, E)
        return logits, gates

    def effective_lora_b(self) -> torch.Tensor:
        """``(E, out, r)`` B with the expert scales folded in (σᵢ ⊙ Bᵢ), or B itself."""
        if self.expert_scale is None:
            return self.lora_B
        return self.lora_B * self.expert_scale.unsqueeze(-1)  # (E, out, r)

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
        noise = None
        if self.training and self.router_noise_std > 0 and self.routing not in DENSE_MODES:
            noise_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            noise = torch.randn(x2d.shape[0], self.num_experts, dtype=noise_dtype, device=x.device)  # (N, E)
            noise = noise * self.router_noise_std
        base = self.base_layer
        with torch.autocast(device_type, enabled=False):
            y, logits, gates = moe_lora_linear(
                x2d,
                self.base_weight.to(dtype),
                None if base.bias is None else base.bias.to(dtype),
                self.lora_A.to(dtype),
                self.effective_lora_b().to(dtype),
                self.gate_weight.to(dtype),
                self.routing,
                self.top_k,
                self.gate_grad_power,
                self.scaling * self.scale_factor,
                x_drop,
                temperature=self.router_temperature,
                top_p=self.top_p,
                noise=noise,
                expert_compute=self.expert_compute,
                recompute_hidden=self.recompute_hidden,
            )  # (N, out), (N, E), (N, E)
        if self.record_routing:
            self.last_router_logits, self.last_gates = logits, gates
        return y.view(*lead, self.out_features).to(out_dtype)

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
            f"experts_computed={'sparse' if self.sparse_experts else 'dense'}"
        )


def iter_moe_lora_layers(model: nn.Module) -> Iterator[tuple[str, MoELoRALinear]]:
    """Yield ``(name, layer)`` for every ``MoELoRALinear`` in ``model`` (re-exported by ``riemix.core.tuner``)."""
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear):
            yield name, module
