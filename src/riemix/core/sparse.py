"""The sparse expert path: compute only the selected (token, expert) pairs.

The dense path (``riemix.core.functional``) multiplies every token by every expert and zeroes the
unselected gates, so its cost grows with E·r.  Here the selected pairs are grouped by expert (the
nonzeros of the transposed selection mask come out expert-major, so no sort is needed) and, for each
expert that received tokens, two small matmuls run on its tokens only (``index_select`` to gather them,
``index_add_`` to scatter the result back): the cost grows with k·r.  The math is the dense path's,
term for term (docs/math.md, "The sparse path"): the value is s·gᵢ·Bᵢ Aᵢ x̃, A, B and x̃ receive
gradients weighted by s·cᵢ, cᵢ = stopgrad(gᵢ^p), and the router the ordinary ∂L/∂gᵢ through
``softmax_gate_backward``.

No (pairs × width) buffer is ever allocated: each expert's rows are gathered, used and dropped, and the
backward gathers them again instead of saving them.  Besides the inputs, a training forward keeps only
each pair's token index (int32) and gate, 8 bytes per selected pair: h = Aᵢ x̃ is recomputed from the
gathered rows, the rest is rebuilt from those two (see ``_SparseMoELoRAFunction``).
Under ``torch.no_grad`` the forward runs without an autograd node, so nothing is kept at all.
``use_sparse_experts`` is the rule the layer uses to choose between the two paths.  As on the dense path,
``weight=None`` computes the adapter term alone (the caller adds the output of a base module it calls).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from riemix.core.config import DENSE_MODES, EXPERT_COMPUTE_MODES
from riemix.core.routing import gate_grad_coefficients, route, softmax_gate_backward

__all__ = ["SPARSE_MAX_DENSITY", "sparse_moe_lora_linear", "use_sparse_experts"]

#: ``expert_compute="auto"`` takes the sparse path when top_k / E is at most this (and the routing selects).
SPARSE_MAX_DENSITY = 0.125


def use_sparse_experts(
    expert_compute: str, routing: str, top_k: int, num_experts: int, device_type: str = "cpu"
) -> bool:
    """Whether a layer computes only the selected experts (True) or every expert (False).

    ``"dense"``/``"sparse"`` force the path; ``"auto"`` takes the sparse one on CPU when the routing
    selects experts (``softmax_topk``, ``topk_softmax``, ``top_p``) and at most ``SPARSE_MAX_DENSITY`` of
    them are active per token (top_k / E; for ``top_p``, top_k is the cap).  The default adapter (E = 8,
    top-2) stays dense.  On accelerators ``"auto"`` stays dense: the sparse path's per-expert products
    are small kernels launched one by one, measured 5-17x slower than the dense path on an H100 at
    E = 8..128, top-2, r = 8 (``benchmarks/gpu_check.sh``; a grouped-GEMM kernel would change that).

    Args:
        expert_compute: ``"auto"``, ``"dense"`` or ``"sparse"``.
        routing: the routing mode.
        top_k: experts kept per token (the cap of ``"top_p"``).
        num_experts: E.
        device_type: where the layer's tensors live (``"cpu"``, ``"cuda"``, ...).

    Raises:
        ValueError: for an unknown ``expert_compute``, or ``"sparse"`` with a routing that selects nothing.
    """
    if expert_compute not in EXPERT_COMPUTE_MODES:
        raise ValueError(f"expert_compute must be one of {EXPERT_COMPUTE_MODES}, got {expert_compute!r}")
    if expert_compute == "sparse" and routing in DENSE_MODES:
        raise ValueError(f"expert_compute='sparse' needs a routing that selects experts, got routing={routing!r}")
    if expert_compute != "auto":
        return expert_compute == "sparse"
    return device_type == "cpu" and routing not in DENSE_MODES and top_k <= SPARSE_MAX_DENSITY * num_experts


class _Pairs(NamedTuple):
    """The selected (token, expert) pairs, grouped by expert.

    Attributes:
        token: ``(P,)`` token index of each pair, ascending within each expert's span.
        expert: ``(P,)`` expert index of each pair, ascending.
        spans: ``(expert, start, stop)`` of every expert that received at least one token.
    """

    token: Tensor
    expert: Tensor
    spans: list[tuple[int, int, int]]


def _group_pairs(selected: Tensor) -> _Pairs:
    """Group the True entries of the ``(N, E)`` selection mask by expert (expert-major order)."""
    pair_e, pair_t = selected.t().nonzero(as_tuple=True)  # (P,), (P,): row-major over (E, N)
    counts = torch.bincount(pair_e, minlength=selected.shape[1]).tolist()  # E ints
    spans, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            spans.append((expert, start, start + count))
        start += count
    return _Pairs(pair_t, pair_e, spans)


def _forward(x, x_drop, weight, bias, lora_a, lora_b, router_w, noise, spec, scaling):
    """The sparse forward: ``(y, logits, gates, pairs)``."""
    x_in = x if x_drop is None else x_drop  # (N, in)
    logits = x @ router_w.t()  # (N, E)
    gates, selected = route(logits, spec.mode, spec.top_k, spec.temperature, spec.top_p, noise)  # (N, E)
    pairs = _group_pairs(selected)
    gs = (gates[pairs.token, pairs.expert] * scaling).to(x.dtype).unsqueeze(-1)  # (P, 1): s·g per pair
    if weight is None:  # the adapter term alone: the caller adds the base output
        y = x.new_zeros(x.shape[0], lora_b.shape[1])  # (N, out)
    else:
        y = F.linear(x, weight, bias)  # (N, out)
    for e, lo, hi in pairs.spans:
        tokens = pairs.token[lo:hi]  # (n_e,)
        h = x_in.index_select(0, tokens) @ lora_a[e].t()  # (n_e, r) = x̃ Aₑᵀ
        y.index_add_(0, tokens, (h * gs[lo:hi]) @ lora_b[e].t())  # (N, out) += s·g·Bₑ Aₑ x̃
    return y, logits, gates, pairs


class _Meta(NamedTuple):
    """Non-tensor state saved by the sparse forward for the backward."""

    spans: list[tuple[int, int, int]]
    scaling: float
    power: float
    has_bias: bool
    temperature: float
    num_experts: int


class _SparseMoELoRAFunction(torch.autograd.Function):
    """Base linear (none with ``weight=None``) + router + the selected experts in one node.

    See ``sparse_moe_lora_linear``.

    Saved for the backward, besides the inputs: each pair's token index ``(P,)`` (int32) and gate ``(P,)``.
    The pairs' experts come back from the spans, the (N, E) gates from the pairs, the coefficients
    cᵢ = gᵢ^p from the gates, and h = x̃ Aₑᵀ is recomputed from the token rows the backward gathers anyway
    (one (n_e, in) x (in, r) product per expert).  Measured faster than keeping h on CPU (1.32x against
    1.48x the frozen base at E=64, top-2, r=8, 2048 wide), and it keeps 8 bytes per pair instead of 8 + 4r.
    """

    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, router_w, noise, spec, power, scaling):  # noqa: D102
        ctx.set_materialize_grads(False)
        y, logits, gates, pairs = _forward(
            x, x_drop, weight, bias, lora_a, lora_b, router_w, noise, spec, scaling
        )  # (N, out), (N, E), (N, E), -
        gate_pair = gates[pairs.token, pairs.expert]  # (P,)
        ctx.save_for_backward(x, x_drop, weight, lora_a, lora_b, router_w, gate_pair, pairs.token.int())
        ctx.meta = _Meta(pairs.spans, scaling, power, bias is not None, spec.temperature, gates.shape[1])
        ctx.mark_non_differentiable(gates)
        return y, logits, gates

    @staticmethod
    def backward(ctx, grad_y, grad_logits, _grad_gates):  # noqa: D102
        x, x_drop, weight, lora_a, lora_b, router_w, gate_pair, pair_t = ctx.saved_tensors
        meta: _Meta = ctx.meta
        s = meta.scaling
        (need_x, need_x_drop, need_w, need_bias, need_a, need_b, need_router) = ctx.needs_input_grad[:7]
        x_in = x if x_drop is None else x_drop  # (N, in)
        n, d_in = x.shape
        pair_t = pair_t.long()  # (P,)
        pair_e = torch.cat([pair_t.new_full((hi - lo,), e) for e, lo, hi in meta.spans] or [pair_t[:0]])  # (P,)
        if grad_y is None:
            grad_y = x.new_zeros(n, lora_b.shape[1])  # (N, out)
        grad_x = None
        if need_x:  # the base's part (none without a weight: the caller's base module has its own) + ours below
            grad_x = x.new_zeros(n, d_in) if weight is None else grad_y @ weight  # (N, in)
        # ∂L/∂x̃ accumulates into grad_x when the experts read x, else into its own tensor.
        need_x_in = need_x_drop if x_drop is not None else need_x
        grad_x_in = grad_x if x_drop is None else (x.new_zeros(n, d_in) if need_x_drop else None)  # (N, in)
        grad_a = torch.zeros_like(lora_a) if need_a else None  # (E, r, in)
        grad_b_t = lora_b.new_zeros(lora_b.transpose(1, 2).shape) if need_b else None  # (E, r, out)
        cs = (gate_grad_coefficients(gate_pair, meta.power) * s).to(x.dtype).unsqueeze(-1)  # (P, 1): s·c
        dg_pair = x.new_empty(pair_t.shape[0])  # (P,): <∂L/∂y, Bₑ Aₑ x̃> per pair
        # Bᵀ row-major, and ∂L/∂B computed transposed: (n, out)·(out, r) products with a row-major right
        # factor or a transposed left one take several times longer on CPU BLAS.
        b_t = lora_b.transpose(1, 2).contiguous()  # (E, r, out)
        for e, lo, hi in meta.spans:  # each expert's rows are used while they are in cache
            tokens = pair_t[lo:hi]  # (n_e,)
            x_rows = x_in.index_select(0, tokens)  # (n_e, in)
            h = x_rows @ lora_a[e].t()  # (n_e, r): recomputed, not saved
            gy = grad_y.index_select(0, tokens)  # (n_e, out)
            du = gy @ b_t[e].t()  # (n_e, r)
            if need_b:
                torch.mm((h * cs[lo:hi]).t(), gy, out=grad_b_t[e])  # (r, out)
            torch.sum(du * h, dim=-1, out=dg_pair[lo:hi])
            dh = du * cs[lo:hi]  # (n_e, r), weighted by s·c
            if need_a:
                torch.mm(dh.t(), x_rows, out=grad_a[e])  # (r, in)
            if need_x_in:
                grad_x_in.index_add_(0, tokens, dh @ lora_a[e])  # (N, in)
        gates = gate_pair.new_zeros(n, meta.num_experts).index_put_((pair_t, pair_e), gate_pair)  # (N, E)
        dg = torch.zeros_like(gates).index_put_((pair_t, pair_e), dg_pair.to(gates.dtype) * s)  # (N, E)
        dlog = softmax_gate_backward(gates, dg, meta.temperature)  # (N, E)
        if grad_logits is not None:
            dlog = dlog + grad_logits.to(gates.dtype)
        dlog = dlog.to(x.dtype)  # (N, E)
        if need_x:
            grad_x.addmm_(dlog, router_w)  # (N, in)
        grad_b = None if grad_b_t is None else grad_b_t.transpose(1, 2).contiguous()  # (E, out, r)
        grads: list[Any] = [grad_x, grad_x_in if x_drop is not None else None, None, None, grad_a, grad_b]
        grads.append(dlog.t() @ x if need_router else None)  # (E, in)
        if need_w:
            grads[2] = grad_y.t() @ x  # (out, in)
        if need_bias and meta.has_bias:
            grads[3] = grad_y.sum(0)  # (out,)
        return (*grads, None, None, None, None)


# Under torch.compile the sparse path runs eagerly (one graph break): its grouping depends on the routing
# (nonzero, bincount().tolist(), a Python loop over the experts that received tokens), which would make
# dynamo recompile for almost every batch (benchmarks/compile_check.py).
@torch.compiler.disable
def sparse_moe_lora_linear(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, router_weight: Tensor,
    spec: Any, gate_grad_power: float, scaling: float, x_drop: Tensor | None = None, noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``moe_lora_linear`` on the selected (token, expert) pairs only (a routing that selects experts).

    With gradients enabled and any input requiring grad it runs one autograd node whose backward is the
    dense path's, restricted to the pairs; otherwise (inference) it runs the forward alone and keeps
    nothing for a backward.

    Args:
        x: ``(N, in)`` input.
        weight: ``(out, in)`` base weight, or None for the adapter term alone (the caller adds the base).
        bias: ``(out,)`` or None (None when ``weight`` is None).
        lora_a: ``(E, r, in)``.
        lora_b: ``(E, out, r)``.
        router_weight: ``(E, in)``.
        spec: the routing options (``riemix.core.functional.RouteSpec``: mode, top_k, temperature, top_p).
        gate_grad_power: p in [0, 1].
        scaling: adapter scale s.
        x_drop: ``(N, in)`` expert input after dropout, or None to use ``x``.
        noise: optional ``(N, E)`` selection noise.

    Returns:
        ``(y, logits, gates)`` as ``moe_lora_linear``.

    Raises:
        ValueError: for a routing mode that does not select (``dense``, ``global``).
    """
    if spec.mode in DENSE_MODES:
        raise ValueError(f"the sparse expert path needs a routing that selects experts, got {spec.mode!r}")
    tensors = (x, x_drop, weight, bias, lora_a, lora_b, router_weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _SparseMoELoRAFunction.apply(*tensors, noise, spec, float(gate_grad_power), float(scaling))
    y, logits, gates, _ = _forward(*tensors, noise, spec, float(scaling))
    return y, logits, gates
