"""What every benchmark script shares: its parser, interleaved timing, and where its result JSON goes."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from riemix.io.fileio import atomic_write_text

__all__ = [
    "RESULTS",
    "interleaved_times",
    "record_header",
    "rotated",
    "script_parser",
    "speed_record",
    "write_json",
    "write_record",
]

#: The folder of the result JSON files (``benchmarks/results``).
RESULTS = Path(__file__).resolve().parent.parent / "results"


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser of a benchmark script: its module docstring, line breaks kept, as the ``--help`` text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def rotated(names: Sequence[str], k: int) -> list[str]:
    """``names`` rotated left by ``k`` (modulo its length): the order of interleaved round ``k``."""
    k %= len(names)
    return [*names[k:], *names[:k]]


def interleaved_times(
    names: Sequence[str],
    run: Callable[[str, int], Any],
    rounds: Iterable[int],
    warmup: int = 2,
    prepare: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of ``run(name, round)`` for every candidate, interleaved so noise hits all alike.

    First each candidate runs ``warmup`` times with round 0, untimed; then, for each ``round`` in
    ``rounds``, every candidate runs once, in the order ``rotated(names, round)``, timed with
    ``time.perf_counter``. ``prepare(name)``, when given, runs untimed before every call (warm-up
    included), e.g. to reset gradients.

    Returns:
        ``name -> [seconds of each timed round]``, in the order of ``names``.
    """
    for name in names:
        for _ in range(warmup):
            if prepare is not None:
                prepare(name)
            run(name, 0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rnd in rounds:
        for name in rotated(names, rnd):
            if prepare is not None:
                prepare(name)
            t0 = time.perf_counter()
            run(name, rnd)
            times[name].append(time.perf_counter() - t0)
    return times


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


def speed_record(
    benchmark: str, args: argparse.Namespace, times: dict[str, list[float]], med: dict[str, float], ratios: dict
) -> dict[str, Any]:
    """The result JSON of a side-by-side speed benchmark (``layer_speed``, ``optimizer_speed``).

    Keys: the :func:`record_header`, ``args`` (the command line), ``median_seconds`` (``med``),
    ``all_seconds`` (every timed round, ``times``) and ``ratios``.
    """
    return {
        **record_header(benchmark),
        "args": vars(args),
        "median_seconds": med,
        "all_seconds": times,
        "ratios": ratios,
    }


def write_json(path: str | Path, record: Any) -> None:
    """Write ``record`` to ``path`` atomically as indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def write_record(
    record: dict[str, Any], name: str, quick: bool = False, out: str | Path | None = None, tail: str = ""
) -> Path:
    """Write a benchmark's result JSON to ``out`` or ``results/<name>[_quick]<tail>.json``; print where.

    Args:
        record: the result (usually ``{**record_header(name), ...}``).
        name: the benchmark's name, the file's stem.
        quick: a ``--quick`` smoke run (``_quick`` is added, so it never replaces a full result).
        out: an explicit path (``--out``), used as given.
        tail: what follows ``[_quick]`` in the default file name (e.g. ``"_float32"``).

    Returns:
        The path written.
    """
    path = Path(out) if out else RESULTS / f"{name}{'_quick' if quick else ''}{tail}.json"
    write_json(path, record)
    print(f"wrote {path}")
    return path
