"""Diagnostics of a mixture of LoRA experts: routing statistics and expert geometry.

Pure functions of gates ``(N, E)`` (zero where an expert is not selected) or of one layer's stacked
factors ``lora_a`` ``(E, r, in)`` / ``lora_b`` ``(E, out, r)``, and a ``RoutingMonitor`` that
accumulates gate statistics over a window of training steps. Every number is explained in
docs/diagnostics.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from riemix.core.geometry import cosine_similarity_a, cosine_similarity_ba, effective_rank, expert_singular_values
from riemix.core.layer import iter_moe_lora_layers

__all__ = [
    "SIMILARITY_THRESHOLD",
    "gate_entropy",
    "usage_entropy",
    "coefficient_of_variation",
    "expert_grad_norms",
    "model_grad_norms",
    "weight_diagnostics",
    "RoutingMonitor",
    "collect_diagnostics",
    "compact_diagnostics",
]

#: Pairs of experts whose BᵢAᵢ cosine similarity exceeds this count as "similar".
SIMILARITY_THRESHOLD = 0.8


def _rows(gates: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if gates.dim() != 2:
        raise ValueError(f"gates must be 2-D (N, E), got shape {tuple(gates.shape)}")
    g = gates.detach().double()  # (N, E)
    if mask is None:
        return g
    if mask.numel() != g.shape[0]:
        raise ValueError(f"mask has {mask.numel()} elements for {g.shape[0]} tokens")
    return g[mask.reshape(-1).to(g.device).bool()]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) along the last dim of a distribution; 0·log 0 = 0."""
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)


def gate_entropy(gates: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean per-token entropy (nats) of the gate distribution over experts.

    0 when every token uses one expert with gate 1; log k for k equal gates; log E for uniform dense.

    Args:
        gates: ``(N, E)`` gates, each row summing to 1.
        mask: optional token mask (any shape with N elements; 0 = padding).

    Returns:
        The mean entropy (0.0 when no token is left).

    Raises:
        ValueError: gates not 2-D or a mask of the wrong size.
    """
    g = _rows(gates, mask)  # (N', E)
    return float(_entropy(g).mean()) if g.shape[0] else 0.0


def usage_entropy(mean_gate: torch.Tensor) -> float:
    """Entropy (nats) of the mean usage distribution (mean gate per expert, renormalised).

    0 when all tokens go to one expert, log E when the experts are used equally on average.

    Args:
        mean_gate: ``(E,)`` non-negative usage.

    Returns:
        The entropy (0.0 for an all-zero vector).
    """
    m = mean_gate.detach().double().clamp_min(0)  # (E,)
    total = m.sum()
    return float(_entropy(m / total)) if total > 0 else 0.0


def coefficient_of_variation(load: torch.Tensor) -> float:
    """Population standard deviation over mean of a load vector (0 = perfectly balanced).

    For a load concentrated on one of E experts it is √(E − 1).

    Args:
        load: ``(E,)`` token counts (or shares) per expert.

    Returns:
        std/mean (0.0 for an all-zero vector).
    """
    x = load.detach().double()  # (E,)
    mean = x.mean()
    return float(x.std(correction=0) / mean) if mean > 0 else 0.0


def expert_grad_norms(lora_a: torch.Tensor, lora_b: torch.Tensor) -> dict[str, list[float]]:
    """Per-expert L2 norms of the current ``.grad`` of A, of B, and of both together.

    Args:
        lora_a: ``(E, r, in)`` parameter (its ``.grad`` is read; None counts as 0).
        lora_b: ``(E, out, r)`` parameter.

    Returns:
        ``{"A": [E floats], "B": [E floats], "total": [E floats]}``.
    """
    e = lora_a.shape[0]

    def norms(p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros(e, dtype=torch.float64)
        return p.grad.detach().double().reshape(e, -1).norm(dim=1).cpu()  # (E,)

    na, nb = norms(lora_a), norms(lora_b)
    return {"A": na.tolist(), "B": nb.tolist(), "total": (na.pow(2) + nb.pow(2)).sqrt().tolist()}


def model_grad_norms(model: torch.nn.Module) -> dict[str, dict[str, list[float]]]:
    """``expert_grad_norms`` of every adapted layer of ``model``, keyed by module name (read before
    ``optimizer.step()``, which may clear or reuse ``.grad``)."""
    return {name: expert_grad_norms(layer.lora_A, layer.lora_B) for name, layer in iter_moe_lora_layers(model)}


def weight_diagnostics(
    lora_a: torch.Tensor, lora_b: torch.Tensor, threshold: float = SIMILARITY_THRESHOLD
) -> dict:
    """Expert geometry of one layer: BA and A similarity, similar pairs, effective ranks.

    Args:
        lora_a: ``(E, r, in)``.
        lora_b: ``(E, out, r)``.
        threshold: cosine similarity above which a pair of experts counts as similar.

    Returns:
        ``{"similarity": E×E list (cosine of flattened BᵢAᵢ), "similarity_a": E×E list,
        "similar_pairs": pairs i<j with similarity > threshold, "max_similarity": largest off-diagonal,
        "effective_rank": [E floats], "effective_rank_mean": float, "rank": r (its maximum),
        "untrained_experts": indices i whose Bᵢ is exactly zero (after a zero-B init: no update ever
        reached the expert)}``.

    Raises:
        ValueError: factor shapes that do not fit together, or a threshold outside [-1, 1].
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1], got {threshold!r}")
    with torch.no_grad():
        a, b = lora_a.detach().double(), lora_b.detach().double()
        sim = cosine_similarity_ba(a, b)  # (E, E)
        sim_a = cosine_similarity_a(a)  # (E, E)
        e = sim.shape[0]
        upper = torch.triu(torch.ones(e, e, dtype=torch.bool), diagonal=1)  # (E, E)
        off = sim[upper]
        sv = expert_singular_values(a, b)  # (E, r)
        erank = effective_rank(sv)  # (E,)
    return {
        "similarity": sim.tolist(),
        "similarity_a": sim_a.tolist(),
        "similar_pairs": int((off > threshold).sum()),
        "max_similarity": float(off.max()) if off.numel() else 0.0,
        "effective_rank": erank.tolist(),
        "effective_rank_mean": float(erank.mean()),
        "rank": int(sv.shape[-1]),
        "untrained_experts": [i for i in range(lora_b.shape[0]) if not bool(lora_b[i].detach().any())],
    }


class RoutingMonitor:
    """Accumulates gate statistics per layer over a window of steps.

    Feed it after every forward with ``update(name, gates, mask)`` (or ``update_model``), read
    ``summary()`` and ``reset()`` at the end of each window. Per layer it keeps, over non-padding tokens:
    the token count, how many tokens selected each expert (gate > 0), the sum of gates per expert and
    the sum of per-token gate entropies.
    """

    def __init__(self) -> None:
        self._stats: dict[str, dict] = {}
        self.updates = 0

    def reset(self) -> None:
        """Start a new window."""
        self._stats.clear()
        self.updates = 0

    def update(self, name: str, gates: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one forward's gates of layer ``name``.

        Args:
            name: layer name.
            gates: ``(N, E)`` gates (zero where unselected).
            mask: optional token mask with N elements (0 = padding).

        Raises:
            ValueError: gates not 2-D, a mask of the wrong size, or a changed expert count.
        """
        g = _rows(gates, mask)  # (N', E), fp64 on the gates' device (no host sync per update)
        st = self._stats.get(name)
        if st is None:
            e = g.shape[1]
            st = self._stats[name] = {
                "tokens": 0,
                "selected": torch.zeros(e, dtype=torch.float64, device=g.device),
                "gate_sum": torch.zeros(e, dtype=torch.float64, device=g.device),
                "entropy_sum": torch.zeros((), dtype=torch.float64, device=g.device),
            }
        elif st["selected"].shape[0] != g.shape[1]:
            earlier = st["selected"].shape[0]
            raise ValueError(f"layer {name!r}: gates have {g.shape[1]} experts, earlier {earlier}")
        st["tokens"] += g.shape[0]
        st["selected"] += (g > 0).sum(0).double()
        st["gate_sum"] += g.sum(0)
        st["entropy_sum"] += _entropy(g).sum()

    def update_model(self, layers: Iterable[tuple[str, object]], mask: torch.Tensor | None = None) -> None:
        """``update`` every ``(name, MoELoRALinear)`` from its ``last_gates`` (skips layers without).

        A mask whose size does not match a layer's token count is ignored for that layer.
        """
        for name, layer in layers:
            gates = getattr(layer, "last_gates", None)
            if gates is None:
                continue
            m = mask if mask is not None and mask.numel() == gates.shape[0] else None
            self.update(name, gates, m)
        self.updates += 1

    def layer_summary(self, name: str) -> dict:
        """Statistics of one layer over the window.

        Returns:
            ``{"tokens", "entropy" (mean per-token gate entropy), "usage_entropy" (entropy of the mean
            gate), "usage" (share of tokens selecting each expert), "load_share" (share of selections),
            "mean_gate" (mean gate per expert), "load_cv", "dead_experts" (indices never selected),
            "num_dead"}``.
        """
        st = self._stats[name]
        n = max(st["tokens"], 1)
        mean_gate = st["gate_sum"].cpu() / n  # (E,)
        selected = st["selected"].cpu()  # (E,)
        total = float(selected.sum())
        dead = [i for i, c in enumerate(selected.tolist()) if c == 0]
        return {
            "tokens": st["tokens"],
            "entropy": float(st["entropy_sum"]) / n,
            "usage_entropy": usage_entropy(mean_gate),
            "usage": (selected / n).tolist(),
            "load_share": (selected / total).tolist() if total else [0.0] * selected.shape[0],
            "mean_gate": mean_gate.tolist(),
            "load_cv": coefficient_of_variation(selected),
            "dead_experts": dead,
            "num_dead": len(dead),
        }

    def summary(self) -> dict:
        """``{"layers": {name: layer_summary}, "overall": {...}}`` for the current window.

        ``overall`` averages entropy, usage entropy and load CV over layers (each layer weighs
        equally) and adds the total number of dead experts, the number of experts and log E_max.
        """
        layers = {name: self.layer_summary(name) for name in self._stats}
        overall: dict = {"layers": len(layers), "updates": self.updates}
        if layers:
            vals = list(layers.values())
            for key in ("entropy", "usage_entropy", "load_cv"):
                overall[key] = sum(v[key] for v in vals) / len(vals)
            overall["dead_experts"] = sum(v["num_dead"] for v in vals)
            overall["experts"] = sum(len(v["usage"]) for v in vals)
            overall["max_entropy"] = math.log(max(len(v["usage"]) for v in vals))
        return {"layers": layers, "overall": overall}


def collect_diagnostics(
    layers: Iterable[tuple[str, object]],
    monitor: RoutingMonitor | None,
    grad_norms: dict[str, dict[str, list[float]]] | None = None,
    step: int | None = None,
    threshold: float = SIMILARITY_THRESHOLD,
) -> dict:
    """Full diagnostics of a model: routing window statistics, expert geometry, gradient norms.

    Args:
        layers: ``(name, MoELoRALinear)`` pairs (``riemix.iter_moe_lora_layers(model)``).
        monitor: the routing window (None: weight diagnostics only).
        grad_norms: optional ``{name: expert_grad_norms(...)}`` taken before the optimizer step.
        step: the optimizer step, recorded as ``"step"``.
        threshold: similarity threshold for ``similar_pairs``.

    Returns:
        ``{"step", "threshold", "layers": {name: {...routing..., ...weights..., "grad_norm"}},
        "overall": {...}}``; ``overall`` adds the total of similar pairs and the mean effective rank to
        ``RoutingMonitor.summary()["overall"]``.
    """
    routing = monitor.summary() if monitor is not None else {"layers": {}, "overall": {}}
    out_layers: dict[str, dict] = {}
    for name, layer in layers:
        entry = dict(routing["layers"].get(name, {}))
        entry.update(weight_diagnostics(layer.lora_A, layer.lora_B, threshold))
        if grad_norms and name in grad_norms:
            entry["grad_norm"] = grad_norms[name]
        out_layers[name] = entry
    overall = dict(routing["overall"])
    if out_layers:
        vals = list(out_layers.values())
        overall["similar_pairs"] = sum(v["similar_pairs"] for v in vals)
        overall["effective_rank_mean"] = sum(v["effective_rank_mean"] for v in vals) / len(vals)
        if grad_norms:
            overall["grad_norm"] = math.sqrt(
                sum(x * x for v in vals if "grad_norm" in v for x in v["grad_norm"]["total"])
            )
    return {"step": step, "threshold": threshold, "layers": out_layers, "overall": overall}


def compact_diagnostics(full: dict) -> dict:
    """A one-line summary of ``collect_diagnostics`` output for metrics.jsonl.

    Per layer: ``entropy``, ``usage_entropy``, ``load_cv``, ``dead`` (count), ``similar_pairs``,
    ``erank`` (mean effective rank), ``grad_norm`` (L2 over the layer's experts), rounded to 5 digits;
    plus ``overall`` unchanged.
    """

    def r(x: float) -> float:
        return round(float(x), 5)

    layers = {}
    for name, v in full["layers"].items():
        entry = {
            "entropy": r(v.get("entropy", 0.0)),
            "usage_entropy": r(v.get("usage_entropy", 0.0)),
            "load_cv": r(v.get("load_cv", 0.0)),
            "dead": v.get("num_dead", 0),
            "similar_pairs": v["similar_pairs"],
            "erank": r(v["effective_rank_mean"]),
        }
        if "grad_norm" in v:
            entry["grad_norm"] = r(math.sqrt(sum(x * x for x in v["grad_norm"]["total"])))
        layers[name] = entry
    overall = {k: (r(v) if isinstance(v, float) else v) for k, v in full["overall"].items()}
    return {"layers": layers, "overall": overall}
