"""Tiny training runs of the fault tests: one configuration, adapters and metrics compared exactly."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from riemix.core.state import adapter_state_dict
from riemix.io.adapter import load_adapter
from riemix.training.config import TrainConfig
from tests.helpers import make_tiny_llama, read_metrics

MAX_STEPS = 5
ADAPTER = {"num_experts": 3, "top_k": 2, "rank": 2, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


def fault_cfg(out, inputs, **kw) -> TrainConfig:
    """A 5-step tiny run with a checkpoint after every step and the loss logged at every step.

    ``inputs`` is the ``fault_inputs`` fixture: (training data file, tiny model directory).  The model is
    loaded from its directory, as ``riemix train`` does, so in-process runs and the command line agree.
    """
    data, model_dir = inputs
    opts = dict(
        model=str(model_dir),
        dataset=str(data),
        output_dir=str(out),
        batch_size=4,
        max_steps=MAX_STEPS,
        lr=1e-2,
        save_every=1,
        keep_last=10,
        log_every=1,
        eval_before=False,
        progress=False,
        verbose=False,
        adapter=ADAPTER,
    )
    return TrainConfig.from_dict({**opts, **kw})


def write_cfg(cfg: TrainConfig, path: Path) -> str:
    """``cfg`` as a YAML file for ``riemix train --config``."""
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return str(path)


def adapter_tensors(path) -> dict[str, torch.Tensor]:
    """The tensors of the adapter directory ``path``, loaded (and so verified) with ``load_adapter``."""
    return {k: v.detach().clone() for k, v in adapter_state_dict(load_adapter(make_tiny_llama(), path)).items()}


def assert_same_adapter(a, b) -> None:
    """The adapters in directories ``a`` and ``b`` hold bit-identical tensors."""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def loss_lines(run_dir) -> list[tuple[int, float, float]]:
    """(step, loss, lr) of every training-loss line of ``metrics.jsonl``."""
    return [(x["step"], x["loss"], x["lr"]) for x in read_metrics(run_dir, "loss")]


def assert_completed_like(run_dir, reference) -> None:
    """A resumed run ended like the uninterrupted ``reference``: same adapter bit for bit, the same loss
    line once per step, the same final evaluation, no lock and no temporary checkpoint left."""
    run_dir, reference = Path(run_dir), Path(reference)
    assert_same_adapter(run_dir / "adapter", reference / "adapter")
    steps = [step for step, _, _ in loss_lines(run_dir)]
    assert steps == list(range(1, MAX_STEPS + 1)), f"duplicated or missing steps in metrics.jsonl: {steps}"
    assert loss_lines(run_dir) == loss_lines(reference)
    evals = [x["step"] for x in read_metrics(run_dir, "eval")]
    assert len(evals) == len(set(evals)), f"duplicated evaluations in metrics.jsonl: {evals}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS
    assert summary["after"] == json.loads((reference / "summary.json").read_text())["after"]
    assert not (run_dir / ".riemix.lock").exists()
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread inside the block (tests/faults/conftest.py explains why)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
