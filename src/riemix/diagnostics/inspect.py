"""``riemix inspect RUN_DIR``: tables and plots of a run's routing and expert diagnostics.

Reads, from a run directory written by ``riemix train`` (``riemix.diagnostics.rundir``):

- ``metrics.jsonl``: loss, regulariser and evaluation curves, and (with ``diagnostics_every``) the
  compact diagnostics lines;
- ``diagnostics.json``: the latest full routing window (usage per expert, entropies, dead experts);
- ``adapter/``: the saved A and B tensors, from which expert similarity and effective rank are
  recomputed (no base model is loaded).

Formats a per-layer table and an overall summary (``format_tables``) and writes PNG plots to
``RUN_DIR/plots/`` or ``out_dir`` (``riemix.diagnostics.plots``). See docs/diagnostics.md.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from riemix.diagnostics.monitor import SIMILARITY_THRESHOLD
from riemix.diagnostics.plots import write_plots
from riemix.diagnostics.rundir import adapter_diagnostics, layer_rows, load_run, most_collapsed, short_names

__all__ = ["load_run", "adapter_diagnostics", "format_tables", "write_plots", "inspect_run"]


def format_tables(run: dict) -> str:
    """The per-layer table and the overall summary as text."""
    rows = layer_rows(run)
    short = short_names([r["name"] for r in rows])
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
    collapsed = most_collapsed(rows)
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


def inspect_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    layer: str | None = None,
    threshold: float = SIMILARITY_THRESHOLD,
    plots: bool = True,
) -> dict[str, Any]:
    """Load a run, format its tables and write its plots.

    Args:
        run_dir: Run directory written by riemix train.
        out_dir: Directory for the plots (default: RUN_DIR/plots).
        layer: Layer for the similarity plot (default: the most collapsed one).
        threshold: Cosine similarity above which two experts count as similar, in [-1, 1].
        plots: Write the PNG plots (``--no-plots``: print the tables only).

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
