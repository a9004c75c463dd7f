"""Shared pieces of the benchmark scripts (they use only public riemix API).

The scripts run as ``python benchmarks/<script>.py``, so ``benchmarks/`` is on ``sys.path`` and this
package imports as ``lib`` (``from lib.harness import ...``).

Modules:
    harness: the script parser, interleaved timing, the results folder, the record header and atomic JSON
        writing (``write_record``, ``speed_record``).
    stats: per-example hits, primary scores, majority baselines, timing medians and the ``mean ± std`` cell.
    runner: the plain training loop the quality benchmarks share, and its seeded batches.
"""
