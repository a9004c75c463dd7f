"""The ``riemix`` command line."""

from riemix.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
