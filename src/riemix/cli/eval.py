"""``riemix eval``: evaluate a model, optionally with an adapter, on a dataset (``riemix.evaluate``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from riemix.cli.flags import add_options, function_options, given_values
from riemix.evaluate import evaluate_model
from riemix.io.fileio import atomic_write_json

__all__ = ["DESCRIPTION", "HELP", "NAME", "OPTIONS", "add_arguments", "check_output", "run"]

NAME = "eval"
HELP = "evaluate a model (optionally with an adapter) on a dataset"
DESCRIPTION = "Evaluate a model, optionally with an adapter, on a dataset; print the metrics as JSON."

#: The options: the parameters of ``evaluate_model``.
OPTIONS = function_options(evaluate_model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``eval`` to its parser."""
    add_options(parser, OPTIONS)
    parser.add_argument("--output", help="write the metrics as JSON to this file")


def check_output(path: str) -> None:
    """Refuse an ``--output`` path no JSON file can be written to (checked before the model loads).

    Args:
        path: the ``--output`` value.

    Raises:
        ValueError: ``path`` is an existing directory, or one of its parents exists but is not a directory.
    """
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{path}: --output is a directory; give the path of a JSON file")
    existing = next((parent for parent in out.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{path}: --output cannot be written: {existing} is a file, not a directory")


def run(ns: argparse.Namespace) -> int:
    """Print the metrics (and write them to ``--output``); returns 0.

    Raises:
        ValueError: an ``--output`` path that cannot be written (``check_output``), before any loading.
    """
    if ns.output:
        check_output(ns.output)
    result = evaluate_model(**given_values(ns, OPTIONS))
    print(json.dumps(result, indent=2))
    if ns.output:
        atomic_write_json(ns.output, result)
    return 0
