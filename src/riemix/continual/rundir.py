"""The run directory of ``riemix continual``: checked before the model loads, resumable, never reused by accident.

<output_dir>/config.yaml      the configuration (a resume must match it outside RESUME_SAFE_FIELDS)
<output_dir>/stream.json      each task's name, classes and file digest (a resume must match it)
<output_dir>/checkpoint/      adapter/ + trainer.pt (optimizer, detector, replay, auto-freezer, expert
                              ages, RNG) + progress.json; replaced atomically after every task and
                              every ``save_every`` steps
<output_dir>/results.json     matrix, metrics, experts over time, decisions, usage (after every task)
<output_dir>/metrics.jsonl    one JSON object per step / evaluation
<output_dir>/adapter/         the final adapter
<output_dir>/plots/           accuracy-matrix heatmap, per-skill expert usage
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from riemix.continual.config import ContinualConfig
from riemix.core.tuner import iter_moe_lora_layers
from riemix.io.adapter import save_adapter
from riemix.io.checkpoint import NUMPY_RNG_GLOBALS, rng_state, set_rng_state
from riemix.io.fileio import atomic_write_json, atomic_write_text, discard_dir, publish_dir, sibling_temp_path
from riemix.training.rundir import check_output_dir

__all__ = ["ContinualRunDir", "open_continual_run"]

_MARKER = "stream.json"
_OURS = {"config.yaml", _MARKER, "checkpoint", "results.json", "metrics.jsonl", "adapter", "plots"}


class ContinualRunDir:
    """A continual run's directory (``open_continual_run``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoint = path / "checkpoint"
        self.checkpoint_adapter = self.checkpoint / "adapter"

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The saved progress and trainer state, or None when no checkpoint was written yet.

        Raises:
            ValueError: a checkpoint whose files are missing or unreadable, naming the file.
        """
        progress = self.checkpoint / "progress.json"
        if not self.checkpoint.exists():
            return None
        trainer = self.checkpoint / "trainer.pt"
        try:
            state = json.loads(progress.read_text(encoding="utf-8"))
            with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):  # tensors, plain data, NumPy's RNG state
                loaded = torch.load(trainer, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]  # torch's are pages long
            raise ValueError(
                f"cannot resume from {self.checkpoint}: {reason} (use overwrite to start the run again)"
            ) from exc
        return {"progress": state, "trainer": loaded}

    def restore(self, checkpoint: dict[str, Any], run) -> None:
        """Put a checkpoint's state into ``run`` (its model already carries the checkpoint's adapter)."""
        trainer = checkpoint["trainer"]
        run.load_progress(checkpoint["progress"])
        layers = dict(iter_moe_lora_layers(run.model))
        with torch.no_grad():
            for name, ages in trainer["expert_ages"].items():
                layers[name].expert_age.copy_(ages)
        run.optimizer.load_state_dict(trainer["optimizer"])
        run.detector.load_state_dict(trainer["detector"])
        run.replay.load_state_dict(trainer["replay"])
        run.freezer.load_state_dict(trainer["freezer"])
        set_rng_state(trainer["rng"])

    def save(self, run) -> None:
        """Replace checkpoint/ atomically with the run's current state."""
        tmp = sibling_temp_path(self.checkpoint)
        try:
            save_adapter(run.model, tmp / "adapter")
            trainer = {
                "optimizer": run.optimizer.state_dict(),
                "detector": run.detector.state_dict(),
                "replay": run.replay.state_dict(),
                "freezer": run.freezer.state_dict(),
                "expert_ages": {n: layer.expert_age.cpu().clone() for n, layer in iter_moe_lora_layers(run.model)},
                "rng": rng_state(),
            }
            torch.save(trainer, tmp / "trainer.pt")
            (tmp / "progress.json").write_text(json.dumps(run.progress_state()), encoding="utf-8")
            publish_dir(tmp, self.checkpoint)
        finally:
            if tmp.exists():
                discard_dir(tmp)

    def write_results(self, run, results: dict[str, Any], final: bool = False) -> None:
        """results.json, and on the last task the plots."""
        atomic_write_json(self.path / "results.json", results)
        if final:
            from riemix.continual.plots import write_continual_plots

            with contextlib.suppress(ImportError):  # matplotlib is optional: the numbers are in results.json
                write_continual_plots(results, self.path / "plots")


def _same_stream(saved: list[dict], now: list[dict]) -> list[str]:
    out = []
    if [t["name"] for t in saved] != [t["name"] for t in now]:
        out.append(f"stream: saved {[t['name'] for t in saved]}, now {[t['name'] for t in now]}")
    else:
        for a, b in zip(saved, now, strict=True):
            if a != b:
                out.append(f"task {a['name']!r}: its classes or files changed since the run started")
    return out


@contextlib.contextmanager
def open_continual_run(cfg: ContinualConfig, fingerprint: list[dict], log=print) -> Iterator[ContinualRunDir]:
    """Check and prepare ``cfg.output_dir`` before the model loads.

    A directory that holds a run needs ``resume`` (which must name the same stream and configuration,
    outside ``RESUME_SAFE_FIELDS``) or ``overwrite`` (which deletes only a riemix continual run).

    Raises:
        ValueError: an unusable directory (``riemix.training.rundir.check_output_dir``), a run there without
            ``resume``/``overwrite``, ``overwrite`` of a folder that holds other files, or a resume whose
            stream or configuration differs (each difference named).
    """
    import yaml

    path = check_output_dir(cfg.output_dir)
    marker = path / _MARKER
    entries = sorted(p.name for p in path.iterdir())
    if marker.is_file():
        if cfg.overwrite:
            foreign = sorted(set(entries) - _OURS)
            if foreign:
                raise ValueError(
                    f"output_dir {path} holds files that are not a continual run's: {foreign}; not deleting it"
                )
            for name in entries:
                target = path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            log(f"overwrote the run in {path}")
        elif cfg.resume:
            differences = _same_stream(json.loads(marker.read_text(encoding="utf-8")), fingerprint)
            saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
            differences += cfg.differences(saved)
            if differences:
                raise ValueError(
                    f"cannot resume the run in {path} with a different stream or configuration: "
                    + "; ".join(differences)
                )
        else:
            raise ValueError(
                f"output_dir {path} already holds a continual run: pass resume to continue it or "
                "overwrite to replace it"
            )
    elif cfg.resume:
        raise ValueError(f"cannot resume: output_dir {path} holds no continual run")
    elif entries:
        raise ValueError(f"output_dir {path} is not empty and holds no continual run ({entries[:5]}); pick a new one")
    if not marker.is_file():
        atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        atomic_write_json(marker, fingerprint)
    yield ContinualRunDir(path)
