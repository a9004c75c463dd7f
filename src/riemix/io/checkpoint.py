"""Training checkpoints: adapter + trainable tensors + optimizer + scheduler + RNG + step, atomically.

Layout: ``<run>/checkpoints/step-000120/{adapter/, trainer_state.pt}``.  Each checkpoint is written
into a hidden temporary directory and published with :func:`riemix.io.fileio.publish_dir` (fsync, then
rename), so a crash never leaves a half checkpoint; only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from riemix.io.adapter import save_adapter
from riemix.io.fileio import publish_dir, sibling_temp_path

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
# What NumPy's legacy RNG state (a tuple holding a uint32 array) needs to be unpickled: array
# reconstruction only, no other callable (``torch.load(weights_only=True)`` refuses everything else).
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_NUMPY_RNG_GLOBALS = [
    _NUMPY_CORE.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    found = [p for _, p in _checkpoints(Path(run_dir)) if (p / "trainer_state.pt").is_file()]
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``<run>/checkpoints/step-<step>`` atomically and prune older ones.

    Args:
        run_dir: run directory.
        step: optimizer steps taken.
        model: the adapted model (its trainable tensors and adapters are saved).
        optimizer: optimizer whose state is saved.
        scheduler: LR scheduler (``state_dict``-able).
        extra: JSON/pickle-able trainer bookkeeping (best metric, patience, history ...).
        keep_last: how many checkpoints to keep (>= 1).

    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = sibling_temp_path(final)
    tmp.mkdir()
    try:
        save_adapter(model, tmp / "adapter")
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        state = {
            "step": step,
            "trainable": trainable,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "extra": extra,
        }
        torch.save(state, tmp / "trainer_state.pt")
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoints(Path(run_dir))[: -max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore trainable tensors, optimizer, scheduler and RNG from a checkpoint directory.

    Returns:
        The saved state's ``{"step", "extra"}``.

    Raises:
        FileNotFoundError: if ``path`` has no ``trainer_state.pt``.
        ValueError: if the checkpoint's trainable tensors do not match the model's, or the file holds
            anything but tensors, containers, numbers and NumPy's RNG state (``weights_only`` loading).
    """
    state_file = Path(path) / "trainer_state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file}: no trainer state (not a riemix checkpoint?)")
    try:  # tensors, containers, numbers and NumPy's RNG state array only: a crafted file cannot run code
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{state_file}: refused: it holds objects other than tensors, containers, numbers and a NumPy "
            f"RNG state, so it was not written by riemix (loading it could run code): {str(exc)[-300:]}"
        ) from exc
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["trainable"]):
        diff = sorted(set(params) ^ set(state["trainable"]))
        raise ValueError(f"{state_file}: trainable parameters differ from the model's: {diff[:5]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
