"""The MoE-LoRA layer: a frozen ``nn.Linear`` plus E fused low-rank experts and a per-token router.

    y = base(x) + s · Σᵢ gᵢ(x) · Bᵢ Aᵢ dropout(x)

All experts are computed at once from stacked tensors: h = x̃·A_catᵀ has width E·r, is gate-weighted
per expert block and multiplied by B_catᵀ.  One custom autograd node computes the base projection, the
router logits (sharing the matmul over x with A when there is no dropout), the gates and the experts,
accumulating into one output buffer.  It implements *gate rescaling*
(Sun et al., ICML 2025): the forward value is gᵢ·eᵢ, the gradient reaching Aᵢ, Bᵢ and x is weighted by
cᵢ = stopgrad(gᵢ^p) instead of gᵢ, and the router receives the ordinary ∂L/∂gᵢ = s·<∂L/∂y, Bᵢ Aᵢ x̃>.
Equivalently wᵢ = cᵢ·eᵢ + (gᵢ − cᵢ)·stopgrad(eᵢ); the fused function computes that without a second
pass over B.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from riemix.core.routing import gate_grad_coefficients, gate_multiplier, route, softmax_gate_backward

__all__ = ["MoELoRALinear", "RouteSpec", "moe_lora_linear"]


class RouteSpec(NamedTuple):
    """Non-tensor routing options of the fused function.

    Attributes:
        mode: routing mode (see ``riemix.routing.route``).
        top_k: experts per token (the cap of ``"top_p"``).
        temperature: router temperature T.
        top_p: mass threshold of ``"top_p"``.
    """

    mode: str
    top_k: int
    temperature: float = 1.0
    top_p: float = 1.0


class _MoELoRAFunction(torch.autograd.Function):
    """Base linear + router + fused experts in one autograd node. See ``moe_lora_linear``."""

    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, router_w, noise, spec, power, scaling):  # noqa: D102
        ctx.set_materialize_grads(False)
        n = x.shape[0]  # x: (N, in)
        e, r, d_in = lora_a.shape  # lora_a: (E, r, in)
        d_out = lora_b.shape[1]  # lora_b: (E, out, r)
        a_cat = lora_a.reshape(e * r, d_in)  # (E·r, in)
        b_cat = lora_b.permute(1, 0, 2).reshape(d_out, e * r)  # (out, E·r)
        is_global = spec.mode == "global"
        if is_global:  # router_w: (E,) per-layer gate logits, the same for every token
            w_cat = a_cat if x_drop is None else None
            h = (x if x_drop is None else x_drop) @ a_cat.t()  # (N, E·r)
            logits = router_w.unsqueeze(0).expand(n, e).contiguous()  # (N, E)
        elif x_drop is None:  # router and experts read the same input: one pass over x
            w_cat = torch.cat([a_cat, router_w])  # (E·r + E, in)
            hl = x @ w_cat.t()  # (N, E·r + E)
            h, logits = hl[:, : e * r], hl[:, e * r :].contiguous()  # (N, E·r), (N, E)
        else:
            w_cat = None
            h = x_drop @ a_cat.t()  # (N, E·r)
            logits = x @ router_w.t()  # (N, E)
        gates, _ = route(logits, spec.mode, spec.top_k, spec.temperature, spec.top_p, noise)  # (N, E)
        coef = gate_grad_coefficients(gates, power)  # (N, E)
        y = F.linear(x, weight, bias)  # (N, out)
        u = (h.view(n, e, r) * (gates * scaling).to(h.dtype).unsqueeze(-1)).view(n, e * r)  # (N, E·r)
        y.addmm_(u, b_cat.t())  # (N, out) += s·Σ g·B A x̃
        ctx.save_for_backward(x, x_drop, weight, a_cat, b_cat, router_w, w_cat, h, gates, coef)
        ctx.meta = (
            e,
            r,
            scaling,
            bias is not None,
            is_global,
            spec.temperature,
            gate_multiplier(spec.mode, e),
        )
        ctx.mark_non_differentiable(gates)
        return y, logits, gates

    @staticmethod
    def backward(ctx, grad_y, grad_logits, _grad_gates):  # noqa: D102
        x, x_drop, weight, a_cat, b_cat, router_w, w_cat, h, gates, coef = ctx.saved_tensors
        e, r, s, has_bias, is_global, temperature, mult = ctx.meta
        n, d_in = x.shape
        need = ctx.needs_input_grad
        dtype = x.dtype
        if grad_y is None:
            grad_y = torch.zeros(n, b_cat.shape[0], dtype=dtype, device=x.device)
        du = grad_y @ b_cat  # (N, E·r): ∂L/∂(gated h), without s
        dg = (du.view(n, e, r) * h.view(n, e, r)).sum(-1).to(gates.dtype) * s  # (N, E) = s·<∂L/∂y, Bᵢ Aᵢ x̃>
        # gates = m·softmax(logits/T) over the selected set: ∂L/∂l = (g/T) ⊙ (∂L/∂g − ⟨g, ∂L/∂g⟩/m).
        dlog = softmax_gate_backward(gates, dg, temperature, mult)  # (N, E)
        if grad_logits is not None:
            dlog = dlog + grad_logits.to(gates.dtype)
        dlog = dlog.to(dtype)
        dh = (du.view(n, e, r) * (coef * s).to(dtype).unsqueeze(-1)).view(n, e * r)  # (N, E·r), weighted by c
        grad_x = grad_xd = grad_w = grad_b = grad_a = grad_bb = grad_r = None
        if is_global:
            expert_in = x if x_drop is None else x_drop  # (N, in)
            if need[0]:
                grad_x = grad_y @ weight  # (N, in)
                if x_drop is None:
                    grad_x = grad_x.addmm_(dh, a_cat)
            if need[1]:
                grad_xd = dh @ a_cat  # (N, in)
            if need[4]:
                grad_a = (dh.t() @ expert_in).view(e, r, d_in)  # (E, r, in)
            if need[6]:
                grad_r = dlog.sum(0)  # (E,)
        elif x_drop is None:
            d_cat = torch.cat([dh, dlog], dim=1)  # (N, E·r + E)
            if need[0]:
                grad_x = (grad_y @ weight).addmm_(d_cat, w_cat)  # (N, in)
            if need[4] or need[6]:
                g_cat = d_cat.t() @ x  # (E·r + E, in)
                grad_a, grad_r = g_cat[: e * r].view(e, r, d_in), g_cat[e * r :]
        else:
            if need[0]:
                grad_x = (grad_y @ weight).addmm_(dlog, router_w)  # (N, in)
            if need[1]:
                grad_xd = dh @ a_cat  # (N, in)
            if need[4]:
                grad_a = (dh.t() @ x_drop).view(e, r, d_in)  # (E, r, in)
            if need[6]:
                grad_r = dlog.t() @ x  # (E, in)
        if need[5]:
            hc = (h.view(n, e, r) * (coef * s).to(dtype).unsqueeze(-1)).view(n, e * r)  # (N, E·r)
            grad_bb = (grad_y.t() @ hc).view(-1, e, r).permute(1, 0, 2).contiguous()  # (E, out, r)
        if need[2]:
            grad_w = grad_y.t() @ x  # (out, in)
        if need[3] and has_bias:
            grad_b = grad_y.sum(0)  # (out,)
        return grad_x, grad_xd, grad_w, grad_b, grad_a, grad_bb, grad_r, None, None, None, None


def moe_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router_weight: torch.Tensor,
    routing: str,
    top_k: int,
    gate_grad_power: float,
    scaling: float,
    x_drop: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional MoE-LoRA linear: ``y = x Wᵀ + b + s·Σᵢ gᵢ(x)·Bᵢ Aᵢ x̃`` with gate-rescaled gradients.

    One autograd node computes the base projection, the router logits, the gates and all experts from
    stacked tensors.  When there is no dropout the router and the experts share one matmul over x.
    Backward: A, B and x̃ receive gradients weighted by cᵢ = stopgrad(gᵢ^p); the router receives the
    ordinary gradient (plus any gradient flowing into the returned logits, e.g. from auxiliary losses).

    Args:
        x: ``(N, in)`` input (router input, and expert input when ``x_drop`` is None).
        weight: ``(out, in)`` base weight.
        bias: ``(out,)`` base bias or None.
        lora_a: ``(E, r, in)`` stacked A matrices.
        lora_b: ``(E, out, r)`` stacked B matrices.
        router_weight: ``(E, in)`` router weight, or the ``(E,)`` gate logits for ``routing="global"``.
        routing: routing mode (see ``riemix.routing.route``).
        top_k: experts per token.
        gate_grad_power: p in [0, 1].
        scaling: adapter scale s.
        x_drop: ``(N, in)`` expert input after dropout, or None to use ``x``.
        temperature: router temperature T > 0.
        top_p: mass threshold of ``routing="top_p"``.
        noise: optional ``(N, E)`` selection noise (noisy top-k; gate values use the clean logits).

    Returns:
        ``(y, logits, gates)``: ``(N, out)`` output, ``(N, E)`` router logits (differentiable) and
        ``(N, E)`` fp32 gates (not differentiable; for diagnostics).
    """
    spec = RouteSpec(routing, int(top_k), float(temperature), float(top_p))
    return _MoELoRAFunction.apply(
        x,
        x_drop,
        weight,
        bias,
        lora_a,
        lora_b,
        router_weight,
        noise,
        spec,
        float(gate_grad_power),
        float(scaling),
    )


class MoELoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with a mixture of LoRA experts and a router.

    Attributes:
        base_layer: the wrapped, frozen ``nn.Linear`` (its weight is the PiSSA residual after
            ``init="pissa"``).
        lora_A: ``(E, r, in_features)`` expert down-projections.
        lora_B: ``(E, out_features, r)`` expert up-projections.
        router: ``nn.Linear(in_features, E, bias=False)`` for the per-token modes, None for ``"global"``.
        global_gate: ``(E,)`` gate logits w of ``routing="global"`` (gᵢ = E·softmax(w/T)ᵢ), else None.
        expert_scale: ``(E, out_features)`` channel-wise scale of each expert's output (``expert_scales``),
            else None.
        scaling: adapter scale s (``alpha/r`` or ``alpha/sqrt(r)``).
        scale_factor: multiplier of s in [0, 1] (scale warm-up; see ``riemix.tuner.set_scale_progress``).
        router_temperature: current router temperature T (see ``riemix.tuner.set_router_temperature``).
        router_noise_std: std of the selection noise added to the logits in training mode.
        top_p: mass threshold of ``routing="top_p"``.
        init_info: how the last init went (``"joint"``/``"per_expert"`` for ``"orthogonal"``, else the
            init name).
        record_routing: when True, ``last_router_logits`` ``(N, E)`` and ``last_gates`` ``(N, E)`` keep the
            latest forward's routing (used by auxiliary losses and diagnostics).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
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
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoELoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = num_experts
        self.rank = rank
        self.alpha = alpha
        self.top_k = num_experts if routing in ("dense", "global") else min(top_k, num_experts)
        self.routing = routing
        self.gate_grad_power = gate_grad_power
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.scale_factor = 1.0
        self.router_temperature = float(router_temperature)
        self.router_noise_std = float(router_noise_std)
        self.top_p = float(top_p)
        self.init_b_std = float(init_b_std)
        self.init_info = init
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
        # PiSSA: the step-0 delta up @ down removed from the base weight (kept to rebuild the residual).
        self.register_buffer("pissa_down", None, persistent=False)
        self.register_buffer("pissa_up", None, persistent=False)
        self.record_routing = False
        self.last_router_logits: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None
        self.reset_adapter_parameters(init, router_init_std)

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
        from riemix.core.init import initialise_layer

        initialise_layer(self, init, router_init_std)

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
        if self.training and self.router_noise_std > 0 and self.routing not in ("dense", "global"):
            noise_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            noise = torch.randn(x2d.shape[0], self.num_experts, dtype=noise_dtype, device=x.device)  # (N, E)
            noise = noise * self.router_noise_std
        base = self.base_layer
        with torch.autocast(device_type, enabled=False):
            y, logits, gates = moe_lora_linear(
                x2d,
                base.weight.to(dtype),
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
            f"rank={self.rank}, scaling={self.scaling:g}, routing={self.routing}, p={self.gate_grad_power}"
        )
