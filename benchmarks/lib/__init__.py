"""Shared pieces of the benchmark scripts (they use only public riemix API).

Modules:
    harness: the results folder, the record header (date, machine) and atomic JSON writing.
    stats: per-example hits, primary scores, majority baselines and the ``mean ± std`` cell format.
    runner: the plain training loop the quality benchmarks share, and its seeded batches.
"""
