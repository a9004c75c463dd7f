"""Auxiliary MoE losses (regularisers): pure functions of router logits or of the expert factors.

Router-statistic losses take ``(N, E)`` router logits and an optional token mask (1 = real token,
0 = padding; any shape with N elements):

- ``load_balancing_loss``: Switch-Transformer E·Σᵢ fᵢ·Pᵢ;
- ``router_z_loss``: ST-MoE mean logsumexp(logits)²;
- ``uniform_prior_loss``: KL(mean routing distribution ‖ uniform).

Parameter losses take the stacked factors of one layer, ``lora_a`` ``(E, r, in)`` and ``lora_b``
``(E, out, r)``:

- ``expert_diversity_loss``: mean squared off-diagonal cosine similarity of the experts' A (and of BᵢAᵢ);
- ``orthogonality_loss``: ‖A_all·A_allᵀ − I‖²_F with A_all the (E·r, in) stack of every expert's rows.

``inject_gradients`` adds a regulariser's gradient straight to ``.grad`` of chosen parameters (the
trainer's ``regularizer_mode="inject"``). See docs/math.md, "Regularisers", for how each interacts with
gate rescaling and with the Riemannian preconditioner.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from riemix.core.routing import route

__all__ = [
    "load_balancing_loss",
    "router_z_loss",
    "uniform_prior_loss",
    "expert_gram_ba",
    "cosine_similarity_a",
    "cosine_similarity_ba",
    "expert_diversity_loss",
    "orthogonality_loss",
    "inject_gradients",
]


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _select(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``logits`` ``(N, E)`` whose mask entry is non-zero, in fp32 (fp64 kept)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, E), got shape {tuple(logits.shape)}")
    if mask is None:
        return _work(logits)
    if mask.numel() != logits.shape[0]:
        raise ValueError(f"mask has {mask.numel()} elements for {logits.shape[0]} tokens")
    return _work(logits[mask.reshape(-1).to(logits.device).bool()])


def load_balancing_loss(
    logits: torch.Tensor, top_k: int, routing: str = "softmax_topk", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load balancing: E·Σᵢ fᵢ·Pᵢ over non-padding tokens.

    fᵢ is the fraction of (token, slot) assignments routed to expert i (each token fills ``top_k``
    slots; not differentiable) and Pᵢ the mean full-softmax router probability of i. It equals 1 for
    perfectly uniform routing and approaches E when every token goes to one expert.

    Args:
        logits: ``(N, E)`` router logits.
        top_k: experts selected per token.
        routing: routing mode (decides which experts count as selected).
        mask: optional ``(N,)`` (or any shape with N elements) 1 for real tokens, 0 for padding.

    Returns:
        Scalar loss (differentiable through Pᵢ); 0 when no token is left.

    Raises:
        ValueError: logits not 2-D, or a mask of the wrong size.
    """
    logits = _select(logits, mask)  # (N', E)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)  # (N', E)
    _, selected = route(logits.detach(), routing, top_k)  # (N', E)
    sel = selected.to(logits.dtype)  # (N', E)
    frac = sel.mean(0) / sel.sum(-1).mean()  # (E,) sums to 1
    return num_experts * (frac * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (non-padding) tokens of logsumexp(logits)².

    Args:
        logits: ``(N, E)`` router logits.
        mask: optional token mask as in ``load_balancing_loss``.

    Returns:
        Scalar loss; 0 when no token is left.

    Raises:
        ValueError: logits not 2-D, or a mask of the wrong size.
    """
    logits = _select(logits, mask)  # (N', E)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def uniform_prior_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p̄ ‖ uniform) = log E − H(p̄), with p̄ the mean full-softmax router distribution.

    p̄ = mean over non-padding tokens of softmax(logits). The loss is 0 when the experts are used
    equally on average and log E when every token puts all its probability on one expert. Unlike
    load balancing it is differentiable through every expert's probability and does not depend on
    the top-k selection.

    Args:
        logits: ``(N, E)`` router logits.
        mask: optional token mask as in ``load_balancing_loss``.

    Returns:
        Scalar loss ≥ 0; 0 when no token is left.

    Raises:
        ValueError: logits not 2-D, or a mask of the wrong size.
    """
    logits = _select(logits, mask)  # (N', E)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    num_experts = logits.shape[-1]
    mean = torch.softmax(logits, dim=-1).mean(0)  # (E,)
    return (mean * torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny) * num_experts)).sum()


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


def _mean_sq_offdiag(cos: torch.Tensor) -> torch.Tensor:
    e = cos.shape[0]
    if e < 2:
        return cos.sum() * 0.0
    off = ~torch.eye(e, dtype=torch.bool, device=cos.device)  # (E, E)
    return cos[off].pow(2).mean()


def expert_diversity_loss(lora_a: torch.Tensor, lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity between experts: of A, plus of BᵢAᵢ if ``lora_b``.

    Each term lies in [0, 1]: 0 when the experts are mutually orthogonal, 1 when they are all
    parallel (identical up to scale).

    Args:
        lora_a: ``(E, r, in)``.
        lora_b: optional ``(E, out, r)``; adds the BᵢAᵢ term.

    Returns:
        Scalar loss in [0, 2]; 0 for a single expert.

    Raises:
        ValueError: factor shapes that do not fit together.
    """
    loss = _mean_sq_offdiag(cosine_similarity_a(lora_a))
    if lora_b is not None:
        loss = loss + _mean_sq_offdiag(cosine_similarity_ba(lora_a, lora_b))
    return loss


def orthogonality_loss(lora_a: torch.Tensor) -> torch.Tensor:
    """‖A_all·A_allᵀ − I‖²_F, with A_all the ``(E·r, in)`` stack of every expert's rows.

    Zero exactly when the E·r rows are orthonormal, which needs E·r ≤ in; otherwise its minimum is
    positive (E·r − in at best).

    Args:
        lora_a: ``(E, r, in)``.

    Returns:
        Scalar loss ≥ 0.

    Raises:
        ValueError: ``lora_a`` not 3-D.
    """
    _check_factors(lora_a, None)
    rows = _work(lora_a).reshape(-1, lora_a.shape[-1])  # (E·r, in)
    gram = rows @ rows.t()  # (E·r, E·r)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum()


def inject_gradients(
    loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool = False
) -> list[torch.Tensor | None]:
    """Add ∂loss/∂p to ``p.grad`` for each parameter (creating ``.grad`` when it is None).

    Only the listed parameters receive anything: the gradient does not flow anywhere else, in
    particular not through the gated forward into other adapter factors. Whatever lands in ``.grad``
    of a LoRA factor is preconditioned by the Riemannian optimizers like the task gradient.

    Args:
        loss: scalar regulariser.
        params: tensors requiring grad; ones the loss does not depend on are skipped.
        retain_graph: keep the graph (when the loss shares it with a later backward).

    Returns:
        The injected gradients (None where the loss does not depend on the parameter).

    Raises:
        ValueError: a non-scalar loss.
    """
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
    params = list(params)
    if not loss.requires_grad or not params:
        return [None] * len(params)
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            if p.grad is None:
                p.grad = torch.empty_like(p).copy_(g)  # the parameter's layout, as autograd would
            else:
                p.grad.add_(g)
    return list(grads)
