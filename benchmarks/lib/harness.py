"""Where benchmark results go and what every result JSON carries."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from riemix.io.fileio import atomic_write_text

__all__ = ["RESULTS", "record_header", "write_json", "write_record"]

#: The folder of the result JSON files (``benchmarks/results``).
RESULTS = Path(__file__).resolve().parent.parent / "results"


def record_header(benchmark: str) -> dict[str, Any]:
    """``{"benchmark", "date", "machine"}`` for a result JSON (UTC date; platform, threads, torch)."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }


def write_json(path: str | Path, record: Any) -> None:
    """Write ``record`` to ``path`` atomically as indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def write_record(record: dict[str, Any], name: str, quick: bool = False, out: str | Path | None = None) -> Path:
    """Write a benchmark's result JSON to ``out`` or ``results/<name>[_quick].json``; print where.

    Returns:
        The path written.
    """
    path = Path(out) if out else RESULTS / f"{name}{'_quick' if quick else ''}.json"
    write_json(path, record)
    print(f"wrote {path}")
    return path
