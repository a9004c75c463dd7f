"""Capacity of a layer for growth: what ``add_expert`` does at ``max_experts`` (``capacity_policy``).

A layer created with ``max_experts`` (``MoELoRAConfig.max_experts``) never holds more experts.  Growing a full
layer (``riemix.grow_experts``, ``MoELoRALinear.add_expert``) applies its ``capacity_policy``
(``CAPACITY_POLICIES``):

- ``"error"``: a ValueError naming the layer, ``max_experts`` and the policies.
- ``"evict"``: the least-used expert (ties: the lowest index) is dropped; the new expert takes its slot.
- ``"merge"``: two experts become one and the new expert takes the freed slot, so E stays ``max_experts``.
  The pair is the most similar one (largest cosine of the flattened weight deltas ΔWᵢ = sᵢ·(σᵢ ⊙ Bᵢ)Aᵢ,
  ``riemix.core.geometry.cosine_similarity_ba``; ties: the first pair in index order) among the low-usage
  experts: those with usage <= the lower median of all E usages (at least the two least used).  The
  higher-usage one of the pair (ties: the lower index) is *kept*: its slot holds the merged expert and keeps
  its router row (its gate), the other slot is *freed*.  The merged expert reproduces the sum
  ΔW = ΔWᵢ + ΔWⱼ refactored by an fp64 SVD to rank r = max(rᵢ, rⱼ) (``merge_experts``): exactly when
  rank(ΔW) <= r, else the best rank-r approximation, whose relative error
  ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F = √(Σ_{k>r} σₖ²) / √(Σ_k σₖ²) is returned and logged.  Its expert-scale row is 1
  (the old scales are folded into B) and its age the older of the two.

Usage is a ``(E,)`` tensor (e.g. each expert's mean gate over recent tokens); without one, the mean gate of
the layer's recorded routing (``last_gates``, with ``record_routing``), else every expert counts the same.
Frozen experts (``freeze_expert``, the expert or its router row) are never merged or evicted; a layer with
too few others raises a ValueError naming it.

The new expert in the reused slot is drawn like one from ``add_expert`` (``riemix.core.growth``): B = 0, A
like the layer's init, expert-scale row 1, age 0, and the mean of the other router rows (``routing="global"``:
the logit whose softmax weight is the mean of the others').  Every other expert keeps its values bit for bit.
Each action is described by a ``CapacityAction``; ``riemix.optim.growth.grow_experts`` also resets the
optimizer state of the slots involved and keeps every other expert's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from riemix.core.config import CAPACITY_POLICIES
from riemix.core.geometry import cosine_similarity_ba
from riemix.core.growth import _check_rank, _new_a, _replace, pad_corner

__all__ = [
    "CapacityAction",
    "add_at_capacity",
    "check_capacity",
    "choose_capacity_action",
    "expert_usage",
    "merge_experts",
    "reset_expert_slot",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapacityAction:
    """One capacity action on a full layer.

    Attributes:
        layer: the layer's module name (``""`` when grown through ``add_expert`` directly).
        action: ``"merge"`` or ``"evict"``.
        experts: merge: ``(kept, freed)``; evict: ``(evicted,)``.
        slot: the slot the new expert took (the freed or evicted one).
        error: merge: the relative truncation error ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F (0 when exact); evict: None.
    """

    layer: str
    action: str
    experts: tuple[int, ...]
    slot: int
    error: float | None = None


def check_capacity(max_experts: object, policy: object, num_experts: int) -> tuple[int | None, str]:
    """Validate a layer's ``max_experts`` and ``capacity_policy``.

    Raises:
        ValueError: ``max_experts`` not None nor an int >= ``num_experts``, or an unknown policy (named).
    """
    if policy not in CAPACITY_POLICIES:
        raise ValueError(f"capacity_policy must be one of {CAPACITY_POLICIES}, got {policy!r}")
    if max_experts is not None and (
        isinstance(max_experts, bool) or not isinstance(max_experts, int) or max_experts < num_experts
    ):
        raise ValueError(f"max_experts must be None or an int >= num_experts ({num_experts}), got {max_experts!r}")
    return max_experts, policy


def expert_usage(layer, usage: torch.Tensor | None = None) -> torch.Tensor:
    """``(E,)`` fp64 usage of every expert (see the module docstring for the default).

    Raises:
        ValueError: ``usage`` is not a finite ``(E,)`` tensor (its shape named).
    """
    e = layer.num_experts
    if usage is None:
        gates = layer.last_gates
        if gates is not None and gates.dim() == 2 and gates.shape[1] == e and gates.shape[0] > 0:
            return gates.detach().double().mean(0).cpu()  # (E,)
        return torch.zeros(e, dtype=torch.float64)  # (E,): all alike
    if not isinstance(usage, torch.Tensor) or usage.shape != (e,) or not bool(torch.isfinite(usage).all()):
        shape = tuple(usage.shape) if isinstance(usage, torch.Tensor) else type(usage).__name__
        raise ValueError(f"usage must be a finite ({e},) tensor (one value per expert), got {shape}")
    return usage.detach().double().cpu()  # (E,)


def _protected(layer) -> torch.Tensor:
    """``(E,)`` bool: frozen experts or router rows."""
    return (layer._frozen_mask("frozen_experts") | layer._frozen_mask("frozen_router_rows")).cpu()


def choose_capacity_action(
    layer, usage: torch.Tensor | None = None, name: str = ""
) -> tuple[str, tuple[int, ...], int]:
    """What the layer's policy does to make room: ``(action, experts, slot)`` (see ``CapacityAction``).

    Args:
        layer: a full ``MoELoRALinear`` (``num_experts == max_experts``).
        usage: ``(E,)`` usage, or None (``expert_usage``).
        name: the layer's module name, for messages.

    Raises:
        ValueError: policy ``"error"``; too few unfrozen experts; a bad ``usage`` (each naming the layer).
    """
    where = f"layer {name!r}" if name else "add_expert"
    policy, cap = layer.capacity_policy, layer.max_experts
    if policy == "error":
        raise ValueError(
            f"{where} has num_experts={layer.num_experts} = max_experts={cap}; capacity_policy='error' refuses "
            f"to grow it: raise max_experts or choose a capacity_policy from {CAPACITY_POLICIES}"
        )
    u = expert_usage(layer, usage)  # (E,)
    free = [i for i, p in enumerate(_protected(layer).tolist()) if not p]
    need = 2 if policy == "merge" else 1
    if len(free) < need:
        raise ValueError(
            f"{where} is at max_experts={cap} and capacity_policy={policy!r} needs {need} unfrozen expert(s), "
            f"but only {len(free)} of {layer.num_experts} are unfrozen (frozen experts are never merged or evicted)"
        )
    by_usage = sorted(free, key=lambda i: (float(u[i]), i))
    if policy == "evict":
        return "evict", (by_usage[0],), by_usage[0]
    median = float(u.median())  # the lower median for an even E
    low = sorted(set(by_usage[:2]) | {i for i in free if float(u[i]) <= median})
    with torch.no_grad():
        cos = cosine_similarity_ba(layer.lora_A.detach().double(), layer.effective_lora_b().detach().double())
    pairs = [(i, j) for k, i in enumerate(low) for j in low[k + 1 :]]
    i, j = max(pairs, key=lambda ij: (float(cos[ij]), -ij[0], -ij[1]))
    kept, freed = (j, i) if float(u[j]) > float(u[i]) else (i, j)
    return "merge", (kept, freed), freed


@torch.no_grad()
def merge_experts(layer, keep: int, drop: int, rank: int | None = None) -> float:
    """Put ΔW_keep + ΔW_drop into slot ``keep`` at rank r (fp64 SVD) and zero slot ``drop``; the error.

    ΔWᵢ = sᵢ·(σᵢ ⊙ Bᵢ)Aᵢ.  With U = [s₁σ₁⊙B₁ | s₂σ₂⊙B₂] and V = [A₁; A₂], ΔW = U V = Q_U (R_U R_Vᵀ) Q_Vᵀ
    (reduced QR of U and Vᵀ), so its SVD comes from the small core R_U R_Vᵀ.  The merged expert is the best
    rank-r part split evenly, B = Ũ√Σ/√s_r, A = √Σ Ṽᵀ/√s_r, its expert-scale row 1 and its rank r.

    Args:
        layer: the ``MoELoRALinear``.
        keep: the slot receiving the merged expert (keeps its router row).
        drop: the slot emptied (A = B = 0, expert-scale row 1); the caller gives it a new expert.
        rank: the merged rank r (None: max of the two ranks); at most the layer's stacked rank R.

    Returns:
        ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F (0 for ΔW = 0).

    Raises:
        ValueError: equal or out-of-range slots, or a rank not in 1..R (named).
    """
    keep, drop = layer._check_expert_index(keep), layer._check_expert_index(drop)
    if keep == drop:
        raise ValueError(f"merge_experts: keep and drop must differ, got {keep} and {drop}")
    ranks = list(layer.expert_ranks)
    r = max(ranks[keep], ranks[drop]) if rank is None else _check_rank(rank)
    if r > layer.rank:
        raise ValueError(f"merge_experts: rank must be <= the layer's stacked rank R={layer.rank}, got {r}")
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()  # (E, R, in), (E, out, R)
    sigma = None if layer.expert_scale is None else layer.expert_scale.detach().double()  # (E, out)
    scal = layer.expert_scaling
    cols, rows = [], []
    for i in (keep, drop):
        bi = b[i, :, : ranks[i]] * scal[i]  # (out, rᵢ)
        cols.append(bi if sigma is None else bi * sigma[i].unsqueeze(1))
        rows.append(a[i, : ranks[i]])  # (rᵢ, in)
    qu, ru = torch.linalg.qr(torch.cat(cols, 1))  # (out, m), (m, r₁+r₂)
    qv, rv = torch.linalg.qr(torch.cat(rows, 0).t())  # (in, n), (n, r₁+r₂)
    uc, s, vch = torch.linalg.svd(ru @ rv.t())  # core (m, n): (m, m), (min,), (n, n)
    t = min(r, s.shape[0])
    total = float(s.square().sum())
    error = math.sqrt(float(s[t:].square().sum()) / total) if total > 0 else 0.0
    root = (s[:t] / layer._scaling_of(r)).sqrt()  # (t,)
    new_b = (qu @ uc[:, :t]) * root  # (out, t)
    new_a = root.unsqueeze(1) * (vch[:t] @ qv.t())  # (t, in)
    for slot in (keep, drop):
        _clear_slot(layer, slot)
    layer.lora_A[keep, :t] = new_a.to(layer.lora_A.dtype)
    layer.lora_B[keep, :, :t] = new_b.to(layer.lora_B.dtype)
    ages = layer.expert_age
    ages[keep] = torch.maximum(ages[keep], ages[drop])
    ranks[keep] = r
    layer._set_ranks(ranks)
    return error


def _clear_slot(layer, slot: int) -> None:
    """Zero the slot's A, B (and their gradients), its expert-scale row to 1."""
    for p in (layer.lora_A, layer.lora_B):
        p[slot] = 0
        if p.grad is not None:
            p.grad[slot] = 0
    if layer.expert_scale is not None:
        layer.expert_scale[slot] = 1
        if layer.expert_scale.grad is not None:
            layer.expert_scale.grad[slot] = 0


@torch.no_grad()
def reset_expert_slot(layer, slot: int, rank: int) -> None:
    """Make slot ``slot`` a new expert of rank ``rank`` <= R (see the module docstring); others untouched.

    Raises:
        ValueError: an out-of-range slot or a rank not in 1..R (named).
    """
    slot, rank = layer._check_expert_index(slot), _check_rank(rank)
    if rank > layer.rank:
        raise ValueError(f"reset_expert_slot: rank must be <= the layer's stacked rank R={layer.rank}, got {rank}")
    _clear_slot(layer, slot)
    layer.lora_A[slot, :rank] = _new_a(layer, rank)
    others = [i for i in range(layer.num_experts) if i != slot]
    gate = layer.gate_weight
    if layer.router is not None:
        gate[slot] = gate[others].mean(0)  # (in,)
    else:
        w, temp = gate[others].double(), layer.router_temperature  # (E−1,)
        gate[slot] = (temp * (torch.logsumexp(w / temp, 0) - math.log(len(others)))).to(gate.dtype)
    if gate.grad is not None:
        gate.grad[slot] = 0
    layer.expert_age[slot] = 0
    ranks = list(layer.expert_ranks)
    ranks[slot] = rank
    layer._set_ranks(ranks)


def _widen(layer, rank: int) -> None:
    """Stack the layer at rank ``rank`` > R: new ``lora_A`` / ``lora_B`` Parameters, zero padded."""
    e = layer.num_experts
    _replace(layer, "lora_A", pad_corner(layer.lora_A.detach(), (e, rank, layer.in_features)))  # (E, R', in)
    _replace(layer, "lora_B", pad_corner(layer.lora_B.detach(), (e, layer.out_features, rank)))  # (E, out, R')
    layer.rank = rank  # the slot taking this rank follows at once (reset_expert_slot)


def add_at_capacity(
    layer, rank: int | None = None, usage: torch.Tensor | None = None, name: str = ""
) -> CapacityAction:
    """Add an expert to a full layer by its capacity policy (merge or evict, then reuse the slot); logged.

    A ``rank`` above R widens ``lora_A`` / ``lora_B`` (new Parameters, as ``add_expert`` does).

    Args:
        layer: a ``MoELoRALinear`` with ``num_experts == max_experts``.
        rank: the new expert's rank (None: ``expert_ranks[0]``).
        usage: ``(E,)`` usage, or None (``expert_usage``).
        name: the layer's module name (for the record and messages).

    Returns:
        The ``CapacityAction``; the new expert's index is its ``slot``.

    Raises:
        ValueError: see ``choose_capacity_action``; a bad ``rank`` or a PiSSA layer.
    """
    r_new = layer.expert_ranks[0] if rank is None else _check_rank(rank)
    if layer.pissa_down is not None:
        raise ValueError(f"layer {name!r} was initialised with init='pissa'; growing it is not supported")
    action, experts, slot = choose_capacity_action(layer, usage, name)
    error = merge_experts(layer, *experts) if action == "merge" else None
    if r_new > layer.rank:
        _widen(layer, r_new)
    reset_expert_slot(layer, slot, r_new)
    record = CapacityAction(name, action, experts, slot, error)
    _log.info("capacity %s on %r: experts %s, new expert in slot %d, error %s", action, name, experts, slot, error)
    return record
