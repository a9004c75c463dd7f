"""A full disk: ``riemix train`` refuses a file system without room before loading anything, and a save
that runs out of space part-way fails without touching the previous adapter or checkpoint.

Each test mounts its own small tmpfs (root with CAP_SYS_ADMIN; skipped where ``mount`` is refused) and
unmounts it afterwards.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import riemix.training.recipe as recipe
from riemix.cli import main
from riemix.io.adapter import save_adapter
from riemix.io.checkpoint import find_resumable, load_checkpoint, save_checkpoint
from tests.faults import killer
from tests.faults.common import adapter_tensors, assert_completed_like, fault_cfg, write_cfg

PAGE = 4096
NO_SPACE = (OSError, SafetensorError, RuntimeError)  # what the writers raise (torch.save: RuntimeError)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size) -> Path``: a fresh tmpfs of that size ("2m") mounted under tmp_path; unmounted after."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot run mount: {exc}")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root and CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=False)


def _fill(mnt: Path) -> Path:
    """Fill the file system at ``mnt`` to the last page with ``mnt/filler``."""
    filler = mnt / "filler"
    with open(filler, "ab", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 16, PAGE):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    assert shutil.disk_usage(mnt).free < PAGE
    return filler


def _no_space(exc: BaseException) -> bool:
    """A full disk reported as riemix reports it: OSError ENOSPC naming the file being written."""
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC and bool(exc.filename)


def test_train_on_a_file_system_without_room_exits_2_before_loading(tmp_path, tmpfs, monkeypatch, capsys, fault_inputs):
    mnt = tmpfs("2m")
    out = mnt / "run"

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the output directory was refused")

    monkeypatch.setattr(recipe, "setup", never)
    assert main(["train", "--config", write_cfg(fault_cfg(out, fault_inputs), tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    free = shutil.disk_usage(mnt).free / 2**20
    assert f"riemix train: error: output_dir {out}: only {free:.1f} MiB free on its file system; a run needs at " \
           f"least 100 MiB" in err  # fmt: skip
    assert list(out.iterdir()) == []  # no lock, no config: nothing was started


def test_adapter_save_on_a_full_disk_keeps_the_previous_adapter(tmpfs):
    mnt = tmpfs("1m")
    old_model, new_model = killer.adapted_model(1), killer.adapted_model(2)
    save_adapter(old_model, mnt / "adapter")
    old = adapter_tensors(mnt / "adapter")
    filler = _fill(mnt)
    full = filler.stat().st_size
    failures = []
    for pages in range(0, 64):  # free one more page each time, until the save fits
        os.truncate(filler, full - pages * PAGE)
        try:
            save_adapter(new_model, mnt / "adapter")
        except NO_SPACE as exc:
            assert _no_space(exc), repr(exc)
            failures.append(type(exc))
            got = adapter_tensors(mnt / "adapter")  # the previous adapter, complete and exact
            assert got.keys() == old.keys() and all(torch.equal(got[k], old[k]) for k in old)
            assert sorted(p.name for p in mnt.iterdir()) == ["adapter", "filler"]  # no temporary left
            continue
        break
    else:
        pytest.fail("the adapter never fitted")
    new = adapter_tensors(mnt / "adapter")
    assert not any(torch.equal(new[k], old[k]) for k in old)
    # it ran out of space in the tensor file and, pages later, in the config file: each one reported as
    # the OSError ENOSPC naming the file (safetensors' own error is translated by riemix.io.fileio)
    assert len(failures) >= 2 and set(failures) == {OSError}, failures


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(tmpfs):
    run = tmpfs("2m")
    model, optimizer, scheduler = killer.mini_setup()
    killer.mini_step(model, optimizer, scheduler)
    step1 = killer.trainable(model)
    save_checkpoint(run, 1, model, optimizer, scheduler, {"run_id": killer.RUN_ID}, keep_last=1)
    killer.mini_step(model, optimizer, scheduler)
    filler = _fill(run)
    full = filler.stat().st_size
    failures = []
    for pages in range(0, 128):
        os.truncate(filler, full - pages * PAGE)
        try:
            save_checkpoint(run, 2, model, optimizer, scheduler, {"run_id": killer.RUN_ID}, keep_last=1)
        except NO_SPACE as exc:
            assert _no_space(exc), repr(exc)
            failures.append(type(exc))
            assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no temporary left
            ckpt = find_resumable(run, killer.RUN_ID, log=lambda m: None)
            fresh = killer.mini_setup()
            assert ckpt.name == "step-000001" and load_checkpoint(ckpt, *fresh)["step"] == 1
            assert all(torch.equal(p, step1[n]) for n, p in killer.trainable(fresh[0]).items())
            continue
        break
    else:
        pytest.fail("the checkpoint never fitted")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    # out of space in the adapter's tensors, in torch.save's trainer state, in a JSON file: all reported as
    # the OSError ENOSPC naming the file
    assert len(failures) >= 3 and set(failures) == {OSError}, failures


def _fill_after_first_step(monkeypatch, mnt: Path) -> list[Path]:
    """Make the disk full once the first step is done (before the second one is checkpointed)."""
    real_step, filled = recipe.train_step, []

    def filling_step(state, step):
        if step == 1 and not filled:
            filled.append(_fill(mnt))
        return real_step(state, step)

    monkeypatch.setattr(recipe, "train_step", filling_step)
    return filled


def test_disk_full_during_training_keeps_the_last_checkpoint_and_resume_matches(
    tmpfs, monkeypatch, fault_inputs, reference_run
):
    mnt = tmpfs("101m")  # just above the 100 MiB the start check asks for
    out = mnt / "run"
    filled = _fill_after_first_step(monkeypatch, mnt)
    with pytest.raises(NO_SPACE) as info:
        recipe.train(fault_cfg(out, fault_inputs))
    assert filled and _no_space(info.value), repr(info.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # no half checkpoint 2
    assert find_resumable(out, None, log=lambda m: None).name == "step-000001"
    assert not (out / "adapter").exists() and not (out / ".riemix.lock").exists()

    filled[0].unlink()  # the user makes room and resumes
    monkeypatch.undo()
    recipe.train(fault_cfg(out, fault_inputs, resume=True))
    assert_completed_like(out, reference_run)


def test_cli_reports_a_disk_that_fills_during_training_with_exit_2(tmp_path, tmpfs, monkeypatch, capsys, fault_inputs):
    mnt = tmpfs("101m")
    out = mnt / "run"
    _fill_after_first_step(monkeypatch, mnt)
    assert main(["train", "--config", write_cfg(fault_cfg(out, fault_inputs), tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(mnt) in err
