"""``riemix train``: train MoE-LoRA adapters (``riemix.training.recipe.train``).

Every ``TrainConfig`` field is a flag, and so is every ``MoELoRAConfig`` field of its ``adapter``
(``--rank 8``, ``--experts 4``). Flags override the YAML file of ``--config``; the options not given keep
the file's value, else the default.  ``--resume`` without ``--config`` starts from the run's saved
``config.yaml`` (so ``riemix train --output-dir runs/x --resume`` continues that run as it was).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from riemix.cli.flags import ADAPTER_OPTIONS, add_adapter_options, add_options, dataclass_options, given_values
from riemix.training.config import TrainConfig
from riemix.training.recipe import train

__all__ = ["DESCRIPTION", "GROUPS", "HELP", "NAME", "OPTIONS", "add_arguments", "run"]

NAME = "train"
HELP = "train MoE-LoRA adapters (no arguments: the default job)"
DESCRIPTION = "Train MoE-LoRA adapters. Options come from --config (YAML) and flags; flags override the file."

#: The run options: every ``TrainConfig`` field but ``adapter``.
OPTIONS = dataclass_options(TrainConfig, skip=("adapter",))
#: Argument groups of ``--help``: the first field of each group (fields keep their declaration order).
GROUPS = {
    "model": "model and data",
    "optimizer": "optimizer",
    "batch_size": "batches, schedule and evaluation",
    "load_balance_coef": "regularisers and diagnostics",
    "seed": "run directory, checkpoints and logging",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``train`` to its parser."""
    parser.add_argument("--config", help="YAML file of options (keys = flag names with underscores)")
    group = None
    for opt in OPTIONS:
        if group is None or opt.name in GROUPS:
            group = parser.add_argument_group(GROUPS.get(opt.name, "options"))
        add_options(group, [opt])
    add_adapter_options(parser)


def run(ns: argparse.Namespace) -> int:
    """Build the ``TrainConfig`` (``--config`` file or, for ``--resume``, the run's saved config; then the
    flags given) and train; returns 0."""
    opts = given_values(ns, OPTIONS)
    adapter = given_values(ns, ADAPTER_OPTIONS)
    if adapter:
        opts["adapter"] = adapter
    saved = Path(opts.get("output_dir", TrainConfig.output_dir)) / "config.yaml"
    if ns.config:
        cfg = TrainConfig.from_yaml(ns.config, opts)
    elif opts.get("resume") and saved.is_file():  # continue the run as it was; flags may change safe fields
        cfg = TrainConfig.from_yaml(saved, opts)
    else:
        cfg = TrainConfig.from_dict(opts, source="command line")
    try:
        train(cfg)
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave a multi-process run together: wait for every process, then close the process group.

    Without it the first process to exit can tear the group's connections down while another is still
    finishing, and that one aborts (gloo) instead of exiting 0.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a failed peer: the error that got us here is the one to report
            dist.barrier()
        dist.destroy_process_group()
