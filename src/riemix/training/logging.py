"""What a training run reports: ``metrics.jsonl`` (+ TensorBoard), console lines and the before/after table.

``metrics.jsonl`` holds one JSON object per line, each with a ``"step"`` and one of: the training loss
and its companions (``loss``, ``lr``, ``tokens_per_s``, ``pad_fraction``, regulariser terms), an
evaluation (``"eval": {metric: value}``) or a diagnostics window (``"diagnostics": {...}``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "console", "format_metrics", "format_table"]


class MetricsLogger:
    """Appends entries to ``metrics.jsonl`` and mirrors their scalars to TensorBoard.

    Args:
        path: the ``metrics.jsonl`` file (appended to, so a resumed run continues it).
        enabled: False on non-main processes: nothing is written.
        tensorboard_dir: where to write TensorBoard event files; None: no TensorBoard.
    """

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.writer = _tensorboard(tensorboard_dir) if enabled and tensorboard_dir is not None else None

    def record(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` (a dict with a ``"step"``) as one JSON line; scalars also go to TensorBoard.

        TensorBoard tags: the top-level scalars by name, ``eval/<metric>`` and ``diagnostics/<key>`` of
        the ``"overall"`` diagnostics.
        """
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
        except OSError as exc:
            if exc.filename is None:  # a failed write or flush names no file: name it (cli.main reports it)
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            raise
        if self.writer is None:
            return
        flat = {k: v for k, v in entry.items() if k not in ("step", "eval", "diagnostics")}
        flat.update({f"eval/{k}": v for k, v in entry.get("eval", {}).items()})
        overall = entry.get("diagnostics", {}).get("overall", {})
        flat.update({f"diagnostics/{k}": v for k, v in overall.items() if isinstance(v, (int, float))})
        for key, value in flat.items():
            self.writer.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the jsonl file is closed after every entry)."""
        if self.writer is not None:
            self.writer.close()


def _tensorboard(log_dir: str | Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(log_dir))


def console(enabled: bool) -> Callable[..., None]:
    """A printer of lines when ``enabled`` (the main process of a verbose run), else a function that does
    nothing. Lines go through ``tqdm.write``, so they appear above an active progress bar instead of being
    glued to its end."""
    if not enabled:
        return lambda *a, **k: None
    from tqdm.auto import tqdm

    return lambda *parts: tqdm.write(" ".join(str(p) for p in parts))


def format_metrics(metrics: dict[str, float]) -> str:
    """``"accuracy=0.8739, loss=0.3120"``: one console line's worth of metrics."""
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    """The before/after table printed at the end of a run: one row per metric with the change."""
    keys = sorted(set(before) | set(after))
    lines = [f"{'metric':<28} {'before':>10} {'after':>10} {'change':>10}"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        fb = f"{b:10.4f}" if b is not None else f"{'-':>10}"
        fa = f"{a:10.4f}" if a is not None else f"{'-':>10}"
        fc = f"{a - b:+10.4f}" if a is not None and b is not None else f"{'':>10}"
        lines.append(f"{k:<28} {fb} {fa} {fc}")
    return "\n".join(lines)
