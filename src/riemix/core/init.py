"""Adapter initialisations (``MoELoRAConfig.init``): pure functions of a ``MoELoRALinear``'s tensors.

- ``zero_b``: Kaiming-uniform A (as PEFT), B = 0, router N(0, σ²). Output unchanged.
- ``gaussian``: A ~ N(0, 1/r²), B = 0. Output unchanged.
- ``orthogonal``: A rows orthonormal, jointly over all E·r rows when E·r <= in, B = 0. Unchanged.
- ``pissa``: A = √S·Vᵀ/√(s·g⁰), B = U·√S/√(s·g⁰), zero router, W -> residual. Unchanged up to rounding.
- ``small_b``: Kaiming-uniform A, B ~ N(0, init_b_std²). Unchanged only while the scale warm-up factor
  is 0 (``scale_warmup_steps`` > 0 at step 0).

PiSSA moves the principal part of W into the experts: with a zero router every token gets the same
gates g⁰ (``initial_gates``), the top E·r singular triplets are split r per expert, expert i is
scaled so that s·g⁰ᵢ·BᵢAᵢ = UᵢSᵢVᵢᵀ, and the base weight becomes W_res = W − Σ_{g⁰ᵢ>0} UᵢSᵢVᵢᵀ.
The removed part is kept as ``layer.pissa_up @ layer.pissa_down`` (fp64) so that ``load_adapter`` can
rebuild W_res bit-identically from the original weight (see docs/math.md, "Initialisations").

W_res is rounded to the weight's dtype, so W_res + up @ down does not always round back to W (in a tiny
random Llama about 15% of the entries miss by one unit in the last place).  The entries that miss are kept
as well (``layer.pissa_fix_index`` / ``layer.pissa_fix_value``, a sparse list of flat indices and original
values), so that ``pissa_original`` rebuilds W bit-identically and ``riemix.remove_moe_lora`` can give the
original model back.

A layer whose experts have different ranks (``layer.expert_ranks``, stacked at R = their maximum) is
initialised at R and its padding (rows r >= rᵢ of Aᵢ, columns of Bᵢ) is then zeroed (``zero_rank_padding``);
``gaussian`` draws expert i with std 1/rᵢ, and ``pissa`` refuses mixed ranks.

A quantized base (bitsandbytes, ``layer.quantized_base``) has no floating-point weight to factor or to
replace by a residual: ``"pissa"`` refuses it (every other init leaves the base alone).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from riemix.core.config import INIT_MODES
from riemix.core.routing import route

__all__ = [
    "initialise_layer",
    "bit_pattern",
    "initial_gates",
    "orthogonal_rows",
    "pissa_factors",
    "pissa_fixes",
    "pissa_original",
    "pissa_residual",
    "restore_pissa",
    "same_bits",
    "zero_rank_padding",
]


def _kaiming_a(layer) -> None:
    a2d = layer.lora_A.view(-1, layer.in_features)  # (E·r, in): fan_in = in per expert row
    nn.init.kaiming_uniform_(a2d, a=math.sqrt(5))


def orthogonal_rows(
    num_experts: int, rank: int, in_features: int, dtype=torch.float64
) -> tuple[torch.Tensor, str]:
    """Random A with orthonormal rows: jointly over all E·r rows when E·r <= in, else per expert.

    Rows have unit norm (Kaiming-uniform rows have norm ≈ 1/√3, the same order; with B = 0 the scale of
    A does not change the output, and the Riemannian preconditioner makes the first steps invariant to
    it).  A Haar-random orthonormal frame is drawn (QR of a Gaussian with the signs of diag(R) fixed) from
    the global CPU generator, so the result does not depend on the device.

    Args:
        num_experts: E.
        rank: r.
        in_features: input width.
        dtype: result dtype.

    Returns:
        ``(A, info)``: A ``(E, r, in)`` and ``"joint"`` or ``"per_expert"``.
    """

    def frame(rows: int) -> torch.Tensor:
        g = torch.randn(in_features, rows, dtype=torch.float64)  # (in, rows)
        q, r = torch.linalg.qr(g)  # (in, rows), (rows, rows)
        sign = torch.sign(torch.diagonal(r))  # (rows,)
        sign[sign == 0] = 1
        return (q * sign).t()  # (rows, in)

    total = num_experts * rank
    if total <= in_features:
        return frame(total).reshape(num_experts, rank, in_features).to(dtype), "joint"
    blocks = []
    for _ in range(num_experts):
        if rank <= in_features:
            blocks.append(frame(rank))  # (r, in)
        else:  # more rows than dimensions: orthonormal columns instead
            blocks.append(nn.init.orthogonal_(torch.empty(rank, in_features, dtype=torch.float64)))
    return torch.stack(blocks).to(dtype), "per_expert"


def initial_gates(layer) -> torch.Tensor:
    """``(E,)`` gates every token gets when the router logits are all zero (the PiSSA start).

    Dense/global routing give 1/E / 1 per expert; the top-k modes keep experts 0..k−1 (``route`` breaks
    exact ties towards the lower index, on every device), each with gate 1/k; top-p keeps the first
    ⌈top_p·E⌉ (capped at top_k) of them.
    """
    zeros = torch.zeros(1, layer.num_experts, dtype=torch.float64, device=layer.lora_A.device)  # (1, E)
    gates, _ = route(zeros, layer.routing, layer.top_k, 1.0, layer.top_p)  # (1, E)
    return gates[0]


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of each left singular vector positive (deterministic SVD)."""
    idx = u.abs().argmax(dim=0)  # (k,)
    sign = torch.sign(u.gather(0, idx.unsqueeze(0))[0])  # (k,)
    sign[sign == 0] = 1
    return u * sign, vh * sign.unsqueeze(-1)


def pissa_factors(
    weight: torch.Tensor, num_experts: int, rank: int, scaling: float, gates0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA expert factors from the top E·r singular triplets of ``weight`` (computed in fp64).

    Experts with g⁰ᵢ > 0 take the leading directions (in expert order), then the others.  Expert i gets
    Aᵢ = √Sᵢ Vᵢᵀ / √(s·g⁰ᵢ) and Bᵢ = Uᵢ √Sᵢ / √(s·g⁰ᵢ), so s·g⁰ᵢ·BᵢAᵢ = UᵢSᵢVᵢᵀ.  An expert with g⁰ᵢ = 0
    (not selected at step 0) gets B = 0 and A = its directions scaled with the mean positive gate;
    its directions stay in W.  Directions beyond the rank of W are left to the caller (``valid`` rows).

    Args:
        weight: ``(out, in)`` base weight.
        num_experts: E.
        rank: r.
        scaling: s (> 0).
        gates0: ``(E,)`` step-0 gates.

    Returns:
        ``(A, B, valid)``: fp64 A ``(E, r, in)``, B ``(E, out, r)`` and a bool ``(E, r)`` mask of the rows
        that received a singular direction.
    """
    w = weight.detach().to(torch.float64)  # (out, in)
    d_out, d_in = w.shape
    u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)  # (out, m), (m,), (m, in)
    u, vh = _fix_signs(u, vh)
    g = gates0.to(torch.float64)  # (E,)
    order = sorted(range(num_experts), key=lambda i: (not bool(g[i] > 0), i))
    g_ref = g[g > 0].mean()
    a = torch.zeros(num_experts, rank, d_in, dtype=torch.float64, device=w.device)  # (E, r, in)
    b = torch.zeros(num_experts, d_out, rank, dtype=torch.float64, device=w.device)  # (E, out, r)
    valid = torch.zeros(num_experts, rank, dtype=torch.bool)
    m = s_vals.shape[0]
    for slot, i in enumerate(order):
        lo, hi = slot * rank, min((slot + 1) * rank, m)
        if lo >= hi:
            continue
        root = s_vals[lo:hi].sqrt()  # (k,)
        gi = g[i] if g[i] > 0 else g_ref
        norm = math.sqrt(scaling * float(gi))
        a[i, : hi - lo] = root.unsqueeze(-1) * vh[lo:hi] / norm  # (k, in)
        if g[i] > 0:
            b[i, :, : hi - lo] = u[:, lo:hi] * root / norm  # (out, k)
        valid[i, : hi - lo] = True
    return a, b, valid


def pissa_residual(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """W_res = W − up @ down, computed in fp64 and cast back to ``weight``'s dtype.

    Args:
        weight: ``(out, in)`` the original base weight.
        down: ``(E·r, in)`` fp64.
        up: ``(out, E·r)`` fp64.
    """
    return (weight.detach().to(torch.float64) - up @ down).to(weight.dtype)  # (out, in)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers of the same width (NaN payloads and -0.0 included)."""
    return t.detach().contiguous().view(_INT_OF_SIZE[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and bit pattern (stricter than ``torch.equal``)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bit_pattern(a), bit_pattern(b))


def _add_back(residual: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """W_res + up @ down in fp64, rounded to the residual's dtype: W up to one rounding per entry."""
    return (residual.detach().to(torch.float64) + up @ down).to(residual.dtype)  # (out, in)


def pissa_fixes(
    weight: torch.Tensor, residual: torch.Tensor, down: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of ``weight`` that ``residual + up @ down`` does not round back to, bit for bit.

    Args:
        weight: ``(out, in)`` the original base weight.
        residual: ``(out, in)`` ``pissa_residual(weight, down, up)``.
        down: ``(E·r, in)`` fp64.
        up: ``(out, E·r)`` fp64.

    Returns:
        ``(index, value)``: flat indices (int32, or int64 for more than 2³¹ − 1 entries) and the original
        values there (``weight``'s dtype), both 1-D.
    """
    back = _add_back(residual, down, up)  # (out, in)
    miss = (bit_pattern(back) != bit_pattern(weight)).reshape(-1)  # (out·in,)
    index = miss.nonzero().squeeze(1)  # (n_miss,)
    if weight.numel() < 2**31:
        index = index.to(torch.int32)
    return index, weight.detach().reshape(-1)[index.long()].clone()


def pissa_original(
    residual: torch.Tensor, down: torch.Tensor, up: torch.Tensor, fix_index: torch.Tensor, fix_value: torch.Tensor
) -> torch.Tensor:
    """Rebuild the original base weight W from the residual, the factors and the fixes of ``pissa_fixes``.

    Args:
        residual: ``(out, in)`` the current base weight W_res.
        down: ``(E·r, in)`` fp64.
        up: ``(out, E·r)`` fp64.
        fix_index: flat indices from ``pissa_fixes``.
        fix_value: the original values there.

    Returns:
        A new ``(out, in)`` tensor in the residual's dtype.
    """
    weight = _add_back(residual, down, up).reshape(-1)  # (out·in,)
    weight[fix_index.long()] = fix_value.to(weight.dtype)
    return weight.view_as(residual)


def _install_residual(layer, down: torch.Tensor, up: torch.Tensor) -> None:
    """Keep the factors, replace the base weight by the residual and keep the entries needed to undo it."""
    w = layer.base_weight  # (out, in), a view of the stored weight
    layer.pissa_down, layer.pissa_up = down, up
    residual = pissa_residual(w, down, up)
    layer.pissa_fix_index, layer.pissa_fix_value = pissa_fixes(w, residual, down, up)
    w.copy_(residual)


@torch.no_grad()
def restore_pissa(layer, down: torch.Tensor, up: torch.Tensor) -> None:
    """Install saved PiSSA factors on a layer whose base weight is the ORIGINAL weight.

    Rebuilds the residual with the same function as at initialisation, hence bit-identically.
    """
    w = layer.base_weight
    _install_residual(
        layer, down.to(device=w.device, dtype=torch.float64), up.to(device=w.device, dtype=torch.float64)
    )
    layer.init_info = "pissa"


@torch.no_grad()
def _init_pissa(layer) -> None:
    if getattr(layer, "quantized_base", False):
        raise ValueError(
            f"init='pissa' factors the base weight, but this layer's base is a quantized "
            f"{type(layer.base_layer).__name__} (bitsandbytes; its weight is packed): use another init "
            "(e.g. zero_b) or load the base without quantization"
        )
    if layer.pissa_down is not None:
        raise ValueError("init='pissa': this layer already carries a PiSSA residual; build a fresh layer")
    if len(set(layer.expert_ranks)) > 1:
        raise ValueError(f"init='pissa' needs experts of one rank, got expert_ranks={layer.expert_ranks}")
    if layer.maturity.after_steps > 0:
        raise ValueError(
            f"init='pissa' places its experts for the routing at step 0, which maturity routing makes dense: "
            f"it needs mature_after_steps=0, got {layer.maturity.after_steps}"
        )
    if layer.router is not None:
        layer.router.weight.zero_()
    g0 = initial_gates(layer)  # (E,)
    scale = layer.scaling * layer.scale_factor
    a, b, valid = pissa_factors(layer.base_weight, layer.num_experts, layer.rank, scale, g0)
    _kaiming_a(layer)  # rows without a singular direction (E·r > rank of W) keep a Kaiming A
    keep = valid.to(layer.lora_A.device).unsqueeze(-1)  # (E, r, 1)
    layer.lora_A.copy_(torch.where(keep, a.to(layer.lora_A.dtype), layer.lora_A))
    layer.lora_B.copy_(b.to(layer.lora_B.dtype))
    # The removed part, from the parameters as stored (so forward and residual use the same numbers).
    e, r = layer.num_experts, layer.rank
    coef = (scale * g0).repeat_interleave(r)  # (E·r,)
    # clone: for an fp64 lora_A, .to() and .reshape() return views, which training would then move
    down = layer.lora_A.to(torch.float64).reshape(e * r, -1).clone()  # (E·r, in)
    up = layer.lora_B.to(torch.float64).permute(1, 0, 2).reshape(-1, e * r) * coef  # (out, E·r)
    _install_residual(layer, down, up)


@torch.no_grad()
def initialise_layer(layer, init: str, router_init_std: float = 0.02) -> None:
    """(Re)initialise a ``MoELoRALinear``'s experts, router / global gate and expert scales.

    Sets ``layer.init_info`` (for ``"orthogonal"``: ``"joint"`` or ``"per_expert"``).

    Args:
        layer: the ``MoELoRALinear``.
        init: one of ``INIT_MODES``.
        router_init_std: std of the router's normal init (ignored by ``"pissa"``: zero router).

    Raises:
        ValueError: for an unknown init, or ``"pissa"`` on a layer that already has a residual or whose base
            is quantized (its weight cannot be factored; refused rather than dequantised and re-quantised).
    """
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
    if layer.global_gate is not None:
        layer.global_gate.zero_()  # gᵢ = E·softmax(0)ᵢ = 1
    if layer.expert_scale is not None:
        layer.expert_scale.fill_(1.0)
    if init == "pissa":
        _init_pissa(layer)
        layer.init_info = "pissa"
        return
    if layer.pissa_down is not None:
        raise ValueError(f"init={init!r}: this layer carries a PiSSA residual; build a fresh layer")
    layer.init_info = init
    if init in ("zero_b", "small_b"):
        _kaiming_a(layer)
    elif init == "gaussian":
        nn.init.normal_(layer.lora_A.view(-1, layer.in_features), std=1.0 / layer.rank)
        if layer.rank_scale is not None:  # expert i: std 1/rᵢ
            ratio = torch.tensor([layer.rank / r for r in layer.expert_ranks], dtype=layer.lora_A.dtype)  # (E,)
            layer.lora_A.mul_(ratio.to(layer.lora_A.device).view(-1, 1, 1))
    else:
        a, layer.init_info = orthogonal_rows(layer.num_experts, layer.rank, layer.in_features)
        layer.lora_A.copy_(a.to(device=layer.lora_A.device, dtype=layer.lora_A.dtype))
    if init == "small_b":
        nn.init.normal_(layer.lora_B, std=layer.init_b_std)
    else:
        layer.lora_B.zero_()
    if layer.router is not None:
        nn.init.normal_(layer.router.weight, std=router_init_std)
    zero_rank_padding(layer)


@torch.no_grad()
def zero_rank_padding(layer) -> None:
    """Zero the rank padding of a layer with mixed expert ranks: rows r >= rᵢ of Aᵢ, columns r >= rᵢ of Bᵢ."""
    if layer.rank_scale is None:  # every expert uses all R slots
        return
    keep = layer.rank_mask()  # (E, R)
    layer.lora_A.masked_fill_(~keep.unsqueeze(-1), 0.0)  # (E, R, in)
    layer.lora_B.masked_fill_(~keep.unsqueeze(1), 0.0)  # (E, out, R)
