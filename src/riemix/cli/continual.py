"""``riemix continual``: train a task stream with dynamic experts (``riemix.continual.run.run_continual``).

Every ``ContinualConfig`` field is a flag, and so is every ``MoELoRAConfig`` field of its ``adapter``
(over the continual default: one expert of rank 8, top-1, maturity after 20 steps). ``--resume`` without
``--config`` starts from the run's saved ``config.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from riemix.cli.flags import ADAPTER_OPTIONS, add_adapter_options, add_options, dataclass_options, given_values
from riemix.continual.config import ContinualConfig, default_adapter
from riemix.continual.report import format_continual
from riemix.continual.run import run_continual
from riemix.training.config import read_yaml_options

__all__ = ["DESCRIPTION", "HELP", "NAME", "OPTIONS", "add_arguments", "run"]

NAME = "continual"
HELP = "train a stream of tasks one after another, growing and freezing experts (continual learning)"
DESCRIPTION = (
    "Train the tasks of --stream one after another: detect new skills, grow experts for them, route densely "
    "while they mature, freeze the other skills' experts, replay exemplars; after each task evaluate every task "
    "seen and the next one (accuracy matrix, Avg, BWT, FWT). See docs/continual.md."
)

#: The run options: every ``ContinualConfig`` field but ``adapter``.
OPTIONS = dataclass_options(ContinualConfig, skip=("adapter",))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``continual`` to its parser."""
    parser.add_argument("--config", help="YAML file of options (keys = flag names with underscores)")
    add_options(parser.add_argument_group("stream, experts and training"), OPTIONS)
    add_adapter_options(parser)


def _from_yaml(path: Path) -> dict:
    return read_yaml_options(path, ContinualConfig)


def build_config(ns: argparse.Namespace) -> ContinualConfig:
    """The configuration: ``--config`` (or, for ``--resume``, the run's saved config.yaml), then the flags."""
    opts = given_values(ns, OPTIONS)
    saved = Path(opts.get("output_dir", ContinualConfig.output_dir)) / "config.yaml"
    data = _from_yaml(Path(ns.config)) if ns.config else {}
    if not ns.config and opts.get("resume") and saved.is_file():
        data = _from_yaml(saved)
    adapter = {**default_adapter().to_dict(), **data.get("adapter", {}), **given_values(ns, ADAPTER_OPTIONS)}
    merged = {**data, **opts, "adapter": adapter}
    unknown = sorted(set(merged) - set(ContinualConfig.field_names()))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {ContinualConfig.field_names()}")
    return ContinualConfig(**merged)


def run(ns: argparse.Namespace) -> int:
    """Train the stream, print the tables; returns 0."""
    cfg = build_config(ns)
    results = run_continual(cfg)
    print(format_continual(results))
    print(f"run directory: {cfg.output_dir}")
    return 0
