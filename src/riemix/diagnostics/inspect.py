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
from riemix.diagnostics.plots import PlotsUnavailable, write_plots
from riemix.diagnostics.rundir import (
    adapter_diagnostics,
    collapsed_layers,
    layer_rows,
    least_balanced_layer,
    load_run,
    most_similar_layer,
    short_names,
    untrained_experts,
)

__all__ = ["load_run", "adapter_diagnostics", "format_tables", "write_plots", "inspect_run"]

#: At most this many layers are listed by name in the never-trained-experts line.
MAX_LISTED_LAYERS = 8

#: ``(header, width, row key, format)`` of the table's columns; the routing ones need diagnostics.json.
_ROUTING_COLUMNS = (("entropy", 8, "entropy", "8.4f"), ("usage_H", 8, "usage_entropy", "8.4f"),
                    ("log E", 6, "log_e", "6.3f"), ("load_cv", 8, "load_cv", "8.4f"), ("dead", 5, "dead", "d"))
_WEIGHT_COLUMNS = (("sim>thr", 7, "similar_pairs", "d"), ("max_sim", 8, "max_similarity", "8.4f"),
                   ("erank", 6, "erank", "6.3f"))
_GRAD_COLUMN = (("grad", 9, "grad_norm", "9.3e"),)
_UNTRAINED_COLUMN = (("B=0", 4, "untrained_count", "d"),)


def _table(rows: list[dict[str, Any]], short: dict[str, str], routed: bool) -> list[str]:
    columns = (_ROUTING_COLUMNS if routed else ()) + _WEIGHT_COLUMNS
    columns += _GRAD_COLUMN if any(r["grad_norm"] is not None for r in rows) else ()
    columns += _UNTRAINED_COLUMN
    width = max([len(s) for s in short.values()] + [5])
    head = f"{'layer':<{width}} {'E':>3} " + " ".join(f"{h:>{w}}" for h, w, _, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        values = {**r, "log_e": math.log(r["experts"]) if r["experts"] else None,
                  "untrained_count": None if r["untrained"] is None else len(r["untrained"])}
        cells = [format(values[k], fmt) if values[k] is not None else "-" for _, _, k, fmt in columns]
        lines.append(f"{short[r['name']]:<{width}} {r['experts']:>3} "
                     + " ".join(f"{c:>{w}}" for c, (_, w, _, _) in zip(cells, columns, strict=True)))
    return lines


def _collapse_line(rows: list[dict[str, Any]], short: dict[str, str], threshold: float) -> str | None:
    top = most_similar_layer(rows)
    if top is None:
        return None
    hits = collapsed_layers(rows, threshold)
    if not hits:
        return (f"  no collapsed layer (highest expert similarity {top['max_similarity']:.4f} < {threshold:g} "
                f"threshold, in {short[top['name']]})")
    return (f"  collapsed layers (two experts' BA similarity > {threshold:g}): {len(hits)} of {len(rows)}; "
            f"most collapsed layer: {top['name']} (similarity {top['max_similarity']:.4f})")


def _untrained_line(rows: list[dict[str, Any]], short: dict[str, str]) -> str | None:
    if all(r["untrained"] is None for r in rows):
        return None
    pairs = untrained_experts(rows)
    total = sum(r["experts"] for r in rows)
    if not pairs:
        return f"  never-trained experts (B still all zero): none of {total}"
    by_layer: dict[str, list[int]] = {}
    for name, expert in pairs:
        by_layer.setdefault(name, []).append(expert)
    listed = [f"{short[name]}: {', '.join(map(str, experts))}" for name, experts in by_layer.items()]
    more = len(listed) - MAX_LISTED_LAYERS
    shown = "; ".join(listed[:MAX_LISTED_LAYERS]) + (f"; ... ({more} more layers)" if more > 0 else "")
    return f"  never-trained experts (B still all zero): {len(pairs)} of {total} ({shown})"


def format_tables(run: dict) -> str:
    """The per-layer table and the overall summary of ``load_run(...)`` as text.

    Without ``diagnostics.json`` the routing columns are left out and the text says so; a layer is called
    collapsed only when two of its experts are more similar than ``run["threshold"]``.
    """
    rows = layer_rows(run)
    threshold = run.get("threshold", SIMILARITY_THRESHOLD)
    diag = run["diagnostics"] or {}
    routed = bool(diag.get("layers"))
    short = short_names([r["name"] for r in rows])
    lines = []
    if not rows:
        lines += [f"no per-layer data: {run['run_dir']} has neither diagnostics.json nor adapter/", ""]
    else:
        if not routed:
            lines += [f"no routing data: {run['run_dir']} has no diagnostics.json (train with --diagnostics-every "
                      "N to record gate entropy, expert usage, load and dead experts); weight numbers from "
                      "adapter/ only", ""]
        lines += _table(rows, short, routed) + [""]
    if routed:
        lines.append(f"overall (routing window ending at step {diag.get('step')})")
    else:
        lines.append("overall (adapter weights only, no routing data)" if rows else "overall")
    lines.append(f"  layers {len(rows)}, experts {sum(r['experts'] for r in rows)}")
    overall = diag.get("overall", {})
    if routed and overall.get("entropy") is not None:
        lines.append(f"  mean gate entropy {overall['entropy']:.4f}, mean usage entropy "
                     f"{overall['usage_entropy']:.4f} (max {overall.get('max_entropy', 0.0):.4f}), "
                     f"mean load CV {overall['load_cv']:.4f}, dead experts {overall.get('dead_experts', 0)}")
    sims = [r["similar_pairs"] for r in rows if r["similar_pairs"] is not None]
    eranks = [r["erank"] for r in rows if r["erank"] is not None]
    if sims:
        lines.append(f"  expert pairs with BA similarity > {threshold:g}: {sum(sims)}; "
                     f"mean effective rank {sum(eranks) / len(eranks):.3f}")
    for line in (_collapse_line(rows, short, threshold), _untrained_line(rows, short)):
        if line:
            lines.append(line)
    low = least_balanced_layer(rows)
    if low is not None:
        lines.append(f"  least balanced routing: {short[low['name']]} (usage entropy {low['usage_entropy']:.4f} "
                     f"of log E {math.log(low['experts']):.4f})")
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
        layer: Layer for the similarity plot (default: the one with the most similar experts).
        threshold: Cosine similarity above which two experts count as similar (and their layer as
            collapsed), in [-1, 1].
        plots: Write the PNG plots (``--no-plots``: print the tables only).

    Returns:
        ``{"text": tables, "plots": [paths], "plots_skipped": None or why no plot was written (matplotlib
        missing), "run": load_run(...)}``.

    Raises:
        ValueError: see ``load_run`` and ``write_plots``; a threshold outside [-1, 1].
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [-1, 1], got {threshold!r}")
    run = load_run(run_dir, threshold)
    text = format_tables(run)
    paths: list[Path] = []
    skipped = None
    if plots:
        try:
            paths = write_plots(run, out_dir or Path(run_dir) / "plots", layer)
        except PlotsUnavailable as exc:
            skipped = str(exc)
    return {"text": text, "plots": paths, "plots_skipped": skipped, "run": run}
