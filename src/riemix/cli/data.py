"""``riemix data``: the ``--data-dir`` layout with public sources and licences, or a check of a folder."""

from __future__ import annotations

import argparse

from riemix.data.catalog import check_data_dir, describe_layout

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "run"]

NAME = "data"
HELP = "the built-in datasets' --data-dir layout, sources and licences; --check a folder"
DESCRIPTION = (
    "Without options: print which files each built-in dataset reads from a data folder, where public copies "
    "are, and their licences. With --check DIR: load every dataset from DIR and report ok / missing / "
    "malformed (exit 1 when a dataset present is malformed)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``data`` to its parser."""
    parser.add_argument("--check", metavar="DIR", help="a data folder to check (as given to --data-dir)")


def run(ns: argparse.Namespace) -> int:
    """Print the layout, or the check of ``--check`` (0; 1 when a file present fails to load)."""
    if not ns.check:
        print(describe_layout())
        return 0
    checks = check_data_dir(ns.check)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.name:<{width}}  {c.status:<9}  {c.detail}")
    ok = sum(c.status == "ok" for c in checks)
    print(f"{ok} of {len(checks)} datasets usable from {ns.check}")
    return 1 if any(c.status == "malformed" for c in checks) else 0
