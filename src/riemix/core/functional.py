"""The MoE-LoRA linear as a function: one fused autograd node, and the same math written plainly.

    y = x Wᵀ + b + s · Σᵢ gᵢ(x) · Bᵢ Aᵢ x̃          (x̃: the expert input, x after dropout)

with *gate rescaling* (Sun et al., ICML 2025): the forward value of expert i is gᵢ·eᵢ (eᵢ = Bᵢ Aᵢ x̃),
but the gradient reaching Aᵢ, Bᵢ and x̃ is weighted by cᵢ = stopgrad(gᵢ^p) instead of gᵢ, while the
router receives the ordinary ∂L/∂gᵢ = s·⟨∂L/∂y, eᵢ⟩.  Equivalently each expert contributes
wᵢ = cᵢ·eᵢ + (gᵢ − cᵢ)·stopgrad(eᵢ).

- ``moe_lora_linear`` runs ``_MoELoRAFunction``: all experts from stacked tensors (h = x̃·A_catᵀ has width
  E·r, is gate-weighted per expert block and multiplied by B_catᵀ), the router logits sharing the matmul
  over x with A when there is no dropout, and a hand-written backward that applies cᵢ without a second
  pass over B.  It keeps the gates (k values and indices per token) and the selected experts' blocks of h
  for the backward (only the gates with ``recompute_hidden``); with gradients off (inference) the same
  forward runs without an autograd node.  When only
  a few experts are active per token (``expert_compute``, see
  ``riemix.core.sparse.use_sparse_experts``) it hands over to ``riemix.core.sparse``, which computes the
  selected (token, expert) pairs only, with the same math.
- ``reference_moe_lora_linear`` is the readable version: a loop over experts with ordinary autograd.
  Tests compare the two in every routing mode (see docs/math.md).

With ``weight=None`` both compute the adapter term alone, s·Σᵢ gᵢ(x)·Bᵢ Aᵢ x̃, and its gradients (∂L/∂x then
holds the router's and the experts' parts only): the caller computes the base output itself, through the
base module's own autograd, and adds it.  That is how a layer wraps a quantized base (bitsandbytes
``Linear4bit`` / ``Linear8bitLt``) whose weight is packed and cannot be read as an ``(out, in)`` matrix.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from riemix.core.config import DENSE_MODES
from riemix.core.routing import gate_grad_coefficients, gate_multiplier, route, softmax_gate_backward
from riemix.core.sparse import sparse_moe_lora_linear, use_sparse_experts

__all__ = ["RouteSpec", "moe_lora_linear", "reference_moe_lora_linear"]


class RouteSpec(NamedTuple):
    """Non-tensor routing options of the fused function.

    Attributes:
        mode: routing mode (see ``riemix.core.routing.route``).
        top_k: experts per token (the cap of ``"top_p"``).
        temperature: router temperature T.
        top_p: mass threshold of ``"top_p"``.
    """

    mode: str
    top_k: int
    temperature: float = 1.0
    top_p: float = 1.0


class _Inputs(NamedTuple):
    """The inputs of ``_MoELoRAFunction.forward``, by name.

    Used twice in ``backward``: to read ``ctx.needs_input_grad`` (``need.lora_a``) and to build the tuple
    of gradients it returns (one slot per input; None for the non-tensor ones and the unneeded ones).
    """

    x: Any = None
    x_drop: Any = None
    weight: Any = None
    bias: Any = None
    lora_a: Any = None
    lora_b: Any = None
    router_w: Any = None
    noise: Any = None
    spec: Any = None
    power: Any = None
    scaling: Any = None
    recompute: Any = None


class _Meta(NamedTuple):
    """Non-tensor state saved by the forward for the backward."""

    num_experts: int
    rank: int
    scaling: float
    power: float
    has_bias: bool
    is_global: bool
    temperature: float
    multiplier: float  # m in gates = m·softmax over the selected set (see routing.gate_multiplier)


def _shared_x(
    experts: torch.Tensor, router: torch.Tensor, experts_read_x: bool, is_global: bool, dim: int
) -> torch.Tensor | None:
    """The blocks of the forward's one shared matmul over x, concatenated along ``dim``.

    Expert block first when the experts read x (no dropout), then the router block when the routing is
    per-token; None when neither does (global gate with dropout).  The forward stacks the weights
    (A_cat ``(E·r, in)``, router ``(E, in)``; dim 0), the backward their output gradients (dim 1).
    """
    parts = ([experts] if experts_read_x else []) + ([] if is_global else [router])
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _compact_gates(gates: Tensor, spec: RouteSpec) -> tuple[Tensor, Tensor | None]:
    """The gates as the backward needs them: ``(values, index)`` of the k largest, or ``(gates, None)``.

    A routing that selects (top-k, top-p) leaves at most k nonzero gates per token, so the (N, k) largest
    values and their expert indices (uint8 for E <= 256, else int16/int32) rebuild the (N, E) gates exactly
    (the unselected are 0; a tie among zeros picks any of them, with the same result).  ``dense`` and
    ``global`` routing keep the full (N, E) gates.
    """
    num_experts = gates.shape[1]
    if spec.mode in DENSE_MODES or spec.top_k >= num_experts:
        return gates, None
    values, index = gates.topk(spec.top_k, dim=1)  # (N, k), (N, k)
    small = torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32767 else torch.int32
    return values, index.to(small)


def _block_index(index: Tensor, rank: int) -> Tensor:
    """``(N, k, r)`` int64 index of the k selected experts' blocks in an ``(N, E, r)`` view of h."""
    return index.long().unsqueeze(-1).expand(*index.shape, rank)


def _selected_blocks(h: Tensor, index: Tensor, rank: int) -> Tensor:
    """``(N, k, r)``: the blocks of h ``(N, E·r)`` of the k selected experts of each token."""
    return h.view(h.shape[0], -1, rank).gather(1, _block_index(index, rank))


def _dense_forward(x, x_drop, weight, bias, lora_a, lora_b, router_w, noise, spec, scaling):
    """The dense forward: ``(y, logits, gates, h)``, every expert computed for every token (h: (N, E·r))."""
    n = x.shape[0]  # x: (N, in)
    e, r, d_in = lora_a.shape  # lora_a: (E, r, in)
    d_out = lora_b.shape[1]  # lora_b: (E, out, r)
    a_cat = lora_a.reshape(e * r, d_in)  # (E·r, in)
    b_cat = lora_b.permute(1, 0, 2).reshape(d_out, e * r)  # (out, E·r)
    is_global = spec.mode == "global"
    experts_read_x = x_drop is None
    # One pass over x for whatever reads it: [A_cat; router] without dropout (per-token routing).
    w_cat = _shared_x(a_cat, router_w, experts_read_x, is_global, dim=0)  # (K, in) or None
    hx = None if w_cat is None else x @ w_cat.t()  # (N, K)
    split = e * r if experts_read_x else 0  # where the router columns of hx start
    h = hx[:, :split] if experts_read_x else x_drop @ a_cat.t()  # (N, E·r)
    if is_global:  # router_w: (E,) per-layer gate logits, the same for every token
        logits = router_w.unsqueeze(0).expand(n, e).contiguous()  # (N, E)
    else:
        logits = hx[:, split:].contiguous()  # (N, E)
    gates, _ = route(logits, spec.mode, spec.top_k, spec.temperature, spec.top_p, noise)  # (N, E)
    u = (h.view(n, e, r) * (gates * scaling).to(h.dtype).unsqueeze(-1)).view(n, e * r)  # (N, E·r)
    if weight is None:  # the adapter term alone: the caller adds the base output
        return u @ b_cat.t(), logits, gates, h  # (N, out) = s·Σ g·B A x̃
    y = F.linear(x, weight, bias)  # (N, out)
    y.addmm_(u, b_cat.t())  # (N, out) += s·Σ g·B A x̃
    return y, logits, gates, h


class _MoELoRAFunction(torch.autograd.Function):
    """Base linear (none with ``weight=None``) + router + fused experts in one autograd node. See ``moe_lora_linear``.

    What a training forward keeps for the backward, besides its inputs (x, which any LoRA keeps, and the
    parameters): the gates, compactly (``_compact_gates``: k values and k small indices per token), and,
    unless ``recompute``, the selected experts' blocks of h = x̃ A_catᵀ, (N, k, r) (all of h for routings
    that do not select): the backward only needs those, since the others are multiplied by gᵢ = cᵢ = 0.
    That is a PEFT LoRA's (N, k·r) at the same active rank plus 5 bytes per selected expert.  With
    ``recompute`` the backward computes h again (one (N, in) x (in, E·r) product) and a layer keeps less
    than that LoRA (``benchmarks/layer_memory.py``).  The coefficients cᵢ = gᵢ^p come from the gates and
    the stacked weights from the parameters in the backward.
    """

    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, router_w, noise, spec, power, scaling, recompute):  # noqa: D102
        ctx.set_materialize_grads(False)
        y, logits, gates, h = _dense_forward(x, x_drop, weight, bias, lora_a, lora_b, router_w, noise, spec, scaling)
        e, r = lora_a.shape[:2]  # lora_a: (E, r, in)
        is_global = spec.mode == "global"
        # Saved: the inputs (x is kept by any LoRA; the rest are parameters), the gates, compactly, and h
        # unless it is recomputed; b_cat and w_cat are rebuilt from the parameters (see the class doc).
        values, index = _compact_gates(gates, spec)  # (N, k) and (N, k) or (N, E) and None
        kept = None if recompute else h if index is None else _selected_blocks(h, index, r)  # (N, E·r) or (N, k, r)
        ctx.save_for_backward(x, x_drop, weight, lora_a, lora_b, router_w, values, index, kept)
        ctx.meta = _Meta(
            num_experts=e,
            rank=r,
            scaling=scaling,
            power=power,
            has_bias=bias is not None,
            is_global=is_global,
            temperature=spec.temperature,
            multiplier=gate_multiplier(spec.mode, e),
        )
        ctx.mark_non_differentiable(gates)
        return y, logits, gates

    @staticmethod
    def backward(ctx, grad_y, grad_logits, _grad_gates):  # noqa: D102
        x, x_drop, weight, lora_a, lora_b, router_w, values, index, h = ctx.saved_tensors
        meta: _Meta = ctx.meta
        e, r, s = meta.num_experts, meta.rank, meta.scaling
        n, d_in = x.shape
        need = _Inputs(*ctx.needs_input_grad)
        dtype = x.dtype
        experts_read_x = x_drop is None
        a_cat = lora_a.reshape(e * r, d_in)  # (E·r, in), a view
        b_cat = lora_b.permute(1, 0, 2).reshape(-1, e * r)  # (out, E·r)
        w_cat = _shared_x(a_cat, router_w, experts_read_x, meta.is_global, dim=0)  # (K, in) or None
        if h is None:  # recompute_hidden
            h = (x if experts_read_x else x_drop) @ a_cat.t()  # (N, E·r)
        elif index is not None:  # the selected experts' blocks: the others are multiplied by g = c = 0 below
            h = h.new_zeros(n, e, r).scatter_(1, _block_index(index, r), h).view(n, e * r)  # (N, E·r)
        gates = values if index is None else values.new_zeros(n, e).scatter_(1, index.long(), values)  # (N, E)
        coef = gate_grad_coefficients(gates, meta.power)  # (N, E)
        if grad_y is None:
            grad_y = torch.zeros(n, b_cat.shape[0], dtype=dtype, device=x.device)
        du = grad_y @ b_cat  # (N, E·r): ∂L/∂(gated h), without s
        dg = (du.view(n, e, r) * h.view(n, e, r)).sum(-1).to(gates.dtype) * s  # (N, E) = s·<∂L/∂y, Bᵢ Aᵢ x̃>
        # gates = m·softmax(logits/T) over the selected set: ∂L/∂l = (g/T) ⊙ (∂L/∂g − ⟨g, ∂L/∂g⟩/m).
        dlog = softmax_gate_backward(gates, dg, meta.temperature, meta.multiplier)  # (N, E)
        if grad_logits is not None:
            dlog = dlog + grad_logits.to(gates.dtype)
        dlog = dlog.to(dtype)
        cs = (coef * s).to(dtype).unsqueeze(-1)  # (N, E, 1): the gate-rescaled weights s·cᵢ
        dh = (du.view(n, e, r) * cs).view(n, e * r)  # (N, E·r), weighted by c
        grad = dict.fromkeys(_Inputs._fields)
        d_cat = _shared_x(dh, dlog, experts_read_x, meta.is_global, dim=1)  # (N, K): ∂L/∂(x @ w_catᵀ)
        if need.x:  # the base's part (none without a weight: the caller's base module has its own) + ours
            if weight is not None:
                grad["x"] = grad_y @ weight  # (N, in)
                if d_cat is not None:
                    grad["x"] = grad["x"].addmm_(d_cat, w_cat)  # (N, in)
            elif d_cat is not None:
                grad["x"] = d_cat @ w_cat  # (N, in)
        if d_cat is not None and ((experts_read_x and need.lora_a) or (not meta.is_global and need.router_w)):
            g_cat = d_cat.t() @ x  # (K, in)
            split = e * r if experts_read_x else 0
            if experts_read_x:
                grad["lora_a"] = g_cat[:split].view(e, r, d_in)  # (E, r, in)
            if not meta.is_global:
                grad["router_w"] = g_cat[split:]  # (E, in)
        if not experts_read_x:
            if need.x_drop:
                grad["x_drop"] = dh @ a_cat  # (N, in)
            if need.lora_a:
                grad["lora_a"] = (dh.t() @ x_drop).view(e, r, d_in)  # (E, r, in)
        if meta.is_global and need.router_w:
            grad["router_w"] = dlog.sum(0)  # (E,)
        if need.lora_b:
            hc = (h.view(n, e, r) * cs).view(n, e * r)  # (N, E·r)
            grad["lora_b"] = (grad_y.t() @ hc).view(-1, e, r).permute(1, 0, 2).contiguous()  # (E, out, r)
        if need.weight:
            grad["weight"] = grad_y.t() @ x  # (out, in)
        if need.bias and meta.has_bias:
            grad["bias"] = grad_y.sum(0)  # (out,)
        return tuple(_Inputs(**grad))


def moe_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
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
    expert_compute: str = "auto",
    recompute_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional MoE-LoRA linear: ``y = x Wᵀ + b + s·Σᵢ gᵢ(x)·Bᵢ Aᵢ x̃`` with gate-rescaled gradients.

    One autograd node computes the base projection, the router logits, the gates and all experts from
    stacked tensors.  When there is no dropout the router and the experts share one matmul over x.
    Backward: A, B and x̃ receive gradients weighted by cᵢ = stopgrad(gᵢ^p); the router receives the
    ordinary gradient (plus any gradient flowing into the returned logits, e.g. from auxiliary losses).
    ``reference_moe_lora_linear`` computes the same values and gradients plainly.

    Without a base weight (``weight=None``) the result is the adapter term alone, ``s·Σᵢ gᵢ(x)·Bᵢ Aᵢ x̃``,
    and ∂L/∂x its part only: adding the output of a base module called on x (with its own autograd) gives
    the full layer, values and gradients, as with the weight passed here.

    Args:
        x: ``(N, in)`` input (router input, and expert input when ``x_drop`` is None).
        weight: ``(out, in)`` base weight, or None for the adapter term alone (the caller adds the base).
        bias: ``(out,)`` base bias or None (None when ``weight`` is None).
        lora_a: ``(E, r, in)`` stacked A matrices.
        lora_b: ``(E, out, r)`` stacked B matrices.
        router_weight: ``(E, in)`` router weight, or the ``(E,)`` gate logits for ``routing="global"``.
        routing: routing mode (see ``riemix.core.routing.route``).
        top_k: experts per token.
        gate_grad_power: p in [0, 1].
        scaling: adapter scale s.
        x_drop: ``(N, in)`` expert input after dropout, or None to use ``x``.
        temperature: router temperature T > 0.
        top_p: mass threshold of ``routing="top_p"``.
        noise: optional ``(N, E)`` selection noise (noisy top-k; gate values use the clean logits).
        expert_compute: ``"dense"`` (every expert, the fused node above), ``"sparse"`` (the selected
            pairs only, ``riemix.core.sparse``) or ``"auto"`` (``use_sparse_experts`` decides by shape).
        recompute_hidden: dense path: keep only the gates for the backward and compute h = x̃ Aᵀ again
            there (less activation memory than a LoRA of rank k·r, one more product in the backward).
            The sparse path always does so.

    Returns:
        ``(y, logits, gates)``: ``(N, out)`` output, ``(N, E)`` router logits (differentiable) and
        ``(N, E)`` fp32 gates (not differentiable; for diagnostics).

    Raises:
        ValueError: for an unknown ``expert_compute``, ``"sparse"`` with ``dense``/``global`` routing, or a
            bias without a weight.
    """
    if weight is None and bias is not None:
        raise ValueError("moe_lora_linear: a bias needs the base weight; with weight=None the caller adds the base")
    spec = RouteSpec(routing, int(top_k), float(temperature), float(top_p))
    if use_sparse_experts(expert_compute, routing, spec.top_k, lora_a.shape[0], x.device.type):
        return sparse_moe_lora_linear(  # it always recomputes h (faster there than keeping it, measured)
            x, weight, bias, lora_a, lora_b, router_weight, spec, gate_grad_power, scaling, x_drop, noise
        )
    tensors = (x, x_drop, weight, bias, lora_a, lora_b, router_weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _MoELoRAFunction.apply(*tensors, noise, spec, float(gate_grad_power), float(scaling), recompute_hidden)
    return _dense_forward(*tensors, noise, spec, float(scaling))[:3]  # inference: no autograd node, nothing kept


def reference_moe_lora_linear(  # the signature of moe_lora_linear
    x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, router_weight: Tensor,
    routing: str, top_k: int, gate_grad_power: float, scaling: float, x_drop: Tensor | None = None,
    temperature: float = 1.0, top_p: float = 1.0, noise: Tensor | None = None, expert_compute: str = "auto",
    recompute_hidden: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``moe_lora_linear`` written plainly: a loop over experts with ordinary autograd (slow; the spec).

    Expert i contributes s·wᵢ with wᵢ = cᵢ·eᵢ + (gᵢ − cᵢ)·stopgrad(eᵢ), eᵢ = x̃ Aᵢᵀ Bᵢᵀ and
    cᵢ = stopgrad(gᵢ^p): the value is s·gᵢ·eᵢ, the gradient reaching Aᵢ, Bᵢ and x̃ is weighted by cᵢ and
    the gate receives s·⟨∂L/∂y, eᵢ⟩.  Same arguments and results as ``moe_lora_linear``
    (``expert_compute`` and ``recompute_hidden`` are accepted and ignored: the loop is the spec of them all;
    ``weight=None`` leaves the base out).
    """
    expert_in = x if x_drop is None else x_drop  # (N, in)
    n, num_experts = x.shape[0], lora_a.shape[0]
    if routing == "global":
        logits = router_weight.unsqueeze(0).expand(n, num_experts)  # (N, E): the same for every token
    else:
        logits = x @ router_weight.t()  # (N, E)
    gates, _ = route(logits, routing, int(top_k), float(temperature), float(top_p), noise)  # (N, E)
    g = gates.to(x.dtype)  # (N, E)
    c = gate_grad_coefficients(gates, float(gate_grad_power)).to(x.dtype)  # (N, E), detached
    y = x.new_zeros(n, lora_b.shape[1]) if weight is None else F.linear(x, weight, bias)  # (N, out)
    for i in range(num_experts):
        e_i = expert_in @ lora_a[i].t() @ lora_b[i].t()  # (N, out)
        w_i = c[:, i : i + 1] * e_i + (g[:, i : i + 1] - c[:, i : i + 1]) * e_i.detach()  # (N, out)
        y = y + scaling * w_i
    return y, logits, gates.detach()
