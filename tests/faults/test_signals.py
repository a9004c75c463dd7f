"""SIGTERM / SIGINT during training: stop at the step boundary with a checkpoint, exit 128 + signal, and
``--resume`` ends exactly like the uninterrupted run."""

from __future__ import annotations

import os
import signal
import time

import pytest

import riemix.training.recipe as recipe
from riemix.cli import main
from riemix.io.checkpoint import read_checkpoint
from riemix.training.guard import TrainingInterrupted
from tests.faults import killer
from tests.faults.common import MAX_STEPS, assert_completed_like, fault_cfg, write_cfg


def _checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "sig, save_every",
    [(signal.SIGTERM, 3), (signal.SIGINT, 1)],
    ids=["SIGTERM-between-checkpoints", "SIGINT-on-a-checkpoint-step"],
)
def test_signal_stops_with_a_checkpoint_and_resume_matches(
    tmp_path, monkeypatch, fault_inputs, reference_run, sig, save_every
):
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real_step = recipe.train_step

    def signalling_step(state, step):
        result = real_step(state, step)
        if step == 1:  # during the second step: the run stops once it is done
            os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(recipe, "train_step", signalling_step)
    with pytest.raises(TrainingInterrupted) as info:
        recipe.train(fault_cfg(out, fault_inputs, save_every=save_every))
    assert info.value.exit_code == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
    assert info.value.step == 2 and f"{sig.name} received: stopped after step 2" in str(info.value)
    assert f"riemix train --output-dir {out} --resume" in str(info.value)
    # a checkpoint of the step reached (written by the stop itself when save_every=3 did not ask for one)
    expected = ["step-000002"] if save_every == 3 else ["step-000001", "step-000002"]
    assert _checkpoints(out) == expected
    assert read_checkpoint(out / "checkpoints" / "step-000002")["step"] == 2
    assert not (out / "adapter").exists() and not (out / ".riemix.lock").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers

    monkeypatch.setattr(recipe, "train_step", real_step)
    recipe.train(fault_cfg(out, fault_inputs, save_every=save_every, resume=True))
    assert_completed_like(out, reference_run)


def test_cli_sigterm_from_another_process_exits_143_and_resume_matches(tmp_path, fault_inputs, reference_run):
    """A real SIGTERM sent by another process to ``riemix train`` (in a child) while it trains."""
    out, log = tmp_path / "run", tmp_path / "child.log"
    argv = ["train", "--config", write_cfg(fault_cfg(out, fault_inputs), tmp_path / "cfg.yaml")]
    child = killer.start_child(killer.child_cli, argv, str(log), 0.5)  # each step slowed down by 0.5 s
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000001").is_dir():
            assert child.is_alive() and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGTERM)
        child.join(120)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 143, log.read_text()
    stopped = _checkpoints(out)
    last = int(stopped[-1].split("-")[1])
    assert 1 <= last < MAX_STEPS
    assert f"riemix train: SIGTERM received: stopped after step {last} with a checkpoint of it" in log.read_text()
    assert stopped == [f"step-{s:06d}" for s in range(1, last + 1)]
    assert not (out / "adapter").exists() and not (out / ".riemix.lock").exists()

    assert main(["train", "--output-dir", str(out), "--resume"]) == 0  # the run's saved config.yaml
    assert_completed_like(out, reference_run)


def test_cli_main_returns_143_on_sigterm_in_process(tmp_path, monkeypatch, capsys, fault_inputs, reference_run):
    out = tmp_path / "run"
    real_step = recipe.train_step

    def signalling_step(state, step):
        result = real_step(state, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(recipe, "train_step", signalling_step)
    argv = ["train", "--config", write_cfg(fault_cfg(out, fault_inputs), tmp_path / "cfg.yaml")]
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert f"riemix train: SIGTERM received: stopped after step 3 with a checkpoint of it; continue with: riemix " \
           f"train --output-dir {out} --resume" in err  # fmt: skip
    assert _checkpoints(out)[-1] == "step-000003"
    monkeypatch.setattr(recipe, "train_step", real_step)
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert_completed_like(out, reference_run)
