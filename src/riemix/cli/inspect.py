"""``riemix inspect RUN_DIR``: routing and expert diagnostics of a run (``riemix.diagnostics.inspect``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from riemix.cli.flags import add_options, function_options, given_values
from riemix.continual.report import format_continual
from riemix.diagnostics.inspect import inspect_run

__all__ = ["DESCRIPTION", "HELP", "NAME", "OPTIONS", "add_arguments", "run"]

NAME = "inspect"
HELP = "routing / expert diagnostics of a run: tables and PNG plots"
DESCRIPTION = (
    "Print per-layer routing entropy, usage, load CV, dead experts, expert similarity and effective rank of a "
    "run directory, and write PNG plots (see docs/diagnostics.md)."
)

#: The options: the parameters of ``inspect_run``.
OPTIONS = function_options(inspect_run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``inspect`` to its parser."""
    add_options(parser, OPTIONS, rename={"out_dir": "out"})


def run(ns: argparse.Namespace) -> int:
    """Print the tables and the paths of the plots written (or why none was); returns 0."""
    result = inspect_run(**given_values(ns, OPTIONS))
    print(result["text"])
    results = Path(ns.run_dir) / "results.json"
    if results.is_file():  # a continual run: its matrix, decisions and per-skill expert usage
        print()
        print(format_continual(json.loads(results.read_text(encoding="utf-8"))))
    for path in result["plots"]:
        print(f"wrote {path}")
    if result["plots_skipped"]:
        print(result["plots_skipped"])
    return 0
