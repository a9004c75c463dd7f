"""Per-token routing: router logits -> dense gate matrix with zeros for unselected experts.

All three modes return gates of shape ``(N, E)`` that sum to 1 over the selected experts, plus the
boolean selection mask.  Computation is done in fp32 (or fp64 when the logits are fp64) for
stability; the caller casts the gates to its compute dtype.
"""

from __future__ import annotations

import torch

__all__ = ["route", "gate_grad_coefficients"]


def route(logits: torch.Tensor, mode: str, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn router logits into gates.

    Args:
        logits: ``(N, E)`` router logits.
        mode: ``"softmax_topk"``, ``"topk_softmax"`` or ``"dense"``.
        top_k: experts kept per token (ignored for ``"dense"``).

    Returns:
        ``(gates, selected)``: gates ``(N, E)`` (zero where unselected) and a bool mask ``(N, E)``.

    Raises:
        ValueError: for an unknown mode.
    """
    work = logits if logits.dtype == torch.float64 else logits.float()  # (N, E)
    num_experts = work.shape[-1]
    if mode == "dense" or top_k >= num_experts:
        if mode not in ("dense", "softmax_topk", "topk_softmax"):
            raise ValueError(f"unknown routing mode {mode!r}")
        gates = torch.softmax(work, dim=-1)  # (N, E)
        return gates, torch.ones_like(gates, dtype=torch.bool)
    top_val, top_idx = torch.topk(work, top_k, dim=-1)  # (N, k), (N, k)
    selected = torch.zeros_like(work, dtype=torch.bool).scatter_(-1, top_idx, True)  # (N, E)
    if mode == "softmax_topk":
        probs = torch.softmax(work, dim=-1)  # (N, E)
        kept = probs.gather(-1, top_idx)  # (N, k)
        kept = kept / kept.sum(dim=-1, keepdim=True)
    elif mode == "topk_softmax":
        kept = torch.softmax(top_val, dim=-1)  # (N, k)
    else:
        raise ValueError(f"unknown routing mode {mode!r}")
    gates = torch.zeros_like(work).scatter(-1, top_idx, kept)  # (N, E)
    return gates, selected


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
