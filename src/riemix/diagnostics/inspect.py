"""``riemix inspect RUN_DIR``: tables and plots of a run's routing and expert diagnostics.

Reads, from a run directory written by ``riemix train``:

- ``metrics.jsonl``: loss, regulariser and evaluation curves, and (with ``diagnostics_every``) the
  compact diagnostics lines;
- ``diagnostics.json``: the latest full routing window (usage per expert, entropies, dead experts);
- ``adapter/``: the saved A and B tensors, from which expert similarity and effective rank are
  recomputed (no base model is loaded).

Prints a per-layer table and an overall summary and writes PNG plots (matplotlib, no pyplot state)
to ``RUN_DIR/plots/`` or ``--out``: ``usage_heatmap.png`` (layer × expert share of tokens),
``similarity_<layer>.png`` (expert-similarity matrices of one layer, by default the most collapsed),
``curves.png`` (loss, regularisers, evaluation metrics, routing entropy over steps) and
``effective_rank.png``. See docs/diagnostics.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from riemix.diagnostics.monitor import SIMILARITY_THRESHOLD, weight_diagnostics
from riemix.io.fileio import atomic_write

__all__ = ["load_run", "adapter_diagnostics", "format_tables", "write_plots", "inspect_run"]

REGULARIZER_KEYS = ("load_balance", "z_loss", "uniform_prior", "diversity", "orthogonality")


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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from riemix.io.adapter import WEIGHTS_NAME, AdapterError, read_adapter_config

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

    Returns:
        ``{"run_dir", "metrics": [entries], "diagnostics": dict or None, "weights": {layer: ...} or
        None, "summary": dict or None}``.

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
    return {"run_dir": str(run), "metrics": metrics, "diagnostics": diagnostics, "weights": weights,
            "summary": summary}


def _natural(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _layer_names(run: dict) -> list[str]:
    names = set(run["weights"] or {}) | set((run["diagnostics"] or {}).get("layers", {}))
    return sorted(names, key=_natural)


def _short_names(names: list[str]) -> dict[str, str]:
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    return {n: n[len(prefix):] or n for n in names}


def _layer_rows(run: dict) -> list[dict[str, Any]]:
    routing = (run["diagnostics"] or {}).get("layers", {})
    rows = []
    for name in _layer_names(run):
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
        })
    return rows


def _most_collapsed(rows: list[dict[str, Any]]) -> str | None:
    """Lowest usage entropy relative to log E; without routing data, the highest max similarity."""
    with_usage = [r for r in rows if r["usage_entropy"] is not None and r["experts"] > 1]
    if with_usage:
        return min(with_usage, key=lambda r: r["usage_entropy"] / math.log(r["experts"]))["name"]
    with_sim = [r for r in rows if r["max_similarity"] is not None]
    return max(with_sim, key=lambda r: r["max_similarity"])["name"] if with_sim else None


def format_tables(run: dict) -> str:
    """The per-layer table and the overall summary as text."""
    rows = _layer_rows(run)
    short = _short_names([r["name"] for r in rows])
    width = max([len(s) for s in short.values()] + [5])

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    head = (f"{'layer':<{width}} {'E':>3} {'entropy':>8} {'usage_H':>8} {'log E':>6} {'load_cv':>8} "
            f"{'dead':>5} {'sim>thr':>7} {'max_sim':>8} {'erank':>6} {'grad':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        log_e = math.log(r["experts"]) if r["experts"] else None
        lines.append(
            f"{short[r['name']]:<{width}} {r['experts']:>3} {f(r['entropy'], '8.4f'):>8} "
            f"{f(r['usage_entropy'], '8.4f'):>8} {f(log_e, '6.3f'):>6} {f(r['load_cv'], '8.4f'):>8} "
            f"{f(r['dead'], 'd'):>5} {f(r['similar_pairs'], 'd'):>7} {f(r['max_similarity'], '8.4f'):>8} "
            f"{f(r['erank'], '6.3f'):>6} {f(r['grad_norm'], '9.3e'):>9}"
        )
    lines.append("")
    diag = run["diagnostics"] or {}
    overall = diag.get("overall", {})
    lines.append("overall" + (f" (routing window ending at step {diag.get('step')})" if diag else
                              " (no diagnostics.json: train with --diagnostics-every N for routing numbers)"))
    n_experts = sum(r["experts"] for r in rows)
    lines.append(f"  layers {len(rows)}, experts {n_experts}")
    if overall.get("entropy") is not None:
        lines.append(f"  mean gate entropy {overall['entropy']:.4f}, mean usage entropy "
                     f"{overall['usage_entropy']:.4f} (max {overall.get('max_entropy', 0.0):.4f}), "
                     f"mean load CV {overall['load_cv']:.4f}, dead experts {overall.get('dead_experts', 0)}")
    sims = [r["similar_pairs"] for r in rows if r["similar_pairs"] is not None]
    eranks = [r["erank"] for r in rows if r["erank"] is not None]
    if sims:
        lines.append(f"  expert pairs with BA similarity > threshold: {sum(sims)}; "
                     f"mean effective rank {sum(eranks) / len(eranks):.3f}")
    collapsed = _most_collapsed(rows)
    if collapsed:
        lines.append(f"  most collapsed layer: {collapsed}")
    losses = [m for m in run["metrics"] if "loss" in m]
    if losses:
        lines.append(f"  loss {losses[0]['loss']:.4f} (step {losses[0]['step']}) -> "
                     f"{losses[-1]['loss']:.4f} (step {losses[-1]['step']})")
    evals = [m for m in run["metrics"] if "eval" in m]
    if evals:
        last = evals[-1]
        lines.append(f"  last eval (step {last['step']}): "
                     + ", ".join(f"{k}={v:.4f}" for k, v in last["eval"].items() if isinstance(v, float)))
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return path


def _plot_usage(rows: list[dict[str, Any]], short: dict[str, str], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["usage"]]
    if not rows:
        return None
    e_max = max(len(r["usage"]) for r in rows)
    grid = torch.full((len(rows), e_max), float("nan"))
    for i, r in enumerate(rows):
        grid[i, : len(r["usage"])] = torch.tensor(r["usage"])
    fig = Figure(figsize=(1.2 + 0.55 * e_max, 1.0 + 0.3 * len(rows)))
    ax = fig.subplots()
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xticks(range(e_max))
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(rows)), [short[r["name"]] for r in rows], fontsize=7)
    for i, r in enumerate(rows):
        for j in r["dead_idx"]:
            ax.text(j, i, "×", ha="center", va="center", color="red", fontsize=8)
    ax.set_title("share of tokens selecting each expert (× = dead)")
    fig.colorbar(im, ax=ax, label="share of tokens")
    return _save(fig, path)


def _plot_similarity(run: dict, layer: str, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    w = (run["weights"] or {}).get(layer) or (run["diagnostics"] or {}).get("layers", {}).get(layer)
    if not w or "similarity" not in w:
        return None
    mats = [("BᵢAᵢ", w["similarity"])] + ([("Aᵢ", w["similarity_a"])] if "similarity_a" in w else [])
    e = len(w["similarity"])
    fig = Figure(figsize=(4.2 * len(mats) + 0.8, 4.0))
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (label, mat) in zip(axes, mats, strict=True):
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        if e <= 12:
            for i in range(e):
                for j in range(e):
                    ax.text(j, i, f"{mat[i][j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(e))
        ax.set_yticks(range(e))
        ax.set_xlabel("expert")
        ax.set_title(f"cosine similarity of {label}")
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.suptitle(layer, fontsize=9)
    return _save(fig, path)


def _plot_curves(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval" in m]
    diags = [m for m in metrics if "diagnostics" in m]
    if not (train or evals or diags):
        return None
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    if train:
        steps, losses = [m["step"] for m in train], [m["loss"] for m in train]
        ax.plot(steps, losses, alpha=0.4 if len(train) > 10 else 1.0, label="task loss")
        if len(train) > 10:
            smooth, avg = [], losses[0]
            for value in losses:
                avg = 0.8 * avg + 0.2 * value
                smooth.append(avg)
            ax.plot(steps, smooth, color="C0", label="EMA (0.8)")
        ax.legend()
    ax.set_title("training loss")
    ax.set_xlabel("step")
    ax = axes[0, 1]
    for key in REGULARIZER_KEYS:
        pts = [(m["step"], m[key]) for m in train if key in m]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=key)
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_title("regularisers (unweighted, mean over layers)")
    ax.set_xlabel("step")
    ax = axes[1, 0]
    keys = sorted({k for m in evals for k, v in m["eval"].items() if isinstance(v, (int, float))})
    for key in keys:
        pts = [(m["step"], m["eval"][key]) for m in evals if key in m["eval"]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=key)
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_title("evaluation")
    ax.set_xlabel("step")
    ax = axes[1, 1]
    if diags:
        steps = [m["step"] for m in diags]
        overall = [m["diagnostics"].get("overall", {}) for m in diags]
        for key, label in (("entropy", "gate entropy"), ("usage_entropy", "usage entropy")):
            ax.plot(steps, [o.get(key, float("nan")) for o in overall], label=label)
        if overall[-1].get("max_entropy") is not None:
            ax.axhline(overall[-1]["max_entropy"], color="grey", ls="--", lw=0.8,
                       label="log E (uniform usage)")
        ax2 = ax.twinx()
        dead = [o.get("dead_experts", 0) for o in overall]
        ax2.plot(steps, dead, color="red", ls=":", label="dead experts")
        ax2.set_ylabel("dead experts", color="red")
        ax.legend(fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no diagnostics lines\n(train with --diagnostics-every N)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_title("routing (mean over layers)")
    ax.set_xlabel("step")
    fig.tight_layout()
    return _save(fig, path)


def _plot_erank(rows: list[dict[str, Any]], run: dict, short: dict[str, str], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    data = [((run["weights"] or {}).get(r["name"]) or {}).get("effective_rank") for r in rows]
    if not any(data):
        return None
    fig = Figure(figsize=(8, 1.0 + 0.28 * len(rows)))
    ax = fig.subplots()
    for i, vals in enumerate(data):
        if vals:
            ax.scatter(vals, [i] * len(vals), s=14, alpha=0.7)
    ax.set_yticks(range(len(rows)), [short[r["name"]] for r in rows], fontsize=7)
    ax.set_xlabel("effective rank of BᵢAᵢ (one dot per expert; max = rank r)")
    ax.set_title("expert effective rank exp(H(σ/Σσ))")
    ranks = [((run["weights"] or {}).get(r["name"]) or {}).get("rank") for r in rows]
    ax.set_xlim(0, max([x for x in ranks if x] + [1]) + 0.2)
    ax.invert_yaxis()
    return _save(fig, path)


def write_plots(run: dict, out_dir: str | os.PathLike, layer: str | None = None) -> list[Path]:
    """Write the PNG plots of ``run`` (from ``load_run``) to ``out_dir``; returns the written paths.

    Raises:
        ValueError: ``layer`` is not one of the run's layers.
    """
    out = Path(out_dir)
    rows = _layer_rows(run)
    names = [r["name"] for r in rows]
    if layer is not None and layer not in names:
        raise ValueError(f"--layer {layer!r} is not a layer of this run; layers: {names[:8]}"
                         + (" ..." if len(names) > 8 else ""))
    short = _short_names(names)
    for r in rows:
        routing = (run["diagnostics"] or {}).get("layers", {}).get(r["name"], {})
        r["dead_idx"] = routing.get("dead_experts", [])
    chosen = layer or _most_collapsed(rows)
    written = [
        _plot_usage(rows, short, out / "usage_heatmap.png"),
        _plot_curves(run["metrics"], out / "curves.png"),
        _plot_erank(rows, run, short, out / "effective_rank.png"),
    ]
    if chosen:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in chosen)
        written.append(_plot_similarity(run, chosen, out / f"similarity_{safe}.png"))
    return [p for p in written if p is not None]


def inspect_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    layer: str | None = None,
    threshold: float = SIMILARITY_THRESHOLD,
    plots: bool = True,
) -> dict[str, Any]:
    """Load a run, format its tables and write its plots.

    Args:
        run_dir: the run directory.
        out_dir: where to write the PNGs (default ``run_dir/plots``).
        layer: layer for the similarity plot (default: the most collapsed one).
        threshold: similarity threshold for counting similar expert pairs.
        plots: write the PNGs.

    Returns:
        ``{"text": tables, "plots": [paths], "run": load_run(...)}``.

    Raises:
        ValueError: see ``load_run`` and ``write_plots``; a threshold outside [-1, 1].
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1], got {threshold!r}")
    run = load_run(run_dir, threshold)
    text = format_tables(run)
    paths = write_plots(run, out_dir or Path(run_dir) / "plots", layer) if plots else []
    return {"text": text, "plots": paths, "run": run}
