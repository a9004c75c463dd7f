"""Shared pieces of the benchmark scripts: the record header (date, machine) every result JSON carries."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any

import torch

__all__ = ["pct", "record_header"]


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


def pct(entry: dict[str, Any], point: str) -> str:
    """``entry[point]`` as a percentage with ``± entry[point + "_std"]`` when there is one; "-" if absent."""
    if point not in entry:
        return "-"
    std = entry.get(f"{point}_std")
    return f"{100 * entry[point]:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
