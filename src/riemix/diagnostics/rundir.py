"""A run directory as ``riemix inspect`` reads it: metrics, routing diagnostics and adapter weights.

``load_run`` reads ``metrics.jsonl``, ``diagnostics.json``, ``summary.json`` and ``adapter/`` (expert
similarity and effective rank are recomputed from the saved A and B tensors; no base model is loaded);
``layer_rows`` joins the routing and weight numbers into one row per adapted layer, which the tables
(``riemix.diagnostics.inspect``) and the plots (``riemix.diagnostics.plots``) show.

A layer is called *collapsed* only when two of its experts' BᵢAᵢ have a cosine similarity above the
threshold (``collapsed_layers``); ``most_similar_layer`` and ``least_balanced_layer`` name the extremes
without that judgement, and ``untrained_experts`` lists the experts whose B is still exactly zero.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from riemix.diagnostics.monitor import SIMILARITY_THRESHOLD, weight_diagnostics
from riemix.io.adapter import WEIGHTS_NAME, AdapterError, read_adapter_config

__all__ = ["adapter_diagnostics", "collapsed_layers", "layer_names", "layer_rows", "least_balanced_layer",
           "load_run", "most_similar_layer", "natural_key", "short_names", "untrained_experts"]


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    entries = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: invalid JSON line: {exc}") from exc
        if not isinstance(entry, dict) or "step" not in entry:
            raise ValueError(f"{path}:{i}: expected an object with a 'step', got {line[:80]!r}")
        entries.append(entry)
    return entries


def adapter_diagnostics(adapter_dir: str | os.PathLike, threshold: float = SIMILARITY_THRESHOLD) -> dict:
    """Weight diagnostics of every layer of a saved adapter, from its tensors only.

    Args:
        adapter_dir: a directory written by ``riemix.save_adapter``.
        threshold: similarity threshold for ``similar_pairs``.

    Returns:
        ``{module name: weight_diagnostics(...)}`` in the saved module order.

    Raises:
        riemix.adapter.AdapterError: a missing or corrupt adapter.
    """
    meta = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights}: cannot read adapter weights: {exc}") from exc
    out = {}
    for name in meta["base_model"]["modules"]:
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None:
            raise AdapterError(f"{weights}: tensors of module {name!r} are missing")
        out[name] = weight_diagnostics(a, b, threshold)
    return out


def load_run(run_dir: str | os.PathLike, threshold: float = SIMILARITY_THRESHOLD) -> dict[str, Any]:
    """Read everything ``inspect`` needs from a run directory.

    Args:
        run_dir: a run directory written by ``riemix train``.
        threshold: similarity above which two experts count as similar (kept as ``"threshold"``).

    Returns:
        ``{"run_dir", "threshold", "metrics": [entries], "diagnostics": dict or None, "weights": {layer:
        ...} or None, "summary": dict or None}``.

    Raises:
        ValueError: a missing directory, one that is not a riemix run, or a corrupt file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run}: run directory not found")
    metrics_path, adapter_dir = run / "metrics.jsonl", run / "adapter"
    if not metrics_path.is_file() and not adapter_dir.is_dir():
        raise ValueError(f"{run}: not a riemix run directory (no metrics.jsonl and no adapter/)")
    metrics = _read_metrics(metrics_path) if metrics_path.is_file() else []
    diagnostics = None
    if (run / "diagnostics.json").is_file():
        try:
            diagnostics = json.loads((run / "diagnostics.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{run / 'diagnostics.json'}: invalid JSON: {exc}") from exc
    summary = None
    if (run / "summary.json").is_file():
        try:
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = None  # informational only
    weights = adapter_diagnostics(adapter_dir, threshold) if adapter_dir.is_dir() else None
    return {"run_dir": str(run), "threshold": threshold, "metrics": metrics, "diagnostics": diagnostics,
            "weights": weights, "summary": summary}


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def layer_names(run: dict) -> list[str]:
    names = set(run["weights"] or {}) | set((run["diagnostics"] or {}).get("layers", {}))
    return sorted(names, key=natural_key)


def short_names(names: list[str]) -> dict[str, str]:
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    return {n: n[len(prefix):] or n for n in names}


def layer_rows(run: dict) -> list[dict[str, Any]]:
    """One row per adapted layer: routing numbers (None without ``diagnostics.json``) and weight numbers.

    ``"untrained"`` is the list of experts whose B is all zero (None when the run does not say).
    """
    routing = (run["diagnostics"] or {}).get("layers", {})
    rows = []
    for name in layer_names(run):
        r = routing.get(name, {})
        w = (run["weights"] or {}).get(name) or r
        grad = r.get("grad_norm")
        rows.append({
            "name": name,
            "experts": len(r.get("usage") or w.get("effective_rank") or []),
            "entropy": r.get("entropy"),
            "usage_entropy": r.get("usage_entropy"),
            "load_cv": r.get("load_cv"),
            "dead": r.get("num_dead"),
            "similar_pairs": w.get("similar_pairs"),
            "max_similarity": w.get("max_similarity"),
            "erank": w.get("effective_rank_mean"),
            "grad_norm": math.sqrt(sum(x * x for x in grad["total"])) if grad else None,
            "usage": r.get("usage"),
            "untrained": w.get("untrained_experts"),
        })
    return rows


def most_similar_layer(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest expert similarity (collapsed or not), or None without weight numbers."""
    with_sim = [r for r in rows if r["max_similarity"] is not None]
    return max(with_sim, key=lambda r: r["max_similarity"]) if with_sim else None


def collapsed_layers(rows: list[dict[str, Any]], threshold: float = SIMILARITY_THRESHOLD) -> list[dict[str, Any]]:
    """Rows of the layers with two experts more similar than ``threshold``, most similar first."""
    hits = [r for r in rows if r["max_similarity"] is not None and r["max_similarity"] > threshold]
    return sorted(hits, key=lambda r: -r["max_similarity"])


def least_balanced_layer(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the lowest usage entropy relative to log E, or None without routing data."""
    with_usage = [r for r in rows if r["usage_entropy"] is not None and r["experts"] > 1]
    return min(with_usage, key=lambda r: r["usage_entropy"] / math.log(r["experts"])) if with_usage else None


def untrained_experts(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """``(layer, expert)`` of every expert whose B is all zero, in layer order."""
    return [(r["name"], i) for r in rows for i in (r["untrained"] or [])]
