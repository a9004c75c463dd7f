"""PNG plots of a run (matplotlib, no pyplot state), written atomically.

``usage_heatmap.png`` (layer × expert share of tokens), ``similarity_<layer>.png`` (expert-similarity
matrices of one layer, by default the most collapsed), ``curves.png`` (loss, regularisers, evaluation
metrics, routing entropy over steps) and ``effective_rank.png``. See docs/diagnostics.md.

matplotlib is an optional dependency (the ``train`` extra): without it ``write_plots`` raises
``PlotsUnavailable`` (an ``ImportError``) with a one-line message, which ``riemix inspect`` prints instead of
a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from riemix.diagnostics.rundir import layer_rows, most_similar_layer, short_names
from riemix.io.fileio import atomic_write

__all__ = ["MATPLOTLIB_MISSING", "REGULARIZER_KEYS", "PlotsUnavailable", "write_plots"]

REGULARIZER_KEYS = ("load_balance", "z_loss", "uniform_prior", "diversity", "orthogonality")

#: What ``riemix inspect`` prints when matplotlib is not installed.
MATPLOTLIB_MISSING = "plots skipped: matplotlib is not installed (pip install matplotlib)"


class PlotsUnavailable(ImportError):
    """matplotlib cannot be imported; the message says so in one line (``MATPLOTLIB_MISSING``)."""


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        if exc.name == "matplotlib":  # the package itself is missing (not one of its parts or dependencies)
            raise PlotsUnavailable(MATPLOTLIB_MISSING, name="matplotlib") from exc
        raise PlotsUnavailable(f"plots skipped: matplotlib cannot be imported ({exc})", name=exc.name) from exc


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

    Args:
        run: ``riemix.diagnostics.rundir.load_run(...)``.
        out_dir: directory for the PNG files (created if needed).
        layer: layer of the similarity plot (default: the one with the most similar experts).

    Raises:
        ValueError: ``layer`` is not one of the run's layers.
        PlotsUnavailable: matplotlib cannot be imported (nothing is written).
    """
    out = Path(out_dir)
    rows = layer_rows(run)
    names = [r["name"] for r in rows]
    if layer is not None and layer not in names:
        raise ValueError(f"--layer {layer!r} is not a layer of this run; layers: {names[:8]}"
                         + (" ..." if len(names) > 8 else ""))
    _require_matplotlib()
    short = short_names(names)
    for r in rows:
        routing = (run["diagnostics"] or {}).get("layers", {}).get(r["name"], {})
        r["dead_idx"] = routing.get("dead_experts", [])
    top = most_similar_layer(rows)
    chosen = layer or (top["name"] if top else None)
    written = [
        _plot_usage(rows, short, out / "usage_heatmap.png"),
        _plot_curves(run["metrics"], out / "curves.png"),
        _plot_erank(rows, run, short, out / "effective_rank.png"),
    ]
    if chosen:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in chosen)
        written.append(_plot_similarity(run, chosen, out / f"similarity_{safe}.png"))
    return [p for p in written if p is not None]
