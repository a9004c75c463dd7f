"""``kill -9`` of a real tiny training, then ``resume``: the run ends exactly like an uninterrupted one.

The training runs in a child process that SIGKILLs itself in the middle of a save (the temporary
directory is complete, the rename that publishes it has not happened): nothing of the dying process
gets to clean up, so its lock, its temporary directory and the metrics lines of the step it did not
checkpoint are all left behind for the resume to deal with.
"""

from __future__ import annotations

import json
import os

import pytest

from riemix.io.checkpoint import find_resumable, read_checkpoint
from riemix.io.fileio import _host_tag
from riemix.training.recipe import train
from tests.faults import killer
from tests.faults.common import MAX_STEPS, assert_completed_like, fault_cfg, loss_lines


@pytest.mark.parametrize(
    "die_in, die_step",
    [("checkpoint", 3), ("adapter", None)],
    ids=["while-publishing-checkpoint-3", "while-publishing-the-final-adapter"],
)
def test_sigkill_during_training_then_resume_matches_the_uninterrupted_run(
    tmp_path, fault_inputs, reference_run, die_in, die_step
):
    out = tmp_path / "run"
    code, pid = killer.run_child(
        killer.child_train, fault_cfg(out, fault_inputs).to_dict(), str(tmp_path / "child.log"), die_in, die_step
    )
    assert code == killer.KILLED, (tmp_path / "child.log").read_text()

    # what the killed run left: its lock, a complete but unpublished temporary directory, extra metrics
    lock = json.loads((out / ".riemix.lock").read_text())
    assert lock["pid"] == pid and not killer_alive(pid)
    last = die_step - 1 if die_in == "checkpoint" else MAX_STEPS
    published = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert published == [f"step-{s:06d}" for s in range(1, last + 1)]
    assert find_resumable(out, lock["run_id"], log=lambda m: None).name == f"step-{last:06d}"
    assert read_checkpoint(out / "checkpoints" / f"step-{last:06d}")["step"] == last
    assert not (out / "adapter").exists()
    if die_in == "checkpoint":
        (temp,) = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
        assert temp.startswith(f".step-{die_step:06d}.tmp.{_host_tag()}.{pid}.")
        assert [s for s, _, _ in loss_lines(out)] == [1, 2, 3]  # step 3 was logged, then the save died
    else:
        assert [p.name for p in out.iterdir() if p.name.startswith(".adapter.tmp.")]

    # the resume takes over the dead process's lock, drops its temporary checkpoint and metrics lines
    summary = train(fault_cfg(out, fault_inputs, resume=True))
    assert summary["steps"] == MAX_STEPS
    assert_completed_like(out, reference_run)


def killer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
