"""Training checkpoints: adapter + trainable tensors + optimizer + scheduler + RNG + step, atomically.

Layout: ``<run>/checkpoints/step-000120/{adapter/, trainer_state.pt, checkpoint.json}``.  Each checkpoint
is written into a hidden temporary directory and published with :func:`riemix.io.fileio.publish_dir`
(fsync, then rename), so a crash never leaves a half checkpoint; only the newest ``keep_last`` are kept.

``checkpoint.json`` (written last) records the step, the run id of the run that wrote it and the SHA-256
of ``trainer_state.pt``: a truncated or bit-flipped state is refused (:class:`CheckpointError`) instead
of resuming with silently changed optimizer moments, and :func:`find_resumable` falls back to the
previous intact checkpoint of the same run, saying so.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from riemix.core.layer import iter_moe_lora_layers
from riemix.io.adapter import save_adapter
from riemix.io.fileio import (
    atomic_write,
    atomic_write_json,
    clean_stale_temp_dirs,
    file_sha256,
    publish_dir,
    sibling_temp_path,
)

__all__ = [
    "NUMPY_RNG_GLOBALS",
    "CheckpointError",
    "clean_checkpoint_temps",
    "find_resumable",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

STATE_NAME = "trainer_state.pt"
MANIFEST_NAME = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt, foreign to the run, or does not fit the model."""


_STEP_DIR = re.compile(r"^step-(\d+)$")
# What NumPy's legacy RNG state (a tuple holding a uint32 array) needs to be unpickled: array
# reconstruction only, no other callable (``torch.load(weights_only=True)`` refuses everything else).
_NUMPY_CORE = getattr(np, "_core", None) or np.core
NUMPY_RNG_GLOBALS = [
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
    """The newest complete checkpoint directory of a run (one with its manifest), or None."""
    found = [p for _, p in _checkpoints(Path(run_dir)) if (p / MANIFEST_NAME).is_file()]
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
        extra: JSON/pickle-able trainer bookkeeping (best metric, patience, history ...); its ``run_id``
            (if any) is also recorded in the manifest.
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
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        bad = [n for n, t in trainable.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # never poison the last good checkpoint
            raise CheckpointError(f"refusing to write {final}: non-finite values in {bad[:3]}")
        save_adapter(model, tmp / "adapter")
        state = {
            "step": step,
            "trainable": trainable,
            "expert_ages": _expert_ages(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "extra": extra,
        }
        atomic_write(tmp / STATE_NAME, lambda t: torch.save(state, t))  # a full disk is reported as ENOSPC
        manifest = {"step": step, "run_id": extra.get("run_id"), "trainer_state_sha256": file_sha256(tmp / STATE_NAME)}
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoints(Path(run_dir))[: -max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_checkpoint_temps(run_dir: str | Path) -> None:
    """Remove the temporary checkpoint directories that crashed writers left in ``<run>/checkpoints``."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        names = {p.name.split(".")[1] for p in root.glob(".step-*.*")}  # ".step-000003.tmp.<host>..." -> step
        for name in names:
            clean_stale_temp_dirs(root / name)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint's trainer state without touching any model.

    Returns:
        The saved state (``step``, ``trainable``, ``optimizer``, ``scheduler``, ``rng``, ``extra``) plus
        ``run_id`` from the manifest.

    Raises:
        CheckpointError: no manifest or state (an incomplete or foreign directory), a checksum mismatch
            (truncated or bit-flipped file), or a file holding anything but tensors, containers, numbers
            and NumPy's RNG state (``weights_only`` loading: a crafted file cannot run code).
    """
    path = Path(path)
    state_file, manifest_file = path / STATE_NAME, path / MANIFEST_NAME
    if not state_file.is_file() or not manifest_file.is_file():
        missing = STATE_NAME if not state_file.is_file() else MANIFEST_NAME
        raise CheckpointError(f"{path}: no {missing} (not a complete riemix checkpoint)")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        expected = manifest["trainer_state_sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_file}: corrupt checkpoint manifest: {exc!r}") from exc
    if file_sha256(state_file) != expected:
        raise CheckpointError(f"{state_file}: checksum mismatch: the file is truncated or corrupt")
    try:  # tensors, containers, numbers and NumPy's RNG state array only: a crafted file cannot run code
        with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
            state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{state_file}: refused: it holds objects other than tensors, containers, numbers and a NumPy "
            f"RNG state, so it was not written by riemix (loading it could run code): {str(exc)[-300:]}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{state_file}: unreadable trainer state: {str(exc)[-300:]}") from exc
    state["run_id"] = manifest.get("run_id")
    return state


def _expert_ages(model: nn.Module) -> dict[str, torch.Tensor]:
    """The expert ages (``MoELoRALinear.expert_age``) of the layers with maturity routing, by layer name."""
    return {n: layer.expert_age.cpu().clone() for n, layer in iter_moe_lora_layers(model) if layer.maturity.after_steps}


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore trainable tensors, expert ages, optimizer, scheduler and RNG from a checkpoint directory.

    The file is read and verified (:func:`read_checkpoint`) before anything is changed, unless ``state``
    is what :func:`read_checkpoint` already returned for ``path`` (a caller that inspected it first).

    Returns:
        The saved state's ``{"step", "extra"}``.

    Raises:
        CheckpointError: as :func:`read_checkpoint`, or trainable tensors that differ from the model's.
    """
    state = read_checkpoint(path) if state is None else state
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["trainable"]):
        diff = sorted(set(params) ^ set(state["trainable"]))
        raise CheckpointError(f"{Path(path) / STATE_NAME}: trainable parameters differ from the model's: {diff[:5]}")
    for name, value in state["trainable"].items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise CheckpointError(
                f"{Path(path) / STATE_NAME}: {name} has shape {tuple(value.shape)}, the model's is "
                f"{tuple(params[name].shape)}"
            )
    layers = dict(iter_moe_lora_layers(model))
    ages = state.get("expert_ages") or {}  # maturity routing's ages (none in checkpoints written before it)
    for name, value in ages.items():
        if name not in layers or tuple(value.shape) != tuple(layers[name].expert_age.shape):
            raise CheckpointError(f"{Path(path) / STATE_NAME}: expert ages of {name!r} do not fit the model's layers")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
        for name, value in ages.items():
            layers[name].expert_age.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def find_resumable(run_dir: str | Path, run_id: str | None, log=print) -> Path | None:
    """The newest intact checkpoint of run ``run_id`` in ``run_dir``, or None.

    Corrupt checkpoints are skipped with a message naming them and the one used instead; checkpoints of
    another run (a different ``run_id``) are never chosen.

    Args:
        run_dir: The run directory.
        run_id: The run's id (``None`` accepts checkpoints without one, written before run ids).
        log: Where the fall-back messages go.
    """
    skipped: list[str] = []
    for _, path in reversed(_checkpoints(Path(run_dir))):
        try:
            saved_id = read_checkpoint(path)["run_id"]
        except CheckpointError as exc:
            skipped.append(f"{path.name} ({exc})")
            continue
        if run_id is not None and saved_id is not None and saved_id != run_id:
            skipped.append(f"{path.name} (written by run {saved_id}, not this run {run_id})")
            continue
        if skipped:
            log(f"warning: skipped checkpoint(s) {'; '.join(skipped)}; resuming from {path.name} instead")
        return path
    if skipped:
        log(f"warning: no usable checkpoint: {'; '.join(skipped)}")
    return None
