"""riemix.training.guard: the divergence checks, signals, and what a diverged or interrupted run leaves."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

import riemix.training.recipe as recipe
from riemix.io.adapter import load_adapter
from riemix.io.checkpoint import latest_checkpoint, read_checkpoint
from riemix.training.guard import DivergenceGuard, StopSignals, TrainingDiverged, TrainingInterrupted
from tests.helpers import make_tiny_llama, read_metrics, tiny_train_cfg, train_tiny, write_mcq


def test_non_finite_loss_gradient_and_weight_are_named():
    guard = DivergenceGuard(None, "try a lower lr")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 4: the loss is nan; .*; try a lower lr") as info:
        guard.check_loss(math.nan, 4)
    assert info.value.step == 4 and info.value.exit_code == 3
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2))
    p.grad, q.grad = torch.ones(3), torch.tensor([1.0, math.inf])
    guard.check_gradients([("p", p), ("nograd", torch.nn.Parameter(torch.ones(1)))], 1)  # fine
    with pytest.raises(TrainingDiverged, match=r"the gradient of q holds NaN or inf"):
        guard.check_gradients([("p", p), ("q", q)], 2)
    with torch.no_grad():
        p[1] = -math.inf
    with pytest.raises(TrainingDiverged, match=r"the update made p NaN or inf"):
        guard.check_weights([("q", q), ("p", p)], 3)


def test_the_loss_spike_rule_needs_a_ratio_a_margin_and_a_history():
    guard = DivergenceGuard(3.0, "advice")
    for step in range(1, 30):  # noisy but healthy: 0.3 .. 0.7
        guard.check_loss(0.5 + 0.2 * math.sin(step), step)
    small = DivergenceGuard(3.0, "advice")
    for step in range(1, 30):  # 10x up, but tiny in nats: not a divergence
        small.check_loss(0.01 if step < 15 else 0.1, step)
    with pytest.raises(
        TrainingDiverged, match=r"the smoothed loss rose to .* over 3× its best .*divergence_loss_ratio"
    ):
        for step in range(30, 80):  # stuck at ln|V| of a 49k vocabulary, as lr 1e6 did
            guard.check_loss(10.8, step)
    off = DivergenceGuard(None, "advice")
    for step in range(1, 50):
        off.check_loss(0.5 if step < 10 else 10.8, step)


def test_stop_signals_wait_for_the_step_boundary_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert signals.received is None and signals.name == ""
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM and signals.name == "SIGTERM"  # still running
    assert signal.getsignal(signal.SIGTERM) is before
    assert TrainingInterrupted("x", signal.SIGINT, 3).exit_code == 130
    assert TrainingInterrupted("x", signal.SIGTERM, 3).exit_code == 143


def _run_cfg(tmp_path, **kw):
    tmp_path.mkdir(exist_ok=True)
    data = write_mcq(tmp_path / "tr.jsonl", 32, 0)
    opts = dict(batch_size=4, max_steps=6, save_every=1, keep_last=10, eval_before=False, lr=1e-2,
                adapter={"num_experts": 2, "top_k": 1, "rank": 2})  # fmt: skip
    return tiny_train_cfg(tmp_path / "run", data, **{**opts, **kw})


def test_a_divergence_stops_before_anything_non_finite_is_saved(tmp_path, monkeypatch):
    real_step = recipe.train_step

    def poisoned(state, step):
        if step == 3:  # the fourth step: an overflowing update poisons one factor
            layer = next(m for m in state.model.modules() if hasattr(m, "lora_B"))
            with torch.no_grad():
                layer.lora_B.mul_(math.inf)
        return real_step(state, step)

    monkeypatch.setattr(recipe, "train_step", poisoned)
    with pytest.raises(
        TrainingDiverged, match=r"diverged at step 4: the (loss|gradient of .*lora_A) .*try a lower lr \(now 0.01\)"
    ):
        train_tiny(_run_cfg(tmp_path, log_every=1))
    out = tmp_path / "run"
    assert latest_checkpoint(out).name == "step-000003"
    state = read_checkpoint(latest_checkpoint(out))
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert not (out / "adapter").exists() and not (out / ".riemix.lock").exists()
    assert [x["step"] for x in read_metrics(out, "loss")] == [1, 2, 3]


def test_sigterm_checkpoints_the_step_reached_and_resume_finishes_identically(tmp_path, monkeypatch):
    straight = _run_cfg(tmp_path / "a")
    train_tiny(straight)
    real_step = recipe.train_step

    def interrupted(state, step):
        result = real_step(state, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run; the loop stops after this step
        return result

    monkeypatch.setattr(recipe, "train_step", interrupted)
    cfg = _run_cfg(tmp_path / "b", save_every=0)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM received: stopped after step 3 .*--resume") as info:
        train_tiny(cfg)
    assert info.value.exit_code == 143 and info.value.step == 3
    out = tmp_path / "b" / "run"
    assert latest_checkpoint(out).name == "step-000003" and not (out / ".riemix.lock").exists()
    monkeypatch.setattr(recipe, "train_step", real_step)
    train_tiny(_run_cfg(tmp_path / "b", save_every=0, resume=True))
    a = load_adapter(make_tiny_llama(), tmp_path / "a" / "run" / "adapter")
    b = load_adapter(make_tiny_llama(), out / "adapter")
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name
    steps = [x["step"] for x in read_metrics(out, "loss")]
    assert steps == sorted(set(steps))  # no step logged twice

