"""``riemix export RUN_DIR|ADAPTER_DIR --out DIR``: a directory transformers serves alone (``riemix.ship.export``)."""

from __future__ import annotations

import argparse
import sys

from riemix.cli.flags import add_options, function_options, given_values
from riemix.ship.export import EXPORT_ROUTING_MODES, export_model
from riemix.ship.loading import DTYPES

__all__ = ["DESCRIPTION", "HELP", "NAME", "OPTIONS", "add_arguments", "run"]

NAME = "export"
HELP = "write a run's model + adapter as a directory AutoModelForCausalLM loads without riemix"
DESCRIPTION = (
    "Export a run directory (base model from its config.yaml) or an adapter directory (--model needed) as a "
    "self-contained directory: base config and weights, adapter tensors, a small modeling_riemix.py and the "
    "tokenizer. Load it with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); with "
    f"--merge it is a plain model (no remote code). Routing modes: {', '.join(EXPORT_ROUTING_MODES)}."
)

#: The options: the parameters of ``export_model`` but the source, the output directory and the tokenizer.
OPTIONS = function_options(export_model, skip=("model_or_path", "out", "tokenizer"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``export`` to its parser."""
    parser.add_argument("source", metavar="RUN_DIR|ADAPTER_DIR", help="a run directory or an adapter directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="the export directory (new or empty)")
    add_options(parser, OPTIONS, rename={"base_model": "model"}, choices={"dtype": DTYPES})


def run(ns: argparse.Namespace) -> int:
    """Export, then print the export directory and how to load it; returns 0."""
    out = export_model(ns.source, ns.out, **given_values(ns, OPTIONS))
    remote = "" if getattr(ns, "merge", False) else ", trust_remote_code=True"
    print(f"exported {ns.source} to {out}", file=sys.stderr)
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")
    return 0
