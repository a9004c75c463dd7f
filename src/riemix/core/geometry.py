"""Geometry of one layer's expert factors: Gram matrices, cosine similarities, singular values, rank.

Every function takes the stacked factors of one ``MoELoRALinear``, ``lora_a`` ``(E, r, in)`` and/or
``lora_b`` ``(E, out, r)``, and never forms an ``out × in`` product BᵢAᵢ.  The regularisers
(``riemix.core.regularizers``) differentiate through the Gram / cosine functions; the diagnostics
(``riemix.diagnostics.monitor``) read the singular values and effective ranks.
"""

from __future__ import annotations

import torch

__all__ = [
    "expert_gram_ba",
    "stacked_gram_a",
    "cosine_similarity_a",
    "cosine_similarity_ba",
    "expert_singular_values",
    "effective_rank",
]


def _work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 (fp64 kept)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_factors(lora_a: torch.Tensor, lora_b: torch.Tensor | None) -> None:
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a must be (E, r, in), got shape {tuple(lora_a.shape)}")
    if lora_b is not None and (
        lora_b.dim() != 3 or lora_b.shape[0] != lora_a.shape[0] or lora_b.shape[2] != lora_a.shape[1]
    ):
        raise ValueError(
            f"lora_b must be (E, out, r) matching lora_a {tuple(lora_a.shape)}, got {tuple(lora_b.shape)}"
        )


def expert_gram_ba(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Frobenius Gram matrix Gᵢⱼ = ⟨BᵢAᵢ, BⱼAⱼ⟩_F without forming any out × in product.

    ⟨BᵢAᵢ, BⱼAⱼ⟩_F = tr(AᵢᵀBᵢᵀBⱼAⱼ) = Σₐᵦ (BᵢᵀBⱼ)ₐᵦ·(AᵢAⱼᵀ)ₐᵦ: two batches of r × r products,
    O(E²·r²·(in + out)) work.

    Args:
        lora_a: ``(E, r, in)``.
        lora_b: ``(E, out, r)``.

    Returns:
        ``(E, E)`` symmetric Gram matrix (differentiable), in the factors' dtype (fp32 at least).

    Raises:
        ValueError: factor shapes that do not fit together.
    """
    _check_factors(lora_a, lora_b)
    a, b = _work(lora_a), _work(lora_b)
    btb = torch.einsum("ioa,job->ijab", b, b)  # (E, E, r, r): Bᵢᵀ Bⱼ
    aat = torch.einsum("iak,jbk->ijab", a, a)  # (E, E, r, r): Aᵢ Aⱼᵀ
    return (btb * aat).sum((-1, -2))  # (E, E)


def stacked_gram_a(lora_a: torch.Tensor) -> torch.Tensor:
    """Gram matrix A_all·A_allᵀ of the ``(E·r, in)`` stack of every expert's A rows.

    Args:
        lora_a: ``(E, r, in)``.

    Returns:
        ``(E·r, E·r)`` (differentiable), fp32 at least; the identity when all rows are orthonormal.

    Raises:
        ValueError: ``lora_a`` not 3-D.
    """
    _check_factors(lora_a, None)
    rows = _work(lora_a).reshape(-1, lora_a.shape[-1])  # (E·r, in)
    return rows @ rows.t()  # (E·r, E·r)


def _cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).sqrt()  # (E,)
    return gram / (norms[:, None] * norms[None, :])  # (E, E); 0 where an expert is exactly zero


def cosine_similarity_a(lora_a: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the experts' flattened A matrices.

    Args:
        lora_a: ``(E, r, in)``.

    Returns:
        ``(E, E)`` matrix with ones on the diagonal (0 rows/columns for an all-zero expert).

    Raises:
        ValueError: ``lora_a`` not 3-D.
    """
    _check_factors(lora_a, None)
    flat = _work(lora_a).reshape(lora_a.shape[0], -1)  # (E, r·in)
    return _cosine_from_gram(flat @ flat.t())


def cosine_similarity_ba(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the experts' flattened BᵢAᵢ (via ``expert_gram_ba``).

    Args:
        lora_a: ``(E, r, in)``.
        lora_b: ``(E, out, r)``.

    Returns:
        ``(E, E)`` matrix; 0 rows/columns for experts whose BᵢAᵢ is zero (e.g. zero-initialised B).

    Raises:
        ValueError: factor shapes that do not fit together.
    """
    return _cosine_from_gram(expert_gram_ba(lora_a, lora_b))


def expert_singular_values(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Singular values of every BᵢAᵢ from an r × r problem (no out × in product is formed).

    With Bᵢ = Q_B R_B and Aᵢᵀ = Q_A R_A (reduced QR), BᵢAᵢ = Q_B (R_B R_Aᵀ) Q_Aᵀ with orthonormal
    Q's, so the singular values of BᵢAᵢ are those of the r × r matrix R_B R_Aᵀ.

    Args:
        lora_a: ``(E, r, in)``.
        lora_b: ``(E, out, r)``.

    Returns:
        ``(E, r)`` singular values in fp64, descending.
    """
    a, b = lora_a.detach().double(), lora_b.detach().double()
    _, rb = torch.linalg.qr(b)  # (E, r, r) when out ≥ r
    _, ra = torch.linalg.qr(a.transpose(-1, -2))  # (E, r, r) when in ≥ r
    return torch.linalg.svdvals(rb @ ra.transpose(-1, -2))  # (E, min(out,r,in))


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """Entropy-based effective rank exp(H(σ/Σσ)) (Roy & Vetterli, 2007) along the last dim.

    1 for a rank-1 matrix, r for r equal singular values; 0 for a zero matrix.

    Args:
        singular_values: ``(..., r)`` non-negative.

    Returns:
        ``(...)`` effective ranks.
    """
    s = singular_values.double().clamp_min(0)  # (..., r)
    total = s.sum(-1, keepdim=True)  # (..., 1)
    p = s / torch.where(total > 0, total, torch.ones_like(total))  # (..., r)
    entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)  # (...); 0·log 0 = 0
    return torch.where(total.squeeze(-1) > 0, torch.exp(entropy), torch.zeros_like(total.squeeze(-1)))
