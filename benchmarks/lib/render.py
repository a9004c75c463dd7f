"""What the report's sections share: loading a result JSON, Markdown tables, bar plots, the machine line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lib.harness import RESULTS
from riemix.io.fileio import atomic_write

__all__ = ["DOC", "IMG", "ROOT", "bar", "load", "machine", "table"]

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"


def load(name: str) -> dict | None:
    """The result JSON ``benchmarks/results/<name>`` (a relative path), or None when it is absent."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def bar(path: Path, labels: list[str], values: list[float], title: str, xlabel: str) -> None:
    """A horizontal bar plot of ``values``, written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(labels)))
    ax.barh(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center")
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def table(header: list[str], rows: Iterable[Iterable[str]], left: int = 1) -> list[str]:
    """A Markdown table's lines: the first ``left`` columns left-aligned, the others right-aligned (numbers)."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * left + "---:|" * (len(header) - left),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def machine(rec: dict) -> str:
    """``date, platform, threads, torch`` of a result, plus its GPU when it ran on one."""
    m = rec["machine"]
    gpu = f", {rec['device']}" if rec.get("device", "cpu") != "cpu" else ""
    return f"{rec['date'][:10]}, {m['platform']}, {m['cpu_threads']} threads, torch {m['torch']}{gpu}"
