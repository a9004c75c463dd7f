"""The ``riemix`` command line: one module per subcommand, every option generated from the fields or
parameters it sets (``riemix.cli.flags``).

riemix train                                  # the default job (SmolLM2-135M on SST-2)
riemix train --config configs/paper.yaml --lr 2e-5 --output-dir runs/x
riemix train --output-dir runs/x --resume     # continue that run from its newest intact checkpoint
riemix continual --stream dbpedia,amazon,agnews --data-dir cl_benchmark   # continual learning
riemix eval --model smollm2-135m --adapter runs/x/adapter --dataset glue/sst2
riemix inspect runs/x                         # routing/expert diagnostics: tables + plots
riemix check-init smollm2-135m --init pissa   # does the adapter init change the model's outputs?
riemix data --check ~/data                    # which built-in datasets a --data-dir folder can serve

Each subcommand module has ``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(namespace) -> exit status``.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import shutil
import sys
from pathlib import Path

from riemix.cli import check_init as check_init_command
from riemix.cli import continual as continual_command
from riemix.cli import data as data_command
from riemix.cli import eval as eval_command
from riemix.cli import export as export_command
from riemix.cli import generate as generate_command
from riemix.cli import inspect as inspect_command
from riemix.cli import train as train_command
from riemix.data import DataError
from riemix.hub import ModelLoadError
from riemix.io.adapter import AdapterError
from riemix.training.guard import TrainingDiverged, TrainingInterrupted

__all__ = ["build_parser", "main"]

#: The subcommand modules, in the order ``--help`` lists them.
COMMANDS = (
    train_command,
    continual_command,
    eval_command,
    inspect_command,
    check_init_command,
    data_command,
    export_command,
    generate_command,
)
#: Exceptions that mean bad input: reported in one line, exit status 2.
INPUT_ERRORS = (ValueError, DataError, AdapterError, ModelLoadError, FileNotFoundError)
#: File-system failures reported in one line (exit status 2) instead of a traceback.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)


def _describe_os_error(exc: OSError) -> str:
    """``cannot write <file>: No space left on device (12.0 MiB free on <dir>)``."""
    where = Path(exc.filename) if exc.filename else None
    text = f"cannot write {where}: {exc.strerror}" if where else f"{exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and where is not None:
        folder = next((p for p in [where, *where.parents] if p.exists()), None)
        if folder is not None:
            text += f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free on {folder})"
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``riemix`` argument parser (subcommands ``train``, ``eval``, ``inspect``, ``check-init``, ``data``)."""
    parser = argparse.ArgumentParser(
        prog="riemix",
        description="MoE-LoRA fine-tuning with gate-rescaled Riemannian preconditioned optimizers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        sub_parser = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(handler=command.run, parser=sub_parser)
    return parser


def _unknown_arguments(sub_parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """Report arguments the subcommand does not know with its own usage and a "did you mean" (exits 2)."""
    known = [opt for action in sub_parser._actions for opt in action.option_strings if opt.startswith("--")]
    hints = []
    for arg in extra:
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=2, cutoff=0.75) if flag.startswith("-") else []
        if close:
            hints.append(f"{flag}: did you mean {' or '.join(close)}?")
    sub_parser.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``riemix`` command; returns the exit status (2 on bad input).

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
    """
    ns, extra = build_parser().parse_known_args(argv)
    if extra:
        _unknown_arguments(ns.parser, extra)
    try:
        return ns.handler(ns)
    except TrainingDiverged as exc:  # nothing non-finite was saved: the last checkpoint and adapter are good
        print(f"riemix {ns.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingInterrupted as exc:  # a checkpoint of the last step was written
        print(f"riemix {ns.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except INPUT_ERRORS as exc:
        print(f"riemix {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        print(f"riemix {ns.command}: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 2
