"""``riemix check-init MODEL_OR_RUN``: does an adapter initialisation change the base model's outputs?

Prints the mean KL(base ‖ adapted) of the next-token distributions, both perplexities and the greedy
generations side by side (``riemix.diagnostics.check_init``); exits 1 with a warning when the KL exceeds
``--threshold``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from riemix.cli.flags import ADAPTER_OPTIONS, add_adapter_options, add_options, function_options, given_values
from riemix.diagnostics.check_init import DTYPES, check_init
from riemix.hub.quantize import QUANTIZATIONS
from riemix.io.fileio import atomic_write_json

__all__ = ["DESCRIPTION", "HELP", "NAME", "OPTIONS", "add_arguments", "report", "run"]

NAME = "check-init"
HELP = "compare a model with and without freshly initialised adapters (KL, perplexity, generations)"
DESCRIPTION = (
    "Compare the adapted and base models on sample text; exit 1 when the mean KL of the next-token "
    "distributions exceeds --threshold. MODEL_OR_RUN is a model name/directory (adapter options from the "
    "flags) or a run directory with config.yaml (its model, adapter options and seed; flags override; "
    "--trained uses its trained adapter instead of a fresh init)."
)

#: The options: the parameters of ``check_init`` but the adapter fields (their own group) and the texts.
OPTIONS = function_options(check_init, skip=("adapter", "texts"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``check-init`` to its parser."""
    add_options(parser, OPTIONS, choices={"dtype": DTYPES, "quantization": QUANTIZATIONS})
    parser.add_argument("--text-file", help="sample text, one example per non-empty line")
    parser.add_argument("--output", help="also write the results as JSON to this file")
    add_adapter_options(parser)


def report(res: dict[str, Any]) -> str:
    """The result of ``check_init`` as the lines the command prints."""
    lines = [
        f"check-init: {res['what']}",
        f"  mean KL(base || adapted) = {res['kl_mean']:.3e} nats/token (max {res['kl_max']:.3e}, "
        f"{res['positions']} positions; threshold {res['threshold']:g})",
        f"  perplexity: base {res['ppl_base']:.4f}, adapted {res['ppl_adapted']:.4f}",
    ]
    for g in res["generations"]:
        mark = "=" if g["identical"] else "≠"
        lines.append(f"  [{mark}] {g['prompt'][:60]!r}\n      base:    {g['base']!r}\n      adapted: {g['adapted']!r}")
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    """Compare, print the report (and write ``--output``); returns 0, or 1 when the KL is too large."""
    texts = None
    if ns.text_file:
        texts = [ln for ln in Path(ns.text_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    adapter = given_values(ns, ADAPTER_OPTIONS)
    res = check_init(**given_values(ns, OPTIONS), adapter=adapter, texts=texts)
    print(report(res))
    if ns.output:
        atomic_write_json(ns.output, res)
    if not res["ok"]:
        print(
            f"riemix check-init: warning: mean KL {res['kl_mean']:.3e} exceeds {res['threshold']:g}; this "
            "initialisation changes the base model's outputs (use an output-preserving init or "
            "scale_warmup_steps)",
            file=sys.stderr,
        )
        return 1
    return 0
