"""``riemix generate``: continue a prompt with a model and its adapter, streamed to stdout (``riemix.ship.generation``).

Only the generated text goes to stdout (a newline ends it), so the output can be piped; everything else
(load reports, warnings) goes to stderr.  The prompt is ``--prompt`` or, without it, stdin.
"""

from __future__ import annotations

import argparse
import sys

from riemix.cli.flags import add_options, function_options, given_values
from riemix.hub.quantize import QUANTIZATIONS
from riemix.ship.generation import generate
from riemix.ship.loading import DTYPES

__all__ = ["DESCRIPTION", "HELP", "NAME", "OPTIONS", "add_arguments", "read_prompt", "run"]

NAME = "generate"
HELP = "generate text with a model and adapter, streamed to stdout"
DESCRIPTION = (
    "Load --model (and --adapter: an adapter directory or a run directory, whose config.yaml names the model), "
    "apply the tokenizer's chat template when it has one, and stream the new tokens to stdout. The prompt is "
    "--prompt or stdin. --temperature 0 (the default) decodes greedily."
)

#: The options: the parameters of ``generate`` but the prompt (``--prompt`` or stdin) and the stream.
OPTIONS = function_options(generate, skip=("prompt", "stream"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``generate`` to its parser."""
    parser.add_argument("--prompt", help="the prompt (default: read from stdin)")
    add_options(parser, OPTIONS, choices={"dtype": DTYPES, "quantization": QUANTIZATIONS})


def read_prompt(prompt: str | None) -> str:
    """``--prompt``, or stdin when it is not a terminal.

    Raises:
        ValueError: no ``--prompt`` and stdin is a terminal, or the prompt read is empty.
    """
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompt: give --prompt TEXT or pipe the prompt on stdin")
        prompt = sys.stdin.read().rstrip("\r\n")
    if not prompt.strip():
        raise ValueError("the prompt is empty (--prompt or stdin)")
    return prompt


def run(ns: argparse.Namespace) -> int:
    """Stream the generated text to stdout; returns 0."""
    generate(read_prompt(ns.prompt), **given_values(ns, OPTIONS), stream=sys.stdout)
    return 0
