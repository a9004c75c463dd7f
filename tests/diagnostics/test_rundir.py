"""riemix.diagnostics.rundir: reading a run directory and diagnosing a saved adapter on its own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from riemix.diagnostics.monitor import SIMILARITY_THRESHOLD, weight_diagnostics
from riemix.diagnostics.rundir import (
    adapter_diagnostics,
    collapsed_layers,
    layer_rows,
    least_balanced_layer,
    load_run,
    most_similar_layer,
    untrained_experts,
)
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


def _row(name, max_similarity=None, usage_entropy=None, experts=4, untrained=None):
    return {"name": name, "max_similarity": max_similarity, "usage_entropy": usage_entropy, "experts": experts,
            "untrained": untrained}


def test_collapse_needs_a_similarity_above_the_threshold():
    rows = [_row("a", 0.19), _row("b", 0.95), _row("c", 0.85), _row("d")]
    assert most_similar_layer(rows)["name"] == "b"
    assert [r["name"] for r in collapsed_layers(rows, 0.8)] == ["b", "c"]  # most similar first
    assert collapsed_layers(rows, 0.95) == []  # "exceeds": equal is not above
    assert collapsed_layers([_row("a", 0.19)]) == [] and SIMILARITY_THRESHOLD == 0.8
    assert most_similar_layer([_row("a")]) is None


def test_least_balanced_layer_is_relative_to_log_e():
    rows = [_row("two", usage_entropy=0.5, experts=2), _row("eight", usage_entropy=1.0, experts=8),
            _row("one", usage_entropy=0.0, experts=1), _row("none")]
    assert least_balanced_layer(rows)["name"] == "eight"  # 1.0 / log 8 < 0.5 / log 2; E = 1 is ignored
    assert least_balanced_layer([_row("none")]) is None


def test_untrained_experts_lists_layer_expert_pairs():
    rows = [_row("a", untrained=[0, 2]), _row("b", untrained=[]), _row("c"), _row("d", untrained=[1])]
    assert untrained_experts(rows) == [("a", 0), ("a", 2), ("d", 1)]


def test_rows_carry_the_threshold_and_untrained_experts(tiny_run):
    run = load_run(tiny_run, threshold=0.5)
    assert run["threshold"] == 0.5
    rows = layer_rows(run)
    assert len(rows) == 8 and all(r["untrained"] == [] for r in rows)  # 3 steps moved every B of the tiny run
