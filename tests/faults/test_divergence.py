"""A diverging run stops with exit status 3 before anything non-finite is written: the checkpoint of the
last good step stays intact and finite, and no adapter is published."""

from __future__ import annotations

import hashlib

import pytest
import torch

from riemix.cli import main
from riemix.io.checkpoint import find_resumable, read_checkpoint
from riemix.training.guard import TrainingDiverged
from riemix.training.recipe import train
from tests.faults.common import ADAPTER, adapter_tensors, fault_cfg, loss_lines, write_cfg


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def test_divergence_exits_3_keeps_the_last_good_checkpoint_and_writes_no_adapter(tmp_path, capsys, fault_inputs):
    out = tmp_path / "run"
    # an absurd adapter scale: step 1 is fine (B starts at zero), step 2's gradients overflow
    cfg = fault_cfg(out, fault_inputs, adapter={**ADAPTER, "alpha": 1e20})
    assert main(["train", "--config", write_cfg(cfg, tmp_path / "cfg.yaml")]) == 3
    err = capsys.readouterr().err
    assert "riemix train: error: training diverged at step 2: the gradient of " in err
    assert "holds NaN or inf; nothing was saved for this step; try a lower lr (now 0.01) or adapter.alpha " \
           "(now 1e+20)" in err  # fmt: skip

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # no temporary, no step 2
    ckpt = find_resumable(out, None, log=lambda m: None)
    state = read_checkpoint(ckpt)
    assert state["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert all(torch.isfinite(t).all() for t in adapter_tensors(ckpt / "adapter").values())  # load_adapter ok
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert not (out / ".riemix.lock").exists()
    assert [step for step, _, _ in loss_lines(out)] == [1]  # the diverged step was not logged either

    # resuming replays step 2 exactly, so it diverges the same way and again changes nothing on disk
    before = _digest(out / "checkpoints")
    with pytest.raises(TrainingDiverged, match="training diverged at step 2: the gradient of ") as info:
        train(fault_cfg(out, fault_inputs, adapter={**ADAPTER, "alpha": 1e20}, resume=True))
    assert info.value.exit_code == 3 and info.value.step == 2
    assert _digest(out / "checkpoints") == before
    assert not (out / "adapter").exists()
