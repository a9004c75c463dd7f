"""Two writers on one run directory: the lock of a live training refuses the second one; the lock of a
process that died is taken over."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from riemix.training.recipe import train
from riemix.training.rundir import LOCK_NAME, open_run
from tests.faults import killer
from tests.faults.common import fault_cfg

IN_USE = "is in use by another training"


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_lock(out, **record) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps(record), encoding="utf-8")


def _lock(out) -> dict:
    return json.loads((out / LOCK_NAME).read_text(encoding="utf-8"))


def test_a_live_training_process_keeps_a_second_writer_out_until_it_dies(tmp_path, fault_inputs):
    out, ready = tmp_path / "run", tmp_path / "ready"
    holder = killer.start_child(killer.child_hold_run, fault_cfg(out, fault_inputs).to_dict(), str(ready),
                                str(tmp_path / "child.log"))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        held = _lock(out)
        assert held["pid"] == holder.pid and held["host"] == socket.gethostname() and held["run_id"]
        for kw in ({}, {"resume": True}, {"overwrite": True}):  # no option gets past a live lock
            with pytest.raises(ValueError, match=re.escape(f"{out} {IN_USE} (pid {holder.pid} on host ")):
                train(fault_cfg(out, fault_inputs, **kw))
        assert _lock(out) == held  # the refused writer changed nothing
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "run.json"]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
    assert holder.exitcode == killer.KILLED

    messages = []
    run = open_run(fault_cfg(out, fault_inputs, overwrite=True), log=messages.append)
    try:
        assert any(f"removing the stale lock of process {holder.pid}" in m for m in messages)
        assert _lock(out)["pid"] == os.getpid() and _lock(out)["run_id"] == run.run_id != held["run_id"]
    finally:
        run.release()
    assert not (out / LOCK_NAME).exists()


def test_a_second_open_run_in_the_same_live_process_is_refused(tmp_path, fault_inputs):
    out = tmp_path / "run"
    first = open_run(fault_cfg(out, fault_inputs))
    try:
        with pytest.raises(ValueError, match=re.escape(f"{IN_USE} (pid {os.getpid()} ")):
            open_run(fault_cfg(out, fault_inputs, overwrite=True))
        assert _lock(out)["run_id"] == first.run_id
    finally:
        first.release()
    with open_run(fault_cfg(out, fault_inputs, overwrite=True)) as second:
        assert second.locked and second.run_id != first.run_id
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "lock, age_s, taken_over",
    [
        ({"pid": "dead", "host": "here", "run_id": "old"}, 0, True),
        ({"pid": "self", "host": "here", "run_id": "old"}, 0, False),
        ({"pid": "dead", "host": "another-host.example", "run_id": "old"}, 0, False),  # cannot tell: keep out
        (None, 0, False),  # unreadable and recent: maybe being written right now
        (None, 120, True),  # unreadable and a minute old: a crash while writing it
    ],
    ids=["dead-pid-this-host", "live-pid-this-host", "pid-on-another-host", "unreadable-new", "unreadable-old"],
)
def test_stale_locks_are_taken_over_and_live_or_unknown_ones_refused(tmp_path, fault_inputs, lock, age_s, taken_over):
    out = tmp_path / "run"
    if lock is None:
        out.mkdir()
        (out / LOCK_NAME).write_text('{"pid": 12', encoding="utf-8")  # torn
    else:
        pid = _dead_pid() if lock["pid"] == "dead" else os.getpid()
        _write_lock(
            out, **{**lock, "pid": pid, "host": socket.gethostname() if lock["host"] == "here" else lock["host"]}
        )
    if age_s:
        past = time.time() - age_s
        os.utime(out / LOCK_NAME, (past, past))
    messages = []
    if not taken_over:
        with pytest.raises(ValueError, match=IN_USE):
            open_run(fault_cfg(out, fault_inputs), log=messages.append)
        assert (out / LOCK_NAME).exists() and not (out / "run.json").exists()
        return
    with open_run(fault_cfg(out, fault_inputs), log=messages.append) as run:
        assert any("stale lock" in m for m in messages), messages
        assert _lock(out) == {**_lock(out), "pid": os.getpid(), "run_id": run.run_id}
    assert not (out / LOCK_NAME).exists()
