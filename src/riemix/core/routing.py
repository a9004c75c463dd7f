"""Per-token routing: router logits -> dense gate matrix with zeros for unselected experts.

Every mode returns gates of shape ``(N, E)`` and the boolean selection mask.  In every mode the gates
are ``m · softmax(logits / T)`` restricted to the selected set S (renormalised over S), with ``m = 1``
for the per-token modes (gates sum to 1) and ``m = E`` for ``"global"`` (gates average 1).  Hence one
backward formula serves all of them (see ``softmax_gate_backward``).  Computation is done in fp32 (or
fp64 when the logits are fp64) for stability; the caller casts the gates to its compute dtype.

Noise (noisy top-k) only changes the *selection*: the gate values are always the clean
``softmax(logits / T)`` renormalised over the selected set.
"""

from __future__ import annotations

import torch

from riemix.core.config import DENSE_MODES, ROUTING_MODES, TOPK_MODES

__all__ = [
    "route",
    "gate_grad_coefficients",
    "gate_multiplier",
    "softmax_gate_backward",
    "top_p_select",
]


def gate_multiplier(mode: str, num_experts: int) -> float:
    """The constant m with gates = m·softmax over S: ``E`` for ``"global"``, 1 otherwise."""
    return float(num_experts) if mode == "global" else 1.0


def top_p_select(probs: torch.Tensor, top_p: float, max_experts: int) -> torch.Tensor:
    """Per row, the smallest set of experts whose probability mass is >= ``top_p``.

    Experts are taken in decreasing probability; expert j (in that order) is kept when the mass of the
    experts before it is < ``top_p``.  At least one and at most ``max_experts`` experts are kept.

    Args:
        probs: ``(N, E)`` probabilities (rows sum to 1).
        top_p: mass threshold in (0, 1].
        max_experts: cap on the number of kept experts (>= 1).

    Returns:
        ``(N, E)`` bool selection mask.
    """
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (N, E), (N, E)
    before = sorted_p.cumsum(-1) - sorted_p  # (N, E) mass strictly before each expert
    keep = before < top_p  # (N, E)
    keep[:, 0] = True
    keep[:, max_experts:] = False
    return torch.zeros_like(keep).scatter(-1, order, keep)  # (N, E)


def route(
    logits: torch.Tensor,
    mode: str,
    top_k: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn router logits into gates.

    Args:
        logits: ``(N, E)`` router logits (for ``"global"``: the per-layer gate logits broadcast to N rows).
        mode: ``"softmax_topk"``, ``"topk_softmax"``, ``"dense"``, ``"top_p"`` or ``"global"``.
        top_k: experts kept per token (the cap for ``"top_p"``; ignored by ``"dense"``/``"global"``).
        temperature: T > 0; the gates are a softmax of ``logits / T``.
        top_p: mass threshold of ``"top_p"`` routing.
        noise: optional ``(N, E)`` tensor added to the logits for the *selection* only (noisy top-k).

    Returns:
        ``(gates, selected)``: gates ``(N, E)`` (zero where unselected) and a bool mask ``(N, E)``.

    Raises:
        ValueError: for an unknown mode.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}")
    work = logits if logits.dtype == torch.float64 else logits.float()  # (N, E)
    z = work / temperature if temperature != 1.0 else work  # (N, E)
    num_experts = work.shape[-1]
    if mode in DENSE_MODES or (mode in TOPK_MODES and top_k >= num_experts):
        gates = torch.softmax(z, dim=-1) * gate_multiplier(mode, num_experts)  # (N, E)
        return gates, torch.ones_like(gates, dtype=torch.bool)
    sel = z if noise is None else (work + noise.to(work.dtype)) / temperature  # (N, E) selection scores
    if mode == "top_p":
        selected = top_p_select(torch.softmax(sel, dim=-1), top_p, top_k)  # (N, E)
        kept = torch.softmax(z, dim=-1) * selected  # (N, E)
        return kept / kept.sum(dim=-1, keepdim=True), selected
    # A stable sort breaks exact ties towards the lower expert index on every device (the zero router
    # of init="pissa" relies on it); for E this small it costs the same as topk.
    top_idx = sel.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]  # (N, k)
    selected = torch.zeros_like(work, dtype=torch.bool).scatter_(-1, top_idx, True)  # (N, E)
    if mode == "softmax_topk":
        probs = torch.softmax(z, dim=-1)  # (N, E)
        kept = probs.gather(-1, top_idx)  # (N, k)
        kept = kept / kept.sum(dim=-1, keepdim=True)
    else:
        kept = torch.softmax(z.gather(-1, top_idx), dim=-1)  # (N, k)
    gates = torch.zeros_like(work).scatter(-1, top_idx, kept)  # (N, E)
    return gates, selected


def softmax_gate_backward(
    gates: torch.Tensor, grad_gates: torch.Tensor, temperature: float = 1.0, multiplier: float = 1.0
) -> torch.Tensor:
    """∂L/∂logits for gates g = m·softmax(logits/T) over the selected set (zero elsewhere).

    ∂gᵢ/∂lⱼ = (gᵢ/T)(δᵢⱼ − gⱼ/m) on the selected set, so ∂L/∂l = (g/T) ⊙ (∂L/∂g − ⟨g, ∂L/∂g⟩/m).

    Args:
        gates: ``(N, E)`` gates.
        grad_gates: ``(N, E)`` ∂L/∂g.
        temperature: T.
        multiplier: m (1 per-token, E for ``"global"``).

    Returns:
        ``(N, E)`` ∂L/∂logits.
    """
    inner = (gates * grad_gates).sum(-1, keepdim=True) / multiplier  # (N, 1)
    return gates * (grad_gates - inner) / temperature  # (N, E)


def gate_grad_coefficients(gates: torch.Tensor, power: float) -> torch.Tensor:
    """Detached gradient weights c = g**p, with c = 0 wherever g = 0.

    Args:
        gates: ``(N, E)`` gates.
        power: the gate-rescaling power p in [0, 1].

    Returns:
        ``(N, E)`` detached coefficients.
    """
    g = gates.detach()
    if power == 1.0:
        return g
    pos = g > 0
    if power == 0.0:
        return pos.to(g.dtype)
    return torch.where(pos, g.clamp_min(torch.finfo(g.dtype).tiny).pow(power), torch.zeros_like(g))
