"""Auxiliary MoE losses (regularisers) and how they are applied to a model.

Router-statistic losses take ``(N, E)`` router logits and an optional token mask (1 = real token,
0 = padding; any shape with N elements):

- ``load_balancing_loss``: Switch-Transformer E·Σᵢ fᵢ·Pᵢ;
- ``router_z_loss``: ST-MoE mean logsumexp(logits)²;
- ``uniform_prior_loss``: KL(mean routing distribution ‖ uniform).

Parameter losses take the stacked factors of one layer, ``lora_a`` ``(E, r, in)`` and ``lora_b``
``(E, out, r)`` (their geometry is ``riemix.core.geometry``):

- ``expert_diversity_loss``: mean squared off-diagonal cosine similarity of the experts' A (and of BᵢAᵢ);
- ``orthogonality_loss``: ‖A_all·A_allᵀ − I‖²_F with A_all the (E·r, in) stack of every expert's rows;
- ``scale_anchor_loss``: β·‖σ − 1‖² of the expert scale vectors (``MoELoRAConfig.scale_anchor_beta``).

Over a model: ``regularizer_terms`` weights each regulariser named in ``REGULARIZERS`` by its coefficient
and averages it over the adapted layers; ``apply_regularizers`` returns their sum as a loss
(``mode="loss"``) or adds their gradients straight to ``.grad`` with ``inject_gradients``
(``mode="inject"``: router statistics to the routing parameters only, parameter losses to A and B only).
See docs/math.md, "Regularisers", for how each interacts with gate rescaling and with the Riemannian
preconditioner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from riemix.core.config import REGULARIZER_MODES
from riemix.core.geometry import cosine_similarity_a, cosine_similarity_ba, stacked_gram_a
from riemix.core.layer import MoELoRALinear, iter_moe_lora_layers
from riemix.core.routing import route

__all__ = [
    "load_balancing_loss",
    "router_z_loss",
    "uniform_prior_loss",
    "expert_diversity_loss",
    "orthogonality_loss",
    "scale_anchor_loss",
    "inject_gradients",
    "ROUTER_REGULARIZERS",
    "PARAM_REGULARIZERS",
    "REGULARIZERS",
    "uses_router_regularizers",
    "regularizer_terms",
    "apply_regularizers",
]


def _over_tokens(
    logits: torch.Tensor, mask: torch.Tensor | None, loss: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``loss`` of the rows of ``logits`` ``(N, E)`` whose mask entry is non-zero, in fp32 (fp64 kept).

    Returns a differentiable 0 when no row is left; raises ValueError for logits that are not 2-D or a
    mask without N elements.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, E), got shape {tuple(logits.shape)}")
    if mask is not None and mask.numel() != logits.shape[0]:
        raise ValueError(f"mask has {mask.numel()} elements for {logits.shape[0]} tokens")
    rows = logits if mask is None else logits[mask.reshape(-1).to(logits.device).bool()]  # (N', E)
    rows = rows if rows.dtype == torch.float64 else rows.float()
    return rows.sum() * 0.0 if rows.shape[0] == 0 else loss(rows)


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

    def loss(rows: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(rows, dim=-1)  # (N', E)
        _, selected = route(rows.detach(), routing, top_k)  # (N', E)
        sel = selected.to(rows.dtype)  # (N', E)
        frac = sel.mean(0) / sel.sum(-1).mean()  # (E,) sums to 1
        return rows.shape[-1] * (frac * probs.mean(0)).sum()

    return _over_tokens(logits, mask, loss)


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
    return _over_tokens(logits, mask, lambda rows: torch.logsumexp(rows, dim=-1).pow(2).mean())


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

    def loss(rows: torch.Tensor) -> torch.Tensor:
        mean = torch.softmax(rows, dim=-1).mean(0)  # (E,)
        return (mean * torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny) * rows.shape[-1])).sum()

    return _over_tokens(logits, mask, loss)


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
    gram = stacked_gram_a(lora_a)  # (E·r, E·r)
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


def scale_anchor_loss(model: nn.Module) -> torch.Tensor | None:
    """β·Σ over layers of ‖σ − 1‖² (sum over experts and channels) for the expert scale vectors σ.

    β is ``model.moe_lora_config.scale_anchor_beta``; the initial value of every scale is 1.

    Returns:
        A scalar tensor, or None when β = 0 or the model has no expert scales.
    """
    config = getattr(model, "moe_lora_config", None)
    if config is None or not config.scale_anchor_beta:
        return None
    terms = [
        (layer.expert_scale - 1.0).pow(2).sum()
        for _, layer in iter_moe_lora_layers(model)
        if layer.expert_scale is not None
    ]
    if not terms:
        return None
    return config.scale_anchor_beta * torch.stack(terms).sum()


# ---------------------------------------------------------------- regularisers over a model's layers
#: Regularisers of router statistics: name -> loss of one layer given its recorded logits and a mask.
_ROUTER_LOSSES: dict[str, Callable[[MoELoRALinear, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "load_balance": lambda layer, logits, mask: load_balancing_loss(logits, layer.top_k, layer.routing, mask),
    "z_loss": lambda layer, logits, mask: router_z_loss(logits, mask),
    "uniform_prior": lambda layer, logits, mask: uniform_prior_loss(logits, mask),
}
#: Regularisers of the expert factors: name -> loss of one layer.
_PARAM_LOSSES: dict[str, Callable[[MoELoRALinear], torch.Tensor]] = {
    "diversity": lambda layer: expert_diversity_loss(layer.lora_A, layer.lora_B),
    "orthogonality": lambda layer: orthogonality_loss(layer.lora_A),
}
ROUTER_REGULARIZERS: tuple[str, ...] = tuple(_ROUTER_LOSSES)
PARAM_REGULARIZERS: tuple[str, ...] = tuple(_PARAM_LOSSES)
#: Every regulariser name, the keys of the ``coefs`` mapping (``TrainConfig`` field: ``<name>_coef``).
REGULARIZERS: tuple[str, ...] = ROUTER_REGULARIZERS + PARAM_REGULARIZERS


def uses_router_regularizers(coefs: Mapping[str, float]) -> bool:
    """Whether any router-statistic regulariser has a non-zero coefficient (the layers must then have
    ``record_routing = True`` so that their forward keeps ``last_router_logits``)."""
    return any(coefs.get(name) for name in ROUTER_REGULARIZERS)


def regularizer_terms(
    layers: Sequence[MoELoRALinear], coefs: Mapping[str, float], mask: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, float]]:
    """Weighted regulariser terms of the given layers, split into router-statistic and parameter ones.

    Each regulariser with a non-zero coefficient is computed per layer; its term is
    ``coef · value / len(layers)`` (so the sum of a regulariser's terms is its coefficient times its mean
    over the layers).  Terms are ordered layer by layer, and within a layer in the order of
    ``ROUTER_REGULARIZERS`` / ``PARAM_REGULARIZERS``.

    Args:
        layers: the adapted layers; router regularisers read each one's ``last_router_logits`` ``(N, E)``.
        coefs: ``{name: coefficient}`` for names in ``REGULARIZERS`` (missing or 0: off).
        mask: optional token mask (1 = real token); used for a layer whose logits have as many rows as
            the mask has elements, ignored otherwise.

    Returns:
        ``(router_terms, param_terms, logs)``: lists of scalar tensors and ``{name: unweighted mean over
        the layers}`` (floats) for every active regulariser.

    Raises:
        ValueError: an unknown regulariser name, or a router regulariser on a layer that recorded no
            routing (set ``layer.record_routing = True`` before the forward).
    """
    unknown = sorted(set(coefs) - set(REGULARIZERS))
    if unknown:
        raise ValueError(f"unknown regulariser(s) {unknown}; valid: {list(REGULARIZERS)}")
    active_router = [name for name in ROUTER_REGULARIZERS if coefs.get(name)]
    active_param = [name for name in PARAM_REGULARIZERS if coefs.get(name)]
    router_terms: list[torch.Tensor] = []
    param_terms: list[torch.Tensor] = []
    logs: dict[str, float] = {}
    for layer in layers:
        values = {}
        if active_router:
            logits = layer.last_router_logits  # (N, E)
            if logits is None:
                raise ValueError("router regularisers need layer.record_routing = True before the forward")
            m = mask if mask is not None and mask.numel() == logits.shape[0] else None
            values.update({name: _ROUTER_LOSSES[name](layer, logits, m) for name in active_router})
        values.update({name: _PARAM_LOSSES[name](layer) for name in active_param})
        for names, terms in ((active_router, router_terms), (active_param, param_terms)):
            for name in names:
                terms.append(coefs[name] * values[name] / len(layers))
                logs[name] = logs.get(name, 0.0) + values[name].item() / len(layers)
    return router_terms, param_terms, logs


def apply_regularizers(
    model: nn.Module,
    coefs: Mapping[str, float],
    mode: str = "loss",
    mask: torch.Tensor | None = None,
    grad_accum: int = 1,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The regularisers of every ``MoELoRALinear`` in ``model``, as a loss or as injected gradients.

    ``mode="loss"``: returns the sum of all terms (router terms first), to add to the task loss.
    ``mode="inject"``: adds ``∂(Σ router terms / grad_accum)`` to ``.grad`` of each layer's routing
    parameter (``gate_weight``: the router weight, or the global gate) only — keeping the graph for the
    task loss's backward — and ``∂(Σ parameter terms / grad_accum)`` to ``.grad`` of A and B only; returns
    None.  Call it after the forward and before the task loss's backward.

    Args:
        model: a model (or any module) holding ``MoELoRALinear`` layers.
        coefs: ``{name: coefficient}``, see ``regularizer_terms``.
        mode: one of ``REGULARIZER_MODES`` (``"loss"`` or ``"inject"``).
        mask: optional token mask, see ``regularizer_terms``.
        grad_accum: micro-batches per optimizer step (inject mode divides by it, as the trainer divides
            the task loss).

    Returns:
        ``(loss, logs)``: the regulariser loss (None in inject mode or when no regulariser is active) and
        the per-regulariser logs of ``regularizer_terms``.

    Raises:
        ValueError: an unknown mode, see also ``regularizer_terms``.
    """
    if mode not in REGULARIZER_MODES:
        raise ValueError(f"mode must be one of {REGULARIZER_MODES}, got {mode!r}")
    layers = [layer for _, layer in iter_moe_lora_layers(model)]
    router_terms, param_terms, logs = regularizer_terms(layers, coefs, mask)
    if not (router_terms or param_terms):
        return None, logs
    if mode == "loss":
        return sum(router_terms + param_terms), logs
    if router_terms:
        gates = [layer.gate_weight for layer in layers]
        inject_gradients(sum(router_terms) / grad_accum, gates, retain_graph=True)
    if param_terms:
        factors = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        inject_gradients(sum(param_terms) / grad_accum, factors)
    return None, logs
