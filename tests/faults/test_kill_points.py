"""SIGKILL at every file-system write boundary of ``save_adapter`` and ``save_checkpoint``.

Each save runs in a child process (``tests.faults.killer``) that is killed before its N-th write boundary,
for every N from 1 to the number of boundaries of one save (counted in a dry run) plus one (killed just
after the save returned).  After each kill the parent checks that what a restarted process finds is
complete and exact: the adapter directory loads and holds the old tensors or the new ones bit for bit
(switching exactly at the atomic publish), the newest intact checkpoint loads and resuming from it ends
on the same tensors as an uninterrupted run, and the dead writer's temporary directories are cleaned up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from riemix.core.state import adapter_state_dict
from riemix.io.adapter import AdapterError, load_adapter, save_adapter
from riemix.io.checkpoint import (
    clean_checkpoint_temps,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tests.faults import killer
from tests.helpers import make_tiny_llama


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loaded(path: Path) -> dict[str, torch.Tensor]:
    return _tensors(load_adapter(make_tiny_llama(), path))


def _sweep_adapter(tmp_path: Path, exchange: bool) -> list[str]:
    """Kill an adapter save over an existing adapter at every boundary; assert old-or-new each time."""
    old_model, new_model = killer.adapted_model(1), killer.adapted_model(2)
    old, new = _tensors(old_model), _tensors(new_model)
    assert not any(torch.equal(old[k], new[k]) for k in old)  # every tensor tells old from new
    pristine = tmp_path / "pristine"
    save_adapter(old_model, pristine / "adapter")

    dry = tmp_path / "dry"
    shutil.copytree(pristine, dry)
    trace = killer.dry_run("save_adapter", dry, tmp_path / "dry.json", path=str(dry / "adapter"), seed=2,
                           exchange=exchange)  # fmt: skip
    assert _same(_loaded(dry / "adapter"), new)
    assert any(t.startswith("save_file(") for t in trace) and any(t.startswith("fsync(") for t in trace)
    # the boundary number of the one instant the adapter changes: the atomic exchange (or the rename into place)
    publish = f"{'exchange' if exchange else 'rename'}(<root>/.adapter.tmp.* -> <root>/adapter)"
    switch = max(n for n, t in enumerate(trace, 1) if t == publish)  # the fall-back's first rename fails

    lost = []
    for n in range(1, len(trace) + 2):
        root = tmp_path / f"kill{n:02d}"
        shutil.copytree(pristine, root)
        died, pid = killer.kill_at("save_adapter", n, root, tmp_path / "kill.json", path=str(root / "adapter"),
                                   seed=2, exchange=exchange)  # fmt: skip
        assert died == trace[:n], f"kill point {n} is not reproducible"  # trace[:total + 1] is the whole trace
        where = f"killed before boundary {n}/{len(trace)} ({trace[n - 1] if n <= len(trace) else 'after the save'})"
        try:
            got = _loaded(root / "adapter")  # load_adapter also restores a directory renamed aside
        except AdapterError as exc:
            lost.append(f"{where}: {exc}")
        else:
            if not _same(got, old if n <= switch else new):
                lost.append(f"{where}: the adapter holds the {'new' if n <= switch else 'old'} tensors")
        # a restarted process saves again over whatever the dead one left
        save_adapter(new_model, root / "adapter")
        assert _same(_loaded(root / "adapter"), new), where
        assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == ["adapter"], where
        assert sorted(p.name for p in (root / "adapter").iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ], where
        shutil.rmtree(root)
    assert not lost, "no complete adapter after a kill:\n" + "\n".join(lost)
    return trace


def test_adapter_save_killed_at_every_write_boundary_leaves_the_old_or_the_new_adapter(tmp_path):
    trace = _sweep_adapter(tmp_path, exchange=True)
    assert len(trace) >= 15  # the writes of both files, their fsyncs and renames, the exchange, the cleanup


def test_adapter_save_without_atomic_exchange_killed_at_every_write_boundary(tmp_path):
    _sweep_adapter(tmp_path, exchange=False)


def test_checkpoint_save_killed_at_every_write_boundary_resumes_bit_identically(tmp_path):
    # the uninterrupted toy training: tensors after each step, the final adapter
    model, optimizer, scheduler = killer.mini_setup()
    after = {}
    for step in range(1, killer.MINI_STEPS + 1):
        killer.mini_step(model, optimizer, scheduler)
        after[step] = (killer.trainable(model), _tensors(model))
    final = after[killer.MINI_STEPS][1]
    # the run directory as it stood before step 2 was saved: checkpoint step-000001 (keep_last=1)
    pristine = tmp_path / "pristine"
    model, optimizer, scheduler = killer.mini_setup()
    killer.mini_step(model, optimizer, scheduler)
    save_checkpoint(pristine, 1, model, optimizer, scheduler, {"run_id": killer.RUN_ID}, keep_last=1)

    dry = tmp_path / "dry"
    shutil.copytree(pristine, dry)
    trace = killer.dry_run("save_checkpoint", dry, tmp_path / "dry.json", run_dir=str(dry), step=2)
    assert sorted(p.name for p in (dry / "checkpoints").iterdir()) == ["step-000002"]  # step 1 pruned
    assert any(t.startswith("save(") for t in trace) and any(t.startswith("torn save(") for t in trace)
    (publish,) = [n for n, t in enumerate(trace, 1) if t.endswith("-> <root>/checkpoints/step-000002)")]
    assert len(trace) >= 30

    for n in range(1, len(trace) + 2):
        run = tmp_path / f"kill{n:02d}"
        shutil.copytree(pristine, run)
        died, pid = killer.kill_at("save_checkpoint", n, run, tmp_path / "kill.json", run_dir=str(run), step=2)
        assert died == trace[:n], f"kill point {n} is not reproducible"  # trace[:total + 1] is the whole trace
        where = f"killed before boundary {n}/{len(trace)} ({trace[n - 1] if n <= len(trace) else 'after the save'})"
        expected_step = 1 if n <= publish else 2
        ckpt = find_resumable(run, killer.RUN_ID, log=lambda msg: None)
        assert ckpt is not None and ckpt.name == f"step-{expected_step:06d}", where
        assert latest_checkpoint(run) == ckpt, where
        assert read_checkpoint(ckpt)["run_id"] == killer.RUN_ID
        assert _same(_loaded(ckpt / "adapter"), after[expected_step][1]), where

        # resume: a fresh process state, restored from the checkpoint, runs the remaining steps
        model, optimizer, scheduler = killer.mini_setup()
        torch.manual_seed(12345)  # the checkpoint must restore the RNG the batches and dropout draw from
        assert load_checkpoint(ckpt, model, optimizer, scheduler)["step"] == expected_step, where
        assert _same(killer.trainable(model), after[expected_step][0]), where
        for _ in range(expected_step, killer.MINI_STEPS):
            killer.mini_step(model, optimizer, scheduler)
        assert _same(_tensors(model), final), where

        # the dead writer's temporary directories go; a live writer's (this process) stay
        live = run / "checkpoints" / f".step-000002.tmp.{killer_host()}.{os.getpid()}.0123abcd"
        live.mkdir()
        clean_checkpoint_temps(run)
        hidden = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))
        assert hidden == [live.name], where
        assert not [p for p in (run / "checkpoints").rglob("*") if f".{pid}." in p.name], where
        shutil.rmtree(run)


def killer_host() -> str:
    from riemix.io.fileio import _host_tag

    return _host_tag()
