"""PNG plots of a continual run: the accuracy matrix, and which expert serves which skill.

``accuracy_matrix.png``: R[k][i], the accuracy on task i (columns) after training task k (rows), with the
untrained model as the first row.  ``skill_experts.png``: per skill (rows), the share of its tokens each
expert index takes, averaged over the layers.  matplotlib is optional (``PlotsUnavailable`` without it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from riemix.diagnostics.plots import _require_matplotlib, _save

__all__ = ["accuracy_heatmap", "skill_usage_matrix", "write_continual_plots"]


def skill_usage_matrix(usage: dict[str, dict[str, list[float]]]) -> tuple[list[str], list[list[float]]]:
    """``(skills, rows)``: each skill's mean gate per expert index over the layers (0 where a layer has fewer)."""
    skills = list(usage)
    width = max((len(v) for per_layer in usage.values() for v in per_layer.values()), default=0)
    rows = []
    for skill in skills:
        per_layer = list(usage[skill].values())
        rows.append(
            [sum(v[e] if e < len(v) else 0.0 for v in per_layer) / max(len(per_layer), 1) for e in range(width)]
        )
    return skills, rows


def accuracy_heatmap(
    values: list[list[float | None]], rows: list[str], cols: list[str], title: str, xlabel: str, path: Path
) -> Path:
    """A heatmap of values in [0, 1] (None: blank), each cell labelled, written atomically to ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.55 * len(rows)))
    ax = fig.add_subplot()
    shown = [[float("nan") if v is None else v for v in row] for row in values]
    image = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            if v is not None:
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def write_continual_plots(results: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write the plots of a run's results.json content into ``out_dir``; returns the files written.

    Raises:
        riemix.diagnostics.plots.PlotsUnavailable: matplotlib cannot be imported.
    """
    _require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream = results["stream"]
    written = []
    if results.get("matrix"):
        rows = [results["zero_shot"]] + results["matrix"]
        names = ["untrained"] + [f"after {t}" for t in stream[: len(results["matrix"])]]
        written.append(
            accuracy_heatmap(rows, names, stream, "accuracy R[k][i]", "evaluated task", out / "accuracy_matrix.png")
        )
    if results.get("usage"):
        skills, usage = skill_usage_matrix(results["usage"])
        cols = [str(e) for e in range(len(usage[0]))] if usage else []
        written.append(
            accuracy_heatmap(
                usage,
                skills,
                cols,
                "share of each task's tokens per expert (mean over layers)",
                "expert",
                out / "skill_experts.png",
            )
        )
    return written
