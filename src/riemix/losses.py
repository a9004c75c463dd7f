"""Auxiliary MoE losses: pure functions of router logits (and an optional token mask)."""

from __future__ import annotations

import torch

from .routing import route

__all__ = ["load_balancing_loss", "router_z_loss"]


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x[mask.reshape(-1).bool()]


def load_balancing_loss(
    logits: torch.Tensor, top_k: int, routing: str = "softmax_topk", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load balancing: E·Σᵢ fᵢ·Pᵢ over non-padding tokens.

    fᵢ is the fraction of (token, slot) assignments routed to expert i (each token fills ``top_k``
    slots) and Pᵢ the mean router probability of i. It equals 1 for perfectly uniform routing.

    Args:
        logits: ``(N, E)`` router logits.
        top_k: experts selected per token.
        routing: routing mode (decides which experts count as selected).
        mask: optional ``(N,)`` (or any shape with N elements) 1 for real tokens, 0 for padding.

    Returns:
        Scalar loss (differentiable through Pᵢ).
    """
    logits = _select(logits, mask).float()  # (N', E)
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)  # (N', E)
    _, selected = route(logits.detach(), routing, top_k)  # (N', E)
    frac = selected.float().mean(0) / selected.float().sum(-1).mean()  # (E,) sums to 1
    return num_experts * (frac * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)².

    Args:
        logits: ``(N, E)`` router logits.
        mask: optional token mask as in ``load_balancing_loss``.

    Returns:
        Scalar loss.
    """
    logits = _select(logits, mask).float()  # (N', E)
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
