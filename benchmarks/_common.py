"""Compatibility names for the benchmark scripts that still import ``_common``; new code imports ``lib``."""

from __future__ import annotations

from lib.harness import record_header
from lib.runner import LoopResult, train_loop
from lib.stats import pct

__all__ = ["LoopResult", "pct", "record_header", "train_loop"]
