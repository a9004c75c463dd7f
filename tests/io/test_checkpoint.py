"""riemix.io.checkpoint: a checkpoint round trip, and a crafted trainer state refused before it can run code."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, add_moe_lora, build_optimizer
from riemix.io.checkpoint import (
    CheckpointError,
    clean_checkpoint_temps,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


class _RunsCode:
    """Unpickling this calls ``exec``: what a crafted checkpoint would do."""

    def __reduce__(self):
        return exec, ("import builtins; builtins.riemix_pwned = True",)


def _reseal(path):
    """Update a checkpoint's manifest checksum after its trainer state was edited."""
    manifest = json.loads((path / "checkpoint.json").read_text())
    manifest["trainer_state_sha256"] = hashlib.sha256((path / "trainer_state.pt").read_bytes()).hexdigest()
    (path / "checkpoint.json").write_text(json.dumps(manifest))


def _parts():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    cfg = MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["0", "2"], init="gaussian")
    model = add_moe_lora(base, cfg)
    opt = build_optimizer(model, "radamw", lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return model, opt, sched


def test_round_trip_restores_trainable_tensors_and_numpy_rng(tmp_path):
    import numpy as np

    model, opt, sched = _parts()
    path = save_checkpoint(tmp_path, 3, model, opt, sched, {"best": 0.5}, keep_last=2)
    expected = np.random.random()  # the draw right after the saved RNG state
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model2, opt2, sched2 = _parts()
    got = load_checkpoint(path, model2, opt2, sched2)
    assert got == {"step": 3, "extra": {"best": 0.5}}
    for (name, a), (_, b) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a - 1.0, b, msg=name)
    assert np.random.random() == expected


def test_a_crafted_trainer_state_is_refused_without_running_it(tmp_path):
    import builtins

    model, opt, sched = _parts()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=2)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    state["extra"] = {"payload": _RunsCode()}
    torch.save(state, path / "trainer_state.pt")
    _reseal(path)  # a crafted file with a matching checksum: the weights_only load must refuse it
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: refused: .*not written by riemix"):
        load_checkpoint(path, *_parts())
    assert not hasattr(builtins, "riemix_pwned")


def test_a_bit_flipped_or_truncated_trainer_state_is_refused(tmp_path):
    model, opt, sched = _parts()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {"run_id": "r1"}, keep_last=2)
    assert read_checkpoint(path)["run_id"] == "r1"
    data = bytearray((path / "trainer_state.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the zip may still load, with a silently changed moment
    (path / "trainer_state.pt").write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"trainer_state\.pt: checksum mismatch: the file is truncated or corrupt"
    ):
        load_checkpoint(path, *_parts())
    (path / "trainer_state.pt").write_bytes(bytes(data[:100]))
    _reseal(path)  # truncated, checksum made to match: still refused, as unreadable
    with pytest.raises(CheckpointError, match=r"unreadable trainer state"):
        read_checkpoint(path)
    (path / "checkpoint.json").write_text("[")
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: corrupt checkpoint manifest"):
        read_checkpoint(path)
    os.remove(path / "checkpoint.json")
    with pytest.raises(CheckpointError, match=r"no checkpoint\.json \(not a complete riemix checkpoint\)"):
        read_checkpoint(path)


def test_find_resumable_falls_back_to_the_previous_intact_checkpoint_of_the_same_run(tmp_path):
    model, opt, sched = _parts()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, {"run_id": "mine"}, keep_last=5)
    save_checkpoint(tmp_path, 4, model, opt, sched, {"run_id": "other"}, keep_last=5)
    root = tmp_path / "checkpoints"
    (root / "step-000003" / "trainer_state.pt").write_bytes(b"garbage")
    said = []
    assert find_resumable(tmp_path, "mine", said.append) == root / "step-000002"
    assert "step-000004 (written by run other, not this run mine)" in said[0]
    assert "step-000003 (" in said[0] and "checksum mismatch" in said[0]
    assert said[0].endswith("resuming from step-000002 instead")
    assert find_resumable(tmp_path, "nobody-else", said.append) is None


def test_a_non_finite_model_never_becomes_a_checkpoint(tmp_path):
    model, opt, sched = _parts()
    save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=2)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"refusing to write .*step-000002: non-finite values"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {}, keep_last=1)
    assert latest_checkpoint(tmp_path).name == "step-000001"  # the last good one is kept, not pruned
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_orphaned_temporary_checkpoints_of_dead_writers_are_removed(tmp_path):
    from riemix.io import fileio

    root = tmp_path / "checkpoints"
    root.mkdir()
    host = fileio._host_tag()
    dead = root / f".step-000003.tmp.{host}.999999999.abcd1234"  # no such pid
    alive = root / f".step-000004.tmp.{host}.{os.getpid()}.abcd1234"
    dead.mkdir()
    alive.mkdir()
    clean_checkpoint_temps(tmp_path)
    assert not dead.exists() and alive.exists()
