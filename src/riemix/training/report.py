"""What a training run reports: the loss lines, diagnostics windows and the summary.

The numbers are those of every process together (``riemix.training.distributed``): the loss of the global
batch, tokens/s and padding of all processes, each process's memory.  ``metrics.jsonl`` itself is written by
``riemix.training.logging.MetricsLogger`` (main process only).
"""

from __future__ import annotations

import time
from typing import Any

from riemix.core.tuner import iter_moe_lora_layers
from riemix.diagnostics.monitor import collect_diagnostics, compact_diagnostics
from riemix.io.fileio import atomic_write_json
from riemix.training.distributed import all_sum, rss_per_process
from riemix.training.logging import format_table
from riemix.training.state import StepResult, TrainState

__all__ = ["log_diagnostics", "log_step", "result_warnings", "throughput", "write_summary"]


def throughput(state: TrainState) -> tuple[float | None, float | None]:
    """``(tokens/s, padding fraction)`` of every process together (None before any step); collective."""
    tokens, padded = all_sum([float(state.tokens_seen), float(state.padded_seen)], state.accel.device)
    if tokens == 0:
        return None, None
    return tokens / max(state.train_time, 1e-9), 1.0 - tokens / max(padded, 1.0)


def log_step(state: TrainState, done: int, result: StepResult) -> None:
    """The training-loss line of metrics.jsonl (every ``log_every`` steps and at the last step); the loss is
    the global batch's and the throughput that of every process."""
    tokens_per_s, pad_fraction = throughput(state)
    state.metrics.record(
        {
            "step": done,
            "loss": result.loss,
            "lr": state.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_s,
            "pad_fraction": pad_fraction,
            **result.aux_logs,
        }
    )


def log_diagnostics(state: TrainState, done: int, grad_norms: dict | None) -> None:
    """Close a diagnostics window: its compact summary in metrics.jsonl, the full one in diagnostics.json."""
    diag = collect_diagnostics(iter_moe_lora_layers(state.model), state.monitor, grad_norms, done)
    state.monitor.reset()
    state.metrics.record({"step": done, "diagnostics": compact_diagnostics(diag)})
    if state.is_main:
        atomic_write_json(state.out / "diagnostics.json", diag)


def write_summary(state: TrainState, last_eval: dict[str, float], done: int, t_start: float) -> dict[str, Any]:
    """Write summary.json and print the before/after table (main process); returns the summary (collective:
    every process calls it)."""
    tokens_per_s, pad_fraction = throughput(state)  # None without a step (a resume of a finished run)
    summary = {
        "run_id": state.run.run_id,
        "before": state.extra["before"],
        "after": last_eval,
        "steps": done,
        "wall_seconds": time.time() - t_start,
        "train_seconds": state.train_time,
        "eval_seconds": state.eval_time,
        "tokens_per_s": tokens_per_s,
        "pad_fraction": pad_fraction,
        "processes": state.accel.num_processes,
        "rss_mib_per_process": rss_per_process(),
        "output_dir": str(state.out),
        "warnings": result_warnings(state, last_eval),
    }
    if state.is_main:
        atomic_write_json(state.out / "summary.json", summary)
        if state.extra["before"] is not None:
            state.log("\n" + format_table(state.extra["before"], last_eval))
        for warning in summary["warnings"]:
            state.log(f"warning: {warning}")
        state.log(
            f"wall time {summary['wall_seconds']:.0f} s (training {state.train_time:.0f} s, evaluation "
            f"{state.eval_time:.0f} s); run directory {state.out}"
        )
    return summary


def result_warnings(state: TrainState, after: dict[str, float]) -> list[str]:
    """What a user should not miss: the watched metric ending worse than zero-shot."""
    before, name = state.extra["before"], state.cfg.early_stopping_metric
    if not before or name not in before or name not in after:
        return []
    worse = after[name] > before[name] if name == "loss" else after[name] < before[name]
    if not worse:
        return []
    return [
        f"{name} after training ({after[name]:.4f}) is worse than zero-shot ({before[name]:.4f}): check the "
        f"learning rate (lr={state.cfg.lr:g}) and data before using this adapter"
    ]
