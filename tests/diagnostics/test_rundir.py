"""riemix.diagnostics.rundir: reading a run directory and diagnosing a saved adapter on its own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from riemix.diagnostics.monitor import weight_diagnostics
from riemix.diagnostics.rundir import adapter_diagnostics, load_run
from riemix.io.adapter import AdapterError


def test_adapter_weight_diagnostics_match_the_saved_tensors(tiny_run):
    diags = adapter_diagnostics(tiny_run / "adapter")
    assert len(diags) == 8
    tensors = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    want = weight_diagnostics(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"])
    assert diags[name]["effective_rank"] == pytest.approx(want["effective_rank"])
    prods = torch.stack(
        [b @ a for a, b in zip(tensors[f"{name}.lora_A"].double(), tensors[f"{name}.lora_B"].double(), strict=True)]
    )
    flat = prods.reshape(len(prods), -1)
    ref = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    torch.testing.assert_close(torch.tensor(diags[name]["similarity"], dtype=torch.float64), ref)


def test_metrics_lines_must_have_a_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected an object with a 'step'"):
        load_run(run)


def test_adapter_with_missing_or_corrupt_tensors(tiny_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.self_attn.q_proj.lora_B"]
    save_file(tensors, str(weights))
    with pytest.raises(AdapterError, match=r"module 'model.layers.0.self_attn.q_proj' are missing"):
        adapter_diagnostics(adapter)
    weights.write_bytes(b"garbage")
    with pytest.raises(AdapterError, match=r"cannot read adapter weights"):
        adapter_diagnostics(adapter)
