"""riemix.io.checkpoint: a checkpoint round trip, and a crafted trainer state refused before it can run code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemix import MoELoRAConfig, add_moe_lora, build_optimizer
from riemix.io.checkpoint import load_checkpoint, save_checkpoint


class _RunsCode:
    """Unpickling this calls ``exec``: what a crafted checkpoint would do."""

    def __reduce__(self):
        return exec, ("import builtins; builtins.riemix_pwned = True",)


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
    with pytest.raises(ValueError, match=r"trainer_state\.pt: refused: .*not written by riemix"):
        load_checkpoint(path, *_parts())
    assert not hasattr(builtins, "riemix_pwned")
